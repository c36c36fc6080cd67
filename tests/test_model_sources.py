"""Models by name (osprey.io.models): a released-layout checkpoint from a directory, the Hugging
Face cache (offline, by repo id), moto S3 and the MLflow registry gives the same logits; a node's
actors share one download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from released_support import place_in_hub_cache, write_released_checkpoint

import osprey
from osprey.io.models import parse_source, resolve_model
from osprey.model.config import tiny

REPO = "sunshine-lwt/Osprey-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MASK, POS = tiny().mask_token_id, tiny().pos_token_id


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(the released-layout directory, the in-memory model it was written from)."""
    return write_released_checkpoint(tmp_path_factory.mktemp("released") / "Osprey-tiny")


@pytest.fixture
def hub_home(released, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    place_in_hub_cache(released[0], tmp_path / "hf" / "hub", REPO, COMMIT)
    return tmp_path / "hf"


def upload(fs, local: Path, prefix: str) -> None:
    bucket = prefix.split("/", 1)[0]
    fs.create_dir(bucket)
    for file in local.rglob("*"):
        if file.is_file():
            with fs.open_output_stream(f"{prefix}/{file.relative_to(local)}") as out:
                out.write(file.read_bytes())


def logits_of(model) -> torch.Tensor:
    """One fixed multimodal prompt with two regions through the model."""
    g = torch.Generator().manual_seed(3)
    ids = [1, -200, 5, 9, MASK, POS, 17, MASK, POS, 40, 2]
    image = torch.randn(1, 3, 128, 128, generator=g)
    masks = [torch.rand(2, 70, 90, generator=g) > 0.5]
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]), None, image, masks).logits


def test_names_parse_to_their_kind(tmp_path):
    assert parse_source(str(tmp_path)).kind == "local"
    hub = parse_source("sunshine-lwt/Osprey-Chat-7b@v1.0")
    assert (hub.kind, hub.location, hub.revision) == ("hub", "sunshine-lwt/Osprey-Chat-7b", "v1.0")
    assert parse_source("hf://sunshine-lwt/Osprey-7b").revision is None
    assert parse_source("s3://bucket/models/osprey/").location == "s3://bucket/models/osprey"
    assert parse_source("models:/osprey@prod").kind == "registry"
    for bad, error in (
        ("", ValueError),
        ("gs://b/m", ValueError),
        ("s3://", ValueError),
        ("a/b/c/not-here", FileNotFoundError),
        ("repo@", FileNotFoundError),
    ):
        with pytest.raises(error):
            parse_source(bad)  # fmt: skip


def test_released_layout_is_read_from_its_own_config_and_weights(released):
    directory, reference = released
    config = osprey.model.checkpoint.read_config(directory)
    assert config.vision.timm_model_name == "convnext_atto"
    assert config.vision.channels == reference.config.vision.channels
    assert config.mask_extractor.spatial_size == 56 and config.mask_extractor.embed_dim == 128
    assert (config.mask_token_id, config.pos_token_id) == (1024, 1025)
    loaded = osprey.load_model(directory)  # strict: every key, the inv_freq buffers dropped
    for k, v in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(logits_of(loaded), logits_of(reference), atol=0, rtol=0)


