"""LoRA adapters on the LLM's projections (through `peft`), saved, loaded and merged.

The adapters are injected into the model in place (`peft.inject_adapter_in_model`), so the model
keeps its own class, forward and generation; nothing else needs to know they are there. An
adapter folder holds:

- `adapter_config.json` and `adapter_model.safetensors`: peft's own format (keys as
  `PeftModel.save_pretrained` writes them), loadable by `PeftModel.from_pretrained`;
- `osprey_modules.safetensors`: the parts trained fully beside the adapters (mask extractor,
  projector), when any were;
- `osprey_adapter.json`: which parts those are, and the base model it was trained from.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULES_FILE = "osprey_modules.safetensors"
META_FILE = "osprey_adapter.json"
# PeftModel wraps the model in a LoraModel: its saved keys carry this prefix.
PEFT_PREFIX = "base_model.model."
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Parts that may be trained fully beside the adapters, and their module paths.
FULL_PARTS = {"projector": "model.mm_projector", "mask_extractor": "mask_extractor"}


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA on the LLM's attention and MLP projections (the vision tower never has adapters)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLM_PROJECTIONS
    # 4-bit NF4 base weights (bitsandbytes) under the adapters: needs a CUDA GPU.
    quantize_4bit: bool = False

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.target_modules) - set(LLM_PROJECTIONS)
        if unknown or not self.target_modules:
            raise ValueError(
                f"lora.target_modules: {sorted(unknown) or 'none given'}; choose from "
                f"{list(LLM_PROJECTIONS)}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        known = {"rank", "alpha", "dropout", "target_modules", "quantize_4bit"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown lora keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def peft_config(self):
        import peft

        # A regex (full match) so only the LLaMA layers' projections are adapted.
        pattern = rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(self.target_modules)})"
        return peft.LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=pattern, bias="none",
        )  # fmt: skip


@dataclass
class AdapterMeta:
    """What an adapter folder was trained with, beside peft's own config."""

    lora: dict[str, Any]
    full_parts: list[str] = field(default_factory=list)
    base_model: str | None = None


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Inject fresh adapters (B = 0, so the model's outputs are unchanged) into `model`."""
    from peft import inject_adapter_in_model

    if config.quantize_4bit:
        quantize_llm_4bit(model, config)
    inject_adapter_in_model(config.peft_config(), model)
    return model


def quantize_llm_4bit(model: nn.Module, config: LoraConfig) -> None:
    """Swap the adapted LLM projections for bitsandbytes NF4 layers (QLoRA's base)."""
    if not torch.cuda.is_available():
        raise ValueError(
            "lora.quantize_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers do not run "
            "on the CPU; set lora.quantize_4bit=false (plain LoRA) or train with --gpu"
        )
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError(
            "lora.quantize_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    pattern = re.compile(
        rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(config.target_modules)})"
    )
    device = torch.device("cuda", torch.cuda.current_device())
    for name, module in list(model.named_modules()):
        if not (pattern.fullmatch(name) and isinstance(module, nn.Linear)):
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=torch.bfloat16, quant_type="nf4", device=device,
        )  # fmt: skip
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data.to(torch.float16), requires_grad=False, quant_type="nf4"
        ).to(device)
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data.to(device), requires_grad=False)
        _set_submodule(model, name, quantized)


def mark_adapters_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's saved names."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: LoraConfig,
    full_parts: tuple[str, ...] | list[str] = (),
    base_model: str | None = None,
) -> Path:
    """Write the adapter folder (see the module docstring); returns it."""
    from safetensors.torch import save_file

    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_config = config.peft_config()
    peft_config.save_pretrained(str(out))
    save_file(adapter_state(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    full = _full_part_state(model, full_parts)
    if full:
        save_file(full, str(out / MODULES_FILE), metadata={"format": "pt"})
    meta = AdapterMeta(lora=config.to_dict(), full_parts=list(full_parts), base_model=base_model)
    (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
    return out


def read_adapter_meta(adapter_dir: str | os.PathLike) -> AdapterMeta:
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).exists() or not (path / META_FILE).exists():
        raise FileNotFoundError(
            f"{path}: not an adapter folder (needs {ADAPTER_CONFIG} and {META_FILE})"
        )
    return AdapterMeta(**json.loads((path / META_FILE).read_text()))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Inject the folder's adapters into `model` (unmerged) and load every weight it holds."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from osprey.model.checkpoint import load_strict

    path = Path(adapter_dir)
    meta = read_adapter_meta(path)
    lora = LoraConfig.from_dict({**meta.lora, "quantize_4bit": False})
    inject_adapter_in_model(lora.peft_config(), model)
    state = load_file(str(path / ADAPTER_WEIGHTS))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    expected = {k.replace(".default", "") for k in _adapter_keys(model)}
    if set(state) != expected:
        raise ValueError(
            f"{path}: adapter weights do not match the model's layers (missing "
            f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}); "
            "was it trained on a model of this shape?"
        )
    for key, value in state.items():
        own = model.get_parameter(key.replace(".weight", ".default.weight"))
        if own.shape != value.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, model {tuple(own.shape)}"
            )
    set_peft_model_state_dict(model, state)
    if meta.full_parts:
        full = load_file(str(path / MODULES_FILE))
        for part in meta.full_parts:
            prefix = FULL_PARTS[part] + "."
            sub = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
            load_strict(model.get_submodule(FULL_PARTS[part]), sub, source=str(path))
    model.requires_grad_(False)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the adapter layers: the model is then
    plain again (its state dict is our checkpoint format)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    for name, layer in layers.items():
        if layer.__class__.__module__.startswith("peft.tuners.lora.bnb"):
            raise ValueError("merging a 4-bit (QLoRA) model: load the adapter on the full base")
        layer.merge()
        _set_submodule(model, name, layer.get_base_layer())
    return model


def count_adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _adapter_keys(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def _full_part_state(model: nn.Module, parts) -> dict[str, torch.Tensor]:
    state = {}
    for part in parts:
        if part not in FULL_PARTS:
            raise ValueError(f"full part {part!r}: choose from {sorted(FULL_PARTS)}")
        prefix = FULL_PARTS[part]
        for key, value in model.get_submodule(prefix).state_dict().items():
            state[f"{prefix}.{key}"] = value.detach().cpu().contiguous().clone()
    return state


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)
