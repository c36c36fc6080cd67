"""The DeepSpeed config of a stage: the repo's ZeRO file plus batch sizes, precision, clipping."""

from __future__ import annotations

import json
from typing import Any

from osprey.train.config import CONFIG_DIR, StageConfig


def use_bf16(stage: StageConfig, on_gpu: bool) -> bool:
    if stage.precision == "auto":
        return on_gpu
    return stage.precision == "bf16"


def deepspeed_config(stage: StageConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    zero = 3 if stage.zero_stage == 3 else 2
    config = json.loads((CONFIG_DIR / f"zero{zero}.json").read_text())
    config["zero_optimization"]["stage"] = stage.zero_stage
    accumulation = stage.accumulation_steps(world_size)
    config.update(
        train_batch_size=stage.global_batch_size,
        train_micro_batch_size_per_gpu=stage.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        bf16={"enabled": use_bf16(stage, on_gpu)},
        fp16={"enabled": False},
        gradient_clipping=stage.gradient_clipping,
    )
    return config
