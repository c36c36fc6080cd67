"""`osprey train --dry-run` (osprey.train.sizing): the osprey-7b stage-3 plan against counts
computed here from the architecture in OSPREY.md, and the verdict on a cluster too small."""

from __future__ import annotations

import pytest

from osprey.train.config import load_stage_config
from osprey.train.sizing import ClusterShape, plan_stage, stage_model

H, FFN, LAYERS, VOCAB = 4096, 11008, 32, 32000  # Vicuna-7B v1.5


def llama_params() -> int:
    per_layer = 4 * H * H + 3 * H * FFN + 2 * H  # q k v o, gate up down, two RMSNorms
    return 2 * VOCAB * H + LAYERS * per_layer + H  # embeddings, lm_head, layers, final norm


def projector_params() -> int:
    return (768 * H + H) + (H * H + H)  # mlp2x_gelu from res4's 768 channels


def mask_extractor_params() -> int:
    levels = sum(c * 1024 + 1024 for c in (192, 384, 768, 1536))
    feat_linear = 1024 * H + H
    spatial = (112 * 112 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * H + H)
    return levels + feat_linear + spatial


def convnext_large_tower_params() -> int:
    """open_clip convnext_large_d_320's image tower: timm ConvNeXt-L plus the mlp head."""
    dims, depths = (192, 384, 768, 1536), (3, 3, 27, 3)
    n = 3 * dims[0] * 4 * 4 + dims[0] + 2 * dims[0]  # stem: 4x4 conv, LayerNorm
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        if i:
            n += 2 * dims[i - 1] + 4 * dims[i - 1] * c + c  # downsample: LayerNorm, 2x2 conv
        # block: 7x7 depthwise conv, LayerNorm, fc1 C->4C, fc2 4C->C, layer-scale gamma
        n += depth * ((49 * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c) + c)
    n += 2 * dims[-1]  # trunk head norm
    n += (1536 * 1536 + 1536) + 1536 * 768  # open_clip head: fc1 (bias), fc2 (no bias)
    return n


@pytest.fixture(scope="module")
def stage3():
    return load_stage_config("osprey-7b/stage3", output_dir="/nonexistent")


@pytest.fixture(scope="module")
def model(stage3):
    """The stage's model on the meta device, built once for the module."""
    return stage_model(stage3)


def test_osprey_7b_stage3_plan_matches_hand_counts(stage3, model):
    trainable = llama_params() + projector_params() + mask_extractor_params()
    frozen = convnext_large_tower_params()
    cluster = ClusterShape(nodes=1, gpus_per_node=4, gpu_memory_gib=80)
    plan = plan_stage(stage3, cluster, model=model, rows=1000)
    assert (plan.trainable, plan.frozen) == (trainable, frozen)
    assert trainable == 6_783_592_448  # LLaMA-7B's 6,738,415,616 plus the Osprey modules
    # Paper's recipe: global batch 4 on 4 GPUs, micro 1, no accumulation; 2 epochs.
    assert (plan.global_batch, plan.micro_batch, plan.accumulation) == (4, 1, 1)
    assert (plan.steps_per_epoch, plan.planned_steps) == (250, 500)
    # ZeRO-2 without offload: 2 bytes of bf16 weights plus 18 bytes per trainable parameter
    # shared by the GPUs (grads, fp32 master, Adam moments), frozen weights whole in bf16.
    assert plan.memory[2].model_states == 2 * trainable + int(18 * trainable / 4) + 2 * frozen
    # ZeRO-3 partitions everything, frozen weights too.
    assert plan.memory[3].model_states < plan.memory[2].model_states
    # Gradient checkpointing (the stage's setting) keeps far less than the full activations.
    assert plan.memory[2].activations == plan.memory[2].activations_checkpointed
    assert plan.memory[2].activations_full > 5 * plan.memory[2].activations_checkpointed
    assert plan.fits and plan.verdict == "fits"  # the paper trained on 4 A100-80GB


def test_a_cluster_too_small_does_not_fit(stage3, model, capsys):
    from osprey.cli import main

    status = main([
        "train", "--config", "osprey-7b/stage3", "--dry-run", "--gpus-per-node", "1",
        "--gpu-memory", "24", "--rows", "100", "--output-dir", "/nonexistent",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 1
    assert "verdict: does not fit" in out and "try:" in out
    assert "6,783,592,448 trainable" in out and "accumulation" in out

    # A global batch the GPUs cannot split is a problem too, named with its fix.
    plan = plan_stage(stage3, ClusterShape(nodes=1, gpus_per_node=8), model=model)
    assert not plan.fits and "not a multiple" in plan.problems[0]
    assert any("global_batch_size" in a for a in plan.advice)


def test_checkpointing_is_advised_when_it_alone_would_fit(stage3, model):
    import dataclasses

    without = dataclasses.replace(stage3, gradient_checkpointing=False)
    cluster = ClusterShape(nodes=1, gpus_per_node=4, gpu_memory_gib=56)
    plan = plan_stage(without, cluster, model=model)
    assert not plan.fits and plan.advice[0] == "--set gradient_checkpointing=true"
    assert plan_stage(stage3, cluster, model=model).fits