@pytest.mark.slow
def test_every_source_gives_the_same_logits(released, hub_home, moto_s3, tmp_path):
    from osprey.prompts import load_tokenizer
    from osprey.tracking import Tracker

    directory, reference = released
    expected = logits_of(reference)
    fs, s3 = moto_s3
    upload(fs, directory, "models/releases/Osprey-tiny")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_location=(tmp_path / "artifacts").as_uri())
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    tracker.register_model(run, str(directory), "osprey-released", "production")

    cache = tmp_path / "cache"
    names = {
        "directory": resolve_model(str(directory)),
        "hub": resolve_model(REPO),
        "hub@commit": resolve_model(f"{REPO}@{COMMIT}"),
        "s3": resolve_model("s3://models/releases/Osprey-tiny", s3=s3, cache_dir=cache),
        "registry": resolve_model(
            "models:/osprey-released@production", tracking_uri=uri, cache_dir=cache
        ),
    }
    assert names["hub"].revision == COMMIT and names["hub"].path.endswith(COMMIT)
    assert names["hub"].tags()["osprey.model_revision"] == COMMIT
    assert names["registry"].revision == "osprey-released/1"
    for kind, resolved in names.items():
        model = osprey.load_model(resolved.path)
        torch.testing.assert_close(logits_of(model), expected, atol=0, rtol=0, msg=kind)
        if kind in ("hub", "s3"):  # the SentencePiece conversion is slow: two suffice
            tokenizer = load_tokenizer(resolved.path)
            assert tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"]) == [MASK, POS], kind
    # Copied once: a second resolve is served from the node's cache.
    again = resolve_model("s3://models/releases/Osprey-tiny", s3=s3, cache_dir=cache)
    assert names["s3"].downloaded and not again.downloaded and again.path == names["s3"].path
    assert osprey.load_model(REPO) is not None  # load_model takes names too
    from osprey.serve.model_source import resolve_model as served_model

    assert served_model(REPO) == names["hub"].path  # the Serve captioner's `model:` too
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model(f"{REPO}@{'f' * 40}")
    with pytest.raises(FileNotFoundError, match="no files"):
        resolve_model("s3://models/releases/nothing-here", s3=s3, cache_dir=cache)


def test_open_clip_tower_by_hub_name(hub_home, tmp_path):
    """build_model's vision.weights takes a hub id holding open_clip_pytorch_model.bin."""
    donor = osprey.build_model("tiny", seed=5)
    visual = {
        f"visual.{k}": v for k, v in donor.vision_tower.vision_tower.visual.state_dict().items()
    }
    folder = tmp_path / "clip"
    folder.mkdir()
    torch.save(visual, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text("{}")
    place_in_hub_cache(folder, hub_home / "hub", "laion/CLIP-convnext_atto-tiny", COMMIT)
    config = tiny()
    config.vision.weights = "laion/CLIP-convnext_atto-tiny"
    built = osprey.build_model(config, seed=0)
    for k, v in donor.vision_tower.state_dict().items():
        assert torch.equal(built.vision_tower.state_dict()[k], v), k


@pytest.mark.slow
def test_two_actors_on_a_node_share_one_download(local_ray, released, moto_s3, tmp_path):
    fs, s3 = moto_s3
    upload(fs, released[0], "models/shared/Osprey-tiny")

    @local_ray.remote(num_cpus=0)
    class Loader:
        def load(self, cache: str):
            from osprey.io.models import resolve_model

            resolved = resolve_model("s3://models/shared/Osprey-tiny", s3=s3, cache_dir=cache)
            return resolved.path, resolved.downloaded, os.getpid()

    actors = [Loader.remote() for _ in range(2)]
    results = local_ray.get([a.load.remote(str(tmp_path / "node-cache")) for a in actors])
    assert len({pid for _, _, pid in results}) == 2  # two processes
    assert len({path for path, _, _ in results}) == 1  # one copy
    assert sum(downloaded for _, downloaded, _ in results) == 1  # fetched once
    assert osprey.model.checkpoint.read_config(results[0][0]).vision.timm_model_name == (
        "convnext_atto"
    )


# ---- the entry points take names -------------------------------------------------------------


@pytest.mark.slow
def test_caption_and_eval_take_hub_and_registry_names(released, hub_home, tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    from osprey.data.shapes import ShapesConfig, render_sample, write_shapes_dataset
    from osprey.eval.benchmarks import BenchmarkData
    from osprey.eval.job import EvalConfig, EvalResources, run_eval
    from osprey.infer.job import CaptionJobConfig, run_caption_job
    from osprey.io.output import TASK_COLUMNS
    from osprey.tracking import MODEL_TAG, Tracker

    directory = str(released[0])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1):  # a released config runs the tower at 512 px: slow on a CPU
        scene = render_sample(rng, ShapesConfig(image_size=96, max_shapes=2))
        Image.fromarray(scene.image).save(images / f"img{i}.png")

    def caption(model: str, out: str):
        config = CaptionJobConfig(
            source=str(images), out=str(tmp_path / out), model=model, category_tokens=3,
            short_tokens=3,
        )  # fmt: skip
        run_caption_job(config, local=True)
        frame = pd.read_parquet(tmp_path / out).sort_values(["image_path", "mask_index"])
        assert frame["error"].isna().all()
        return config.model, frame[list(TASK_COLUMNS.values())].to_dict("records")

    pinned, by_hub = caption(REPO, "by-hub")
    assert pinned == f"{REPO}@{COMMIT}"  # what the job recorded and its actors loaded
    _, by_dir = caption(directory, "by-dir")
    assert by_hub == by_dir and len(by_dir) > 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_location=(tmp_path / "artifacts").as_uri())
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    tracker.register_model(run, directory, "osprey-released", "production")
    write_shapes_dataset(str(tmp_path / "shapes"), n=8, seed=2, progress=False)
    config = EvalConfig(
        benchmark="shapes", model="models:/osprey-released@production",
        data=BenchmarkData(root=str(tmp_path / "shapes")), out=str(tmp_path / "eval"),
        tracking_uri=uri, resources=EvalResources(batch=4), limit=4,
    )  # fmt: skip
    result = run_eval(config, local=True)
    assert result.items >= 1 and result.metrics["regions"] > 0
    logged = tracker.client.get_run(result.run_id).data.tags
    assert logged[MODEL_TAG] == "models:/osprey-released/1"  # the alias pinned to its version


