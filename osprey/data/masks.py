"""Mask codecs: every annotation form decodes through pycocotools, every mask is stored as RLE."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Binary HxW mask -> a shard region dict (counts, size, bbox, area); category left to caller."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "counts": rle["counts"],
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
    }


def decode_region(region: dict[str, Any]) -> np.ndarray:
    """A shard region -> uint8 HxW mask."""
    counts = region["counts"]
    if isinstance(counts, str):
        counts = counts.encode()
    return mask_utils.decode({"size": list(region["size"]), "counts": counts})


def annotation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """COCO `segmentation` (polygons, uncompressed RLE or compressed RLE) -> compressed RLE."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")
    return rle


def annotation_to_region(
    segmentation: Any, height: int, width: int, category: str | None = None
) -> dict[str, Any]:
    """COCO `segmentation` -> a shard region dict, decoded once so bbox/area are exact."""
    mask = mask_utils.decode(annotation_to_rle(segmentation, height, width))
    region = encode_mask(mask)
    region["category"] = category
    return region
