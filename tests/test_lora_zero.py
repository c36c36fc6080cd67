"""LoRA under DeepSpeed ZeRO-3 (one gloo process, the training loop's own engine builder): only
adapters and the chosen parts step, a checkpoint resumes them exactly, and the exported adapter
folder carries the trained values."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import free_port

from osprey.train.config import StageConfig

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def one_process_group(monkeypatch):
    import torch.distributed as dist

    from osprey.train.loop import tools_first

    # DeepSpeed builds its CPU op with the ninja beside this interpreter (as the workers do).
    monkeypatch.setenv(
        "PATH", tools_first(os.environ["PATH"], os.path.dirname(os.path.abspath(sys.executable)))
    )
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
        LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    ).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def batch(model):
    from test_adapter import region_batch

    ids, images, masks = region_batch(model)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, images, masks, labels


def gathered_trainable(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone() for n, p in named}


def test_lora_zero3_steps_resumes_and_exports(one_process_group, tmp_path):
    from safetensors.torch import load_file

    from osprey.infer.tiny import write_tiny_model
    from osprey.model.adapter import ADAPTER_WEIGHTS, MODULES_FILE, PEFT_PREFIX
    from osprey.train.loop import DS_TAG, _export, build_engine

    base = write_tiny_model(tmp_path / "base")
    stage = StageConfig(
        name="finetune-lora", trains=["mask_extractor"], lora={"rank": 4, "dropout": 0.0},
        init=str(base), tokenizer=str(base), zero_stage=3, lr=1e-2,
        global_batch_size=2, micro_batch_size=2,
    )  # fmt: skip
    engine, _, _ = build_engine(stage, world=1, total_steps=4, on_gpu=False)
    before = gathered_trainable(engine)
    assert before and all("lora_" in n or n.startswith("mask_extractor.") for n in before)
    ids, images, masks, labels = batch(engine.module)
    for _ in range(2):
        out = engine(input_ids=ids, images=images, masks=masks, labels=labels)
        engine.backward(out.loss)
        engine.step()
    trained = gathered_trainable(engine)
    assert any(not torch.equal(before[n], trained[n]) for n in before if "lora_B" in n)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag=DS_TAG, exclude_frozen_parameters=True)

    resumed, _, _ = build_engine(stage, world=1, total_steps=4, on_gpu=False)
    resumed.load_checkpoint(str(tmp_path / "ckpt"), tag=DS_TAG, load_module_strict=False)
    again = gathered_trainable(resumed)
    assert all(torch.equal(trained[n], again[n]) for n in trained)

    _export(resumed, stage, str(tmp_path / "adapter"), rank=0)
    saved = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    saved.update(load_file(str(tmp_path / "adapter" / MODULES_FILE)))
    for name, value in trained.items():
        key = PEFT_PREFIX + name.replace(".default", "") if "lora_" in name else name
        assert torch.equal(saved[key], value), name
