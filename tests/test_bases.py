"""Pretrained stand-in bases: the vision tower learns shape, the LLM learns the text, both load."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import osprey
from osprey.data.shapes import SHAPES, image_rows, render_sample, shapes_corpus
from osprey.model.image_processing import preprocess_image
from osprey.model.vision import ClipImageTower
from osprey.prompts import load_tokenizer, train_tokenizer
from osprey.train import pretrain_vision as pv
from osprey.train.pretrain_llm import (
    NOISE_SLOT,
    REGION_SLOT,
    documents,
    name_regions,
    pretrain_llm,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shapes_corpus(), vocab_size=osprey.get_config("tiny").llm.vocab_size)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def shapes_rows(n: int, split: str = "train") -> list[dict]:
    return [row for i in range(n) for row in image_rows(i, split)]


# ---- vision ------------------------------------------------------------------------------


def test_soft_targets_are_area_shares():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 2  # one quadrant of class 2
    shares = pv.soft_targets(labels, 3, (2, 2))
    assert shares.shape == (1, 3, 2, 2)
    torch.testing.assert_close(shares.sum(1), torch.ones(1, 2, 2))
    assert shares[0, 2, 0, 0] == 1 and shares[0, 0, 1, 1] == 1


def test_batch_matches_the_model_inputs():
    config = osprey.get_config("tiny").vision
    rng = np.random.default_rng(0)
    scenes = [render_sample(rng) for _ in range(3)]
    batch = pv.scenes_to_batch(scenes, config)
    for scene, image in zip(scenes, batch.images, strict=True):
        torch.testing.assert_close(image, preprocess_image(scene.image, config), rtol=0, atol=0)
    assert len(batch.region_shapes) == sum(len(s.labels) for s in scenes)
    assert batch.region_shapes.max() < len(SHAPES)


def test_saved_tower_has_open_clip_keys_and_loads_into_the_model(tmp_path):
    metrics = pv.pretrain_vision_tower(tmp_path / "clip.bin", steps=2, batch_size=2, log_every=1)
    assert metrics["steps"] == 2 and np.isfinite(metrics["loss"])
    state = torch.load(tmp_path / "clip.bin", weights_only=True)
    assert state and all(k.startswith("visual.") for k in state)
    # Exactly the image tower's keys, as open_clip's open_clip_pytorch_model.bin holds them.
    assert set(state) == set(ClipImageTower(osprey.get_config("tiny").vision).state_dict())

    config = osprey.get_config("tiny")
    config.vision.weights = str(tmp_path / "clip.bin")
    model = osprey.build_model(config)
    own = model.vision_tower.vision_tower.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def test_pretrain_vision_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        pv.pretrain_vision_tower(tmp_path / "x.bin", steps=0)


def test_random_tower_loses_shape_but_keeps_colour():
    config = osprey.get_config("tiny").vision
    torch.manual_seed(0)
    probe = pv.probe_tower(ClipImageTower(config), config, train_images=120, test_images=60)
    assert probe["colour_accuracy"] >= 0.95
    assert probe["shape_accuracy"] < 0.45, probe


# ---- LLM ---------------------------------------------------------------------------------


def test_region_placeholders_become_names():
    assert name_regions("What is <region2>?") == "What is region2?"
    assert name_regions("regions: region1<region1>, region2<region2>.") == (
        "regions: region1, region2."
    )
    assert name_regions("a <region> here") == "a region here"


def test_category_rows_become_slots_and_answer_tokens(tokenizer):
    row = image_rows(0, "train", tasks=("category",))[0]
    [doc] = documents(tokenizer, [row], num_image_tokens=4)
    assert doc.ids.count(REGION_SLOT) == len(row["regions"])
    assert doc.ids.count(NOISE_SLOT) == 4 + len(row["regions"])  # image + one <pos> a region
    answers = tokenizer.decode([i for i, a in zip(doc.ids, doc.answer, strict=True) if a])
    for region in row["regions"]:
        assert region["category"] in answers
    # One slot a question, in the order asked: each holds its region's category words.
    contents = sorted(tokenizer.decode(c) for c in doc.contents)
    assert contents == sorted(r["category"] for r in row["regions"])


def test_documents_reject_unknown_items(tokenizer):
    with pytest.raises(ValueError, match="texts_or_rows"):
        documents(tokenizer, [{"image": b""}], 4)
    with pytest.raises(ValueError, match="empty"):
        documents(tokenizer, [], 4)


def test_pretrained_llm_learns_the_text_and_loads_strictly(tmp_path, tokenizer):
    rows = shapes_rows(30)
    metrics = pretrain_llm(
        tmp_path / "llm", tokenizer, rows, steps=60, batch_size=8, seq_len=192, log_every=20,
        reading_steps=5, reading_target=0.0,
    )  # fmt: skip
    assert metrics["reading_steps"] == 5
    assert metrics["loss"] < 0.3 * metrics["unigram_entropy"], metrics

    config = osprey.get_config("tiny")
    config.llm.weights = str(tmp_path / "llm")
    model = osprey.build_model(config).eval()
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(tmp_path / "llm").eval()
    ids = torch.tensor([tokenizer.encode("USER: What is the category of region1?")])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)


# ---- both --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from osprey.data.shapes import write_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(out), n=12, progress=False)
    return out


def test_prepare_bases_returns_a_config_that_builds(tmp_path, shapes_dir):
    from osprey.train.bases import BasesConfig, prepare_bases, read_bases_config

    config = prepare_bases(
        tmp_path / "bases",
        shapes_dir,
        BasesConfig(vision_steps=2, llm_steps=2, llm_reading_steps=2),
    )
    assert config.name == "tiny"
    assert config.vision.weights.endswith("open_clip_pytorch_model.bin")
    assert read_bases_config(tmp_path / "bases") == config
    model = osprey.build_model(config)  # loads both bases strictly
    loaded = load_tokenizer(tmp_path / "bases" / "tokenizer")
    assert loaded.convert_tokens_to_ids("<mask>") == model.config.mask_token_id


def test_side_by_side_bases_equal_sequential_ones_at_the_same_threads(tmp_path, shapes_dir):
    """Two threads side by side give each training one; run one after the other on one
    thread, the same seeds must give the same weights, bit for bit."""
    from safetensors.torch import load_file

    from osprey.train.bases import LLM_DIR, VISION_FILE, BasesConfig, prepare_bases

    steps = BasesConfig(vision_steps=3, llm_steps=3, llm_reading_steps=2)
    prepare_bases(tmp_path / "parallel", shapes_dir, steps)
    assert torch.get_num_threads() == 2  # given back after the LLM's share
    torch.set_num_threads(1)
    prepare_bases(tmp_path / "sequential", shapes_dir, replace(steps, parallel=False))

    def weights(run: str) -> dict[str, torch.Tensor]:
        tower = torch.load(tmp_path / run / VISION_FILE, weights_only=True)
        return {**tower, **load_file(tmp_path / run / LLM_DIR / "model.safetensors")}

    parallel, sequential = weights("parallel"), weights("sequential")
    assert parallel.keys() == sequential.keys()
    assert [k for k in parallel if not torch.equal(parallel[k], sequential[k])] == []
    # and the tower trained: not the seed's initialisation
    torch.manual_seed(0)
    fresh = ClipImageTower(osprey.get_config("tiny").vision).state_dict()
    trained = torch.load(tmp_path / "parallel" / VISION_FILE, weights_only=True)
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh if k.endswith("weight"))


def test_a_failing_tower_process_is_named_and_a_failing_llm_stops_it(tmp_path, shapes_dir):
    import psutil

    from osprey.train.bases import BasesConfig, prepare_bases

    with pytest.raises(RuntimeError, match="vision tower pretraining exited with status 1"):
        prepare_bases(
            tmp_path / "a",
            shapes_dir,
            BasesConfig(vision_steps=0, llm_steps=1, llm_reading_steps=0),
        )
    # The LLM fails at once; the tower's process (600 steps) must not outlive the error.
    with pytest.raises(ValueError, match="steps and batch_size must be positive"):
        prepare_bases(tmp_path / "b", shapes_dir, BasesConfig(vision_steps=600, llm_steps=0))
    children = psutil.Process().children(recursive=True)
    assert not [p for p in children if "osprey.train.pretrain_vision" in " ".join(p.cmdline())]
    assert not (tmp_path / "b" / "vision").exists()


@pytest.mark.slow
def test_pretrain_bases_job_runs_in_a_ray_task(tmp_path, shapes_dir, local_ray):
    from jobs.pretrain_bases import main

    config = main(
        ["--shapes-dir", str(shapes_dir), "--out", str(tmp_path / "bases")]
        + ["--vision-steps", "2", "--llm-steps", "2", "--llm-reading-steps", "2"]
        + ["--num-cpus", "1"]
    )
    assert (tmp_path / "bases" / "llm" / "model.safetensors").exists()
    osprey.build_model(config)


# ---- the shipped artifact -------------------------------------------------------------------


def test_bases_artifact_is_built_checked_and_installed(tmp_path):
    """`osprey bases` writes the bases with a manifest; installing checks every file and gives
    a config whose model loads both bases strictly; a changed file is refused by name."""
    import json

    from osprey.cli import main
    from osprey.train.bases import MANIFEST_FILE, install_bases

    artifact = tmp_path / "artifact"
    main(
        ["bases", "--out", str(artifact), "--images", "12", "--vision-steps", "2"]
        + ["--llm-steps", "2", "--llm-reading-steps", "0", "--sequential-bases"]
    )
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    assert manifest["shapes"] == {"n_images": 12, "seed": 0}
    assert manifest["bases"]["vision_steps"] == 2
    assert "vision/open_clip_pytorch_model.bin" in manifest["files"]
    assert any(name.startswith("llm/") for name in manifest["files"])

    config = install_bases(tmp_path / "installed", artifact)
    model = osprey.build_model(config)
    tower = torch.load(artifact / "vision" / "open_clip_pytorch_model.bin", weights_only=True)
    ours = model.vision_tower.state_dict()
    key = next(k for k in tower if k.endswith("stem.0.weight"))
    assert torch.equal(next(v for k, v in ours.items() if k.endswith("stem.0.weight")), tower[key])

    with open(artifact / "vision" / "open_clip_pytorch_model.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="vision/open_clip_pytorch_model.bin"):
        install_bases(tmp_path / "again", artifact)


def test_shipped_bases_install_and_build_the_tiny_model(tmp_path):
    from osprey.train.bases import ARTIFACT_DIR, install_bases

    config = install_bases(tmp_path / "bases", ARTIFACT_DIR)
    model = osprey.build_model(config)
    tokenizer = load_tokenizer(tmp_path / "bases" / "tokenizer")
    assert tokenizer.convert_tokens_to_ids("<mask>") == model.config.mask_token_id
