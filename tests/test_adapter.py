"""LoRA adapters: what trains, peft's format, merging, and that caption, eval and Serve answer
with an adapter exactly as with the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import osprey
from osprey.cli import main as osprey_main
from osprey.model.adapter import LoraConfig, add_lora, save_adapter
from osprey.train.config import StageConfig
from osprey.train.freeze import apply_trainable

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def expected_trainable(config, rank: int, targets, parts) -> int:
    """Adapters (rank x (in + out) per adapted projection) plus the parts trained fully, all
    from the architecture's sizes (OSPREY.md), not from the model's parameters."""
    llm = config.llm
    head_dim = llm.hidden_size // llm.num_attention_heads
    kv = llm.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (llm.hidden_size, llm.hidden_size),
        "k_proj": (llm.hidden_size, kv),
        "v_proj": (llm.hidden_size, kv),
        "o_proj": (llm.hidden_size, llm.hidden_size),
        "gate_proj": (llm.hidden_size, llm.intermediate_size),
        "up_proj": (llm.hidden_size, llm.intermediate_size),
        "down_proj": (llm.intermediate_size, llm.hidden_size),
    }
    total = llm.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)
    h, e = llm.hidden_size, config.mask_extractor.embed_dim
    if "projector" in parts:  # mlp2x_gelu: Linear(res4 channels, H) -> GELU -> Linear(H, H)
        total += linear_params(config.vision.channels[2], h) + linear_params(h, h)
    if "mask_extractor" in parts:
        side = config.mask_extractor.spatial_size
        total += sum(linear_params(c, e) for c in config.vision.channels)
        total += linear_params(e, h)  # feat_linear
        total += linear_params(side * side, e) + linear_params(e, e) + linear_params(e, h)
    return total


@pytest.mark.parametrize(
    "rank, targets, parts",
    [
        (8, PROJECTIONS, ("projector", "mask_extractor")),
        (4, ("q_proj", "v_proj"), ("mask_extractor",)),
        (2, ("down_proj",), ()),
    ],
)
def test_trainable_parameters_are_the_adapters_plus_the_chosen_parts(rank, targets, parts):
    model = osprey.build_model("tiny", device="meta")
    add_lora(model, LoraConfig(rank=rank, target_modules=targets))
    counts = apply_trainable(model, parts)
    assert counts["trainable"] == expected_trainable(model.config, rank, targets, parts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.vision_tower") for n in trainable)
    assert not any(".base_layer." in n or "embed_tokens" in n for n in trainable)


def test_lora_stage_config_validates_its_options():
    with pytest.raises(ValueError, match="trains"):
        StageConfig(name="f", trains=["llm"], lora={"rank": 4})
    with pytest.raises(ValueError, match="lora.rank"):
        StageConfig(name="f", trains=[], lora={"rank": 0})
    with pytest.raises(ValueError, match="target_modules"):
        StageConfig(name="f", trains=[], lora={"target_modules": ["fc1"]})
    with pytest.raises(ValueError, match="unknown lora keys"):
        StageConfig(name="f", trains=[], lora={"r": 4})
    stage = StageConfig(name="f", trains=[], lora={"rank": 4})
    assert StageConfig.from_dict(stage.to_dict()).lora == stage.lora


def test_qlora_on_a_cpu_is_refused_naming_the_option(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the CPU error; a GPU runs QLoRA")
    model = osprey.build_model("tiny", device="meta")
    with pytest.raises(ValueError, match="quantize_4bit.*CUDA GPU"):
        add_lora(model, LoraConfig(quantize_4bit=True))
    # Before any work from the command line: no Ray, no data read.
    code = osprey_main(
        ["finetune", "--model", str(base_dir(tmp_path)), "--data", str(tmp_path / "shards"),
         "--name", "q", "--method", "qlora", "--preset", "tiny",
         "--output-dir", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 2
    assert "QLoRA" in capsys.readouterr().err


def base_dir(tmp_path: Path) -> Path:
    from osprey.infer.tiny import write_tiny_model

    return write_tiny_model(tmp_path / "base")


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny base model and an adapter as training leaves one: adapters moved off zero, the
    mask extractor changed (trained fully)."""
    from osprey.infer.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_model(root / "base")
    model = osprey.load_model(base)
    config = LoraConfig(rank=4, alpha=8, dropout=0.0)
    add_lora(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("mask_extractor."):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    adapter = save_adapter(model, root / "adapter", config, ["mask_extractor"], str(base))
    return str(base), str(adapter)


@pytest.fixture(scope="module")
def merged_dir(base_and_adapter, tmp_path_factory):
    base, adapter = base_and_adapter
    out = tmp_path_factory.mktemp("merged") / "model"
    code = osprey_main(
        ["export", "--model", base, "--adapter", adapter, "--merge", "--out", str(out)]
    )
    assert code == 0
    return str(out)


def region_batch(model, n: int = 2, seed: int = 0):
    from osprey.data.shapes import render_sample
    from osprey.model.image_processing import preprocess_image

    rng = np.random.default_rng(seed)
    scenes = [render_sample(rng) for _ in range(n)]
    images = torch.stack([preprocess_image(s.image, model.config.vision) for s in scenes])
    masks = [torch.from_numpy(s.masks[:2]).float() for s in scenes]
    cfg = model.config
    ids = torch.tensor([[1, 5, -200, 7, cfg.mask_token_id, cfg.pos_token_id, 9,
                         cfg.mask_token_id, cfg.pos_token_id, 11, 12]] * n)  # fmt: skip
    return ids, images, masks


def test_adapter_folder_is_small_and_in_peft_format(base_and_adapter):
    from peft import PeftModel

    base, adapter = base_and_adapter
    files = {p.name: p.stat().st_size for p in Path(adapter).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    weights = sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))
    assert files["adapter_model.safetensors"] < weights / 10
    # peft itself loads the folder onto the base (the adapters; the mask extractor is ours).
    ours = osprey.load_model(base, adapter=adapter).eval()
    theirs = PeftModel.from_pretrained(osprey.load_model(base), adapter).eval()
    theirs.base_model.model.mask_extractor.load_state_dict(ours.mask_extractor.state_dict())
    ids, images, masks = region_batch(ours)
    with torch.no_grad():
        a = ours(ids, images=images, masks=masks).logits
        b = theirs(input_ids=ids, images=images, masks=masks).logits
    assert torch.equal(a, b)


