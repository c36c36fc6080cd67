"""What a stage trains: everything else is frozen (the vision tower always is). LoRA adapters,
when the model has them, always train."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from osprey.model.adapter import mark_adapters_trainable
from osprey.model.modeling import OspreyForCausalLM


def part_modules(model: OspreyForCausalLM) -> dict[str, list[nn.Module]]:
    llm = [model.model.embed_tokens, model.model.layers, model.model.norm, model.lm_head]
    return {
        "projector": [model.model.mm_projector],
        "mask_extractor": [model.mask_extractor],
        "llm": llm,
    }


def apply_trainable(model: OspreyForCausalLM, trains: Iterable[str]) -> dict[str, int]:
    """Freeze the whole model, then unfreeze the named parts and any adapters; returns
    parameter counts."""
    trains = set(trains)
    parts = part_modules(model)
    unknown = trains - set(parts)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(parts)}")
    model.requires_grad_(False)
    for name in trains:
        for module in parts[name]:
            module.requires_grad_(True)
    mark_adapters_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable": trainable,
        "frozen": sum(p.numel() for p in model.parameters()) - trainable,
    }
