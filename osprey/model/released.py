"""The config of a released Osprey checkpoint (sunshine-lwt/Osprey-7b's layout).

Its config.json is a LLaMA config with `model_type: osprey` and LLaVA's `mm_*` fields; the image
tower and the mask extractor are fixed in the reference code, not described. Their sizes are
therefore read off the weights the directory carries (tensor shapes only, nothing loaded), so a
checkpoint of the same layout at other sizes (the test suite's tiny one) loads too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from osprey.model.config import OspreyConfig, osprey_7b

LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
TRUNK = "model.vision_tower.vision_tower.visual.trunk."
HEAD_FC2 = "model.vision_tower.vision_tower.visual.head.mlp.fc2.weight"
# timm ConvNeXt variants by (stage widths, stage depths); convnext_large is the release's.
CONVNEXTS = {
    ((40, 80, 160, 320), (2, 2, 6, 2)): "convnext_atto",
    ((48, 96, 192, 384), (2, 2, 6, 2)): "convnext_femto",
    ((64, 128, 256, 512), (2, 2, 6, 2)): "convnext_pico",
    ((80, 160, 320, 640), (2, 2, 8, 2)): "convnext_nano",
    ((96, 192, 384, 768), (3, 3, 9, 3)): "convnext_tiny",
    ((96, 192, 384, 768), (3, 3, 27, 3)): "convnext_small",
    ((128, 256, 512, 1024), (3, 3, 27, 3)): "convnext_base",
    ((192, 384, 768, 1536), (3, 3, 27, 3)): "convnext_large",
    ((256, 512, 1024, 2048), (3, 3, 27, 3)): "convnext_xlarge",
}
_BLOCK = re.compile(r"stages\.(\d)\.blocks\.(\d+)\.")


def released_config(
    data: dict, shapes: Callable[[], dict[str, tuple[int, ...]]] | None = None
) -> OspreyConfig:
    """An OspreyConfig from a released config.json; `shapes()` gives the weights' shapes."""
    projector = data.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ValueError(f"config.json: mm_projector_type {projector!r}; Osprey uses mlp2x_gelu")
    config = osprey_7b()
    config.name = str(data.get("_name_or_path") or "released")
    for name in LLAMA_FIELDS:
        if data.get(name) is not None:
            setattr(config.llm, name, data[name])
    if config.llm.num_key_value_heads is None or "num_key_value_heads" not in data:
        config.llm.num_key_value_heads = config.llm.num_attention_heads
    # <mask> and <pos> are the first two ids after the base vocabulary (32000/32001).
    config.mask_token_id = config.llm.vocab_size
    config.pos_token_id = config.llm.vocab_size + 1
    found = shapes() if shapes is not None else {}
    if any(k.startswith(TRUNK) for k in found):
        _vision_from_shapes(config, found)
    if "mask_extractor.res2.weight" in found:
        config.mask_extractor.embed_dim = found["mask_extractor.res2.weight"][0]
        side = math.isqrt(found["mask_extractor.mask_linear.layers.0.weight"][1])
        config.mask_extractor.spatial_size = side
    hidden = data.get("mm_hidden_size")
    if hidden is not None and hidden != config.vision.image_token_channels:
        raise ValueError(
            f"config.json: mm_hidden_size {hidden} but the tower's res4 has "
            f"{config.vision.image_token_channels} channels"
        )
    return config


def _vision_from_shapes(config: OspreyConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    widths = tuple(shapes[f"{TRUNK}stages.{i}.blocks.0.conv_dw.weight"][0] for i in range(4))
    blocks: dict[int, set[int]] = {i: set() for i in range(4)}
    for key in shapes:
        if key.startswith(TRUNK) and (m := _BLOCK.search(key)):
            blocks[int(m.group(1))].add(int(m.group(2)))
    depths = tuple(len(blocks[i]) for i in range(4))
    name = CONVNEXTS.get((widths, depths))
    if name is None:
        raise ValueError(
            f"released checkpoint: an image tower with widths {widths} and depths {depths} is "
            "not a timm ConvNeXt this loader knows"
        )
    config.vision.timm_model_name = name
    config.vision.channels = widths
    if HEAD_FC2 in shapes:
        config.vision.embed_dim = shapes[HEAD_FC2][0]


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model directory's tensors, read without loading them."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        shapes.update(_file_shapes(path / name))
    return shapes


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    import torch

    # mmap: the tensors stay on disk; only their headers are read.
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}