def test_merged_model_logits_equal_base_plus_adapter(base_and_adapter, merged_dir):
    from osprey.model.checkpoint import read_state_dict

    base, adapter = base_and_adapter
    with_adapter = osprey.load_model(base, adapter=adapter).eval()
    merged = osprey.load_model(merged_dir).eval()
    plain = osprey.load_model(base).eval()
    # Our checkpoint format: the same keys as the base, no adapter tensors.
    assert set(read_state_dict(merged_dir)) == set(read_state_dict(base))
    ids, images, masks = region_batch(merged)
    with torch.no_grad():
        a = with_adapter(ids, images=images, masks=masks).logits
        b = merged(ids, images=images, masks=masks).logits
        c = plain(ids, images=images, masks=masks).logits
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() > 1e-2  # the adapter does change the answers


def test_caption_job_with_adapter_answers_as_the_merged_model(
    base_and_adapter, merged_dir, tmp_path
):
    from test_caption_job import write_images

    from osprey.infer.job import CaptionJobConfig, run_caption_job

    base, adapter = base_and_adapter
    images = write_images(tmp_path / "images", 3, bad=False)
    frames = []
    for name, model, extra in (("adapter", base, {"adapter": adapter}), ("merged", merged_dir, {})):
        config = CaptionJobConfig(
            source=str(images), out=str(tmp_path / name), model=model,
            category_tokens=4, short_tokens=4, **extra,
        )  # fmt: skip
        run_caption_job(config, local=True)
        frame = pd.read_parquet(tmp_path / name).sort_values(["image_path", "mask_index"])
        frames.append(
            frame[["image_path", "mask_index", "category", "short_caption"]].reset_index(drop=True)
        )
    assert len(frames[0]) > 0
    pd.testing.assert_frame_equal(frames[0], frames[1])
    plain_cols = frames[0][["category", "short_caption"]].to_numpy().tolist()
    assert any(a != "" for row in plain_cols for a in row)


