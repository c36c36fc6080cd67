"""Reading released weights and saving/loading our own checkpoint directories.

Our checkpoint directory is HF-shaped: `config.json` (LLaMA fields plus the full Osprey config
under "osprey"), `model.safetensors` (or shards with `model.safetensors.index.json`) and the
tokenizer files. Released Osprey directories (`pytorch_model-*.bin` + index) load too, with
strict key matching.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from osprey.model.config import OspreyConfig

# Buffers the release persisted and newer transformers recompute: accepted and dropped.
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
PROJECTOR_PREFIX = "model.mm_projector."
VISION_PREFIX = "model.vision_tower.vision_tower."


class CheckpointKeyError(KeyError):
    """Strict loading failed; the message names the missing and unexpected keys."""

    def __str__(self) -> str:
        return str(self.args[0])


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a torch pickle read with weights_only=True."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and len(state) <= 3:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A weights file, or a directory holding one file or a sharded index."""
    path = Path(path)
    if path.is_file():
        return load_tensor_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no weights at {path}")
    for index_name in INDEX_FILES:
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_tensor_file(path / shard))
            return state
    for name in SINGLE_FILES:
        if (path / name).exists():
            return load_tensor_file(path / name)
    raise FileNotFoundError(
        f"{path}: no weights found (looked for {', '.join(INDEX_FILES + SINGLE_FILES)})"
    )


def drop_legacy_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(DROPPED_SUFFIXES)}


def _describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    expected: Iterable[str] | None = None,
) -> None:
    """Load `state` into `module`, failing with the names of missing/unexpected keys.

    `expected` restricts the check to a subset of the module's keys (e.g. only the LLM's).
    """
    state = drop_legacy_buffers(state)
    own = module.state_dict()
    wanted = set(own) if expected is None else set(expected)
    missing = wanted - set(state)
    unexpected = set(state) - wanted
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if problems:
        raise CheckpointKeyError(f"{source} does not match the model: " + "; ".join(problems))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in wanted
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong shape: " + "; ".join(sorted(wrong)))
    module.load_state_dict(state, strict=expected is None, assign=_on_meta(module))


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def load_released(model: nn.Module, path: str | os.PathLike) -> None:
    """A released Osprey(-Chat)-7B directory (or our own) into `model`, strictly."""
    load_strict(model, read_state_dict(path), source=str(path))


def load_llm(model: nn.Module, path: str | os.PathLike) -> None:
    """A Vicuna (LlamaForCausalLM) directory into the LLM part of `model`."""
    state = drop_legacy_buffers(read_state_dict(path))
    keys = [k for k in model.state_dict() if k.startswith(LLM_PREFIXES)]
    load_strict(model, state, source=str(path), expected=keys)


def load_projector(model: nn.Module, path: str | os.PathLike) -> None:
    """A stage-1 `mm_projector.bin` (keys `model.mm_projector.*`) into the projector."""
    state = read_state_dict(path)
    state = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if PROJECTOR_PREFIX in k}
    if not state:
        raise CheckpointKeyError(f"{path}: no '{PROJECTOR_PREFIX}*' keys")
    load_strict(model.model.mm_projector, state, source=str(path))


def load_clip(vision_tower: nn.Module, path: str | os.PathLike) -> None:
    """open_clip's `open_clip_pytorch_model.bin`: its `visual.*` keys into the image tower.

    The text tower's keys are expected and ignored: Osprey builds only the image tower.
    """
    state = read_state_dict(path)
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise CheckpointKeyError(f"{path}: no 'visual.*' keys; is it an open_clip checkpoint?")
    load_strict(vision_tower.vision_tower, visual, source=str(path))


# ---- our own checkpoint directories ------------------------------------------------------


def config_to_json(config: OspreyConfig) -> dict:
    llama = config.llm.to_llama_config().to_dict()
    llama.update(architectures=["OspreyForCausalLM"], osprey=config.to_dict())
    return llama


def config_from_json(data: dict, shapes=None) -> OspreyConfig:
    """Our config.json, or a released one (osprey.model.released; `shapes()` gives the
    directory's tensor shapes, from which the release's fixed parts are sized)."""
    if "osprey" in data:
        return OspreyConfig.from_dict(data["osprey"])
    from osprey.model.released import released_config

    return released_config(data, shapes)


def read_config(path: str | os.PathLike) -> OspreyConfig:
    from osprey.model.released import weight_shapes

    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a model directory")
    return config_from_json(json.loads(file.read_text()), lambda: weight_shapes(path))


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write config.json, safetensors weights (sharded when large) and the tokenizer."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config_to_json(model.config), indent=2))
    state = {k: _own_storage(v.detach()) for k, v in model.state_dict().items()}
    save_torch_state_dict(state, out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    # DeepSpeed keeps trainable weights as views into one flat buffer; safetensors refuses those.
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor.contiguous()