def test_a_stage_init_by_name_is_pinned_and_its_tokenizer_shared(released, hub_home, tmp_path):
    from osprey.train.config import StageConfig
    from osprey.train.loop import init_model
    from osprey.train.runner import resolve_init, resolve_tokenizer

    stage = StageConfig(name="stage3", trains=("llm",), init=REPO)
    init = resolve_init(stage, tracking_uri=None)
    assert stage.init == f"{REPO}@{COMMIT}" and init.tags()["osprey.init_revision"] == COMMIT
    shared = tmp_path / "out" / "stage3" / "init-tokenizer"
    tokenizer = resolve_tokenizer(stage, init, copy_to=str(shared))
    assert tokenizer == str(shared)
    assert (shared / "tokenizer.model").exists() and not list(shared.glob("*.bin"))
    model = init_model(stage)  # what every worker does with the pinned name
    for k, v in released[1].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stage_job_starts_from_a_hub_id(released, hub_home, tmp_path):
    """`--set init=ORG/NAME` on the Ray job: the workers load the pinned commit and MLflow
    records it."""
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from osprey.data.shapes import write_shapes_dataset

    write_shapes_dataset(str(tmp_path / "shapes"), n=8, seed=3, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable, "-m", "jobs.train_stage3", "--output-dir", str(tmp_path),
        "--pipeline", "byname", "--workers", "1", "--max-failures", "0",
        "--set", f"init={REPO}", "--set", "max_steps=1", "--set", "global_batch_size=2",
        "--set", "micro_batch_size=2", "--set", "checkpoint_every=1",
        # The released layout's tower runs at 512 px: 1024 image tokens.
        "--set", "max_length=1536", "--set", "tasks=[category]",
    ]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        command, cwd=repo, env=env, capture_output=True, text=True, timeout=840, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.rindex('{\n  "stage"') :])
    assert result["steps"] == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["osprey.init"] == REPO and tags["osprey.init_revision"] == COMMIT
    assert tags["osprey.init_pinned"] == f"{REPO}@{COMMIT}"
    assert (tmp_path / "stage3" / "init-tokenizer" / "tokenizer.model").exists()
    exported = osprey.model.checkpoint.read_config(result["model_dir"])
    assert exported.vision.timm_model_name == "convnext_atto"