def test_eval_with_adapter_answers_as_the_merged_model(base_and_adapter, merged_dir, tmp_path):
    from osprey.data.shapes import write_shapes_dataset
    from osprey.eval.benchmarks import BenchmarkData
    from osprey.eval.job import EvalConfig, run_eval

    base, adapter = base_and_adapter
    write_shapes_dataset(str(tmp_path / "shapes"), n=20, seed=4, progress=False)
    predictions = []
    for name, model, extra in (("adapter", base, {"adapter": adapter}), ("merged", merged_dir, {})):
        config = EvalConfig(
            benchmark="shapes", model=model, data=BenchmarkData(root=str(tmp_path / "shapes")),
            out=str(tmp_path / name), mlflow=False, max_new_tokens=4, **extra,
        )  # fmt: skip
        run_eval(config, local=True)
        frame = pd.read_parquet(tmp_path / name / "predictions").sort_values("item_id")
        predictions.append(frame[["item_id", "prediction"]].reset_index(drop=True))
    assert len(predictions[0]) > 0
    pd.testing.assert_frame_equal(predictions[0], predictions[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_with_adapter_answers_as_the_merged_model(serve_app, base_and_adapter, merged_dir):
    from ray import serve
    from serve_support import app_args, app_options, deploy, image_b64

    base, adapter = base_and_adapter
    apps = {
        "adapter": deploy("lora-adapter", "/adapter", serve_app.port,
                          app_args(base, adapter=adapter), app_options()),
        "merged": deploy("lora-merged", "/merged", serve_app.port, app_args(merged_dir),
                         app_options()),
    }  # fmt: skip
    try:
        from serve_support import scene

        s = scene(seed=5)
        from pycocotools import mask as mask_utils

        regions = []
        for m in s.masks:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            regions.append({"rle": {"size": list(rle["size"]), "counts": rle["counts"].decode()}})
        body = {"image": image_b64(5), "regions": regions, "tasks": ["category", "short"],
                "max_new_tokens": 6}  # fmt: skip
        answers = {}
        for name, app in apps.items():
            response = app.post("/v1/describe", json=body)
            assert response.status_code == 200, response.text
            answers[name] = response.json()["answers"]
        assert answers["adapter"] == answers["merged"]
        base_answers = serve_app.post("/v1/describe", json=body).json()["answers"]
        assert json.dumps(base_answers) != json.dumps(answers["adapter"])
    finally:
        for name in ("lora-adapter", "lora-merged"):
            serve.delete(name)


def test_finetune_flags_make_the_stage_config():
    from osprey.cli import build_parser
    from osprey.train.finetune import finetune_stage

    def stage(*flags):
        args = build_parser().parse_args(
            ["finetune", "--model", "m", "--data", "a", "b", "--name", "n", *flags]
        )
        return finetune_stage(args, "/models/base", "/run")

    lora = stage("--preset", "tiny", "--rank", "4", "--targets", "q_proj", "v_proj",
                 "--train-parts", "--set", "lora.alpha=2")  # fmt: skip
    assert lora.name == "finetune-lora" and lora.init == "/models/base"
    assert lora.data == ("a", "b") and lora.trains == ()
    assert (lora.lora.rank, lora.lora.alpha, lora.lora.target_modules) == (
        4,
        2,
        ("q_proj", "v_proj"),
    )
    full = stage("--method", "full")
    assert full.lora is None and full.trains == ("projector", "mask_extractor", "llm")
    assert (full.lr, full.global_batch_size, full.epochs) == (1e-5, 4, 2)  # stage 3's (OSPREY.md)
    assert stage("--method", "qlora").lora.quantize_4bit
