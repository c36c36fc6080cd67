"""Building a model from a preset or config, and loading one from a directory."""

from __future__ import annotations

import os

import torch

from osprey.model import checkpoint
from osprey.model.config import OspreyConfig, get_config
from osprey.model.modeling import OspreyForCausalLM

# What open_clip's hub repositories (e.g. the LAION ConvNeXt-L) and stage-1 folders hold.
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")


def build_model(
    preset_or_config: str | OspreyConfig = "tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> OspreyForCausalLM:
    """A new Osprey model; base weights named in the config (CLIP, Vicuna, stage-1 projector)
    are loaded from their local paths. On the meta device nothing is allocated or loaded."""
    config = get_config(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = OspreyForCausalLM(config)
    if str(device) != "meta":
        from osprey.io.models import resolve_model_dir, resolve_weights_file

        # Each may be a local path, a hub id, an s3:// prefix or a registered model.
        if config.vision.weights:
            clip = resolve_weights_file(config.vision.weights, CLIP_FILES)
            checkpoint.load_clip(model.vision_tower, clip)
        if config.llm.weights:
            checkpoint.load_llm(model, resolve_model_dir(config.llm.weights))
        if config.projector_weights:
            projector = resolve_weights_file(config.projector_weights, PROJECTOR_FILES)
            checkpoint.load_projector(model, projector)
    if dtype is not None:
        model.to(dtype)
    return model


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    adapter: str | os.PathLike | None = None,
) -> OspreyForCausalLM:
    """A checkpoint (ours, or a released Osprey-7B / Osprey-Chat-7B) -> model. `path` is a
    directory or any name osprey.io.models resolves (hub id, s3://, models:/); with `adapter`
    (a LoRA adapter folder), its adapters applied unmerged."""
    from osprey.io.models import resolve_model_dir

    path = resolve_model_dir(str(path))
    config = checkpoint.read_config(path)
    # The directory holds every weight: the base-weight paths of the config must not reload.
    config.vision.weights = config.llm.weights = config.projector_weights = None
    with torch.device("meta"):
        model = OspreyForCausalLM(config)
    checkpoint.load_released(model, path)
    # Buffers that checkpoints do not carry (rotary frequencies) are rebuilt off the meta device.
    model = _materialise_buffers(model, config)
    if adapter is not None:
        from osprey.model.adapter import load_adapter

        load_adapter(model, adapter)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _materialise_buffers(model: OspreyForCausalLM, config: OspreyConfig) -> OspreyForCausalLM:
    fresh = None
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if fresh is None:
                with torch.device("cpu"):
                    fresh = dict(
                        type(model.model.rotary_emb)(config.llm.to_llama_config()).named_buffers()
                    )
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if leaf not in fresh:
                raise RuntimeError(f"buffer {name} was not in the checkpoint and cannot be rebuilt")
            owner.register_buffer(leaf, fresh[leaf].clone(), persistent=False)
    return model
