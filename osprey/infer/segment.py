"""Segment everything: the regions the captioner describes.

Two segmenters share one interface (`segment`, `from_points`, `from_boxes`, all returning
`Region`s in the upright image's pixel grid, largest first):

- `SamSegmenter`: SAM's automatic mask generation on transformers' `SamModel`, loaded from a
  local weights directory. A grid of `points_per_side`**2 single-point prompts, three masks per
  point, kept when the predicted IoU exceeds `pred_iou_thresh` and the stability score (the IoU
  of the mask thresholded at +-`stability_score_offset` around `mask_threshold`) exceeds
  `stability_score_thresh`, then box NMS at `box_nms_thresh`; `min_mask_region_area` removes
  small islands and holes. The defaults are SAM's (`SamAutomaticMaskGenerator`), which the
  reference demo uses.
- `ClassicalSegmenter`, the default when no SAM weights are configured, so the job runs anywhere
  offline: Felzenszwalb-Huttenlocher graph segmentation of the colours (scikit-image), then each
  segment is split where a distance-transform watershed finds several cores (two touching shapes
  of the same colour), and segments under `min_area_fraction` of the image are dropped. It works
  at `max_side` pixels and scales masks back to full size. It has no scores (None).

This module holds the interface and the configs; the segmenters live in osprey.infer.classical
and osprey.infer.sam (which alone imports torch and transformers) and are importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from osprey.infer.regions import Region

ImageInput = Image.Image | np.ndarray


def as_rgb(image: ImageInput) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image


class Segmenter(Protocol):
    def segment(self, image: ImageInput) -> list[Region]: ...

    def from_points(self, image: ImageInput, points: Sequence[Sequence[float]]) -> list[Region]: ...

    def from_boxes(self, image: ImageInput, boxes: Sequence[Sequence[float]]) -> list[Region]: ...


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ClassicalConfig:
    """Felzenszwalb segmentation plus watershed splitting (see the module docstring)."""

    # Longer side the segmentation runs at; masks are scaled back to the image's full size.
    max_side: int = 512
    # Felzenszwalb's scale (higher: larger segments) and pre-smoothing; sigma 0 keeps the hard
    # edges of flat-colour images, raise it (0.5-0.8) for noisy photos.
    scale: float = 100.0
    sigma: float = 0.0
    # Segments smaller than this fraction of the image are merged (Felzenszwalb) or dropped.
    min_area_fraction: float = 0.002
    # Split a segment where its distance transform has several maxima at least this deep
    # (a fraction of the longer side); 0 turns splitting off.
    split_depth: float = 0.03

    def __post_init__(self) -> None:
        if self.max_side < 16:
            raise ValueError(f"classical max_side must be >= 16, got {self.max_side}")
        if self.scale <= 0 or self.sigma < 0:
            raise ValueError(
                f"classical scale must be > 0 and sigma >= 0, got {self.scale}, {self.sigma}"
            )
        if not 0 <= self.min_area_fraction < 1:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction}")
        if self.split_depth < 0:
            raise ValueError(f"split_depth must be >= 0, got {self.split_depth}")


@dataclass(kw_only=True)
class SamConfig:
    """SAM automatic mask generation; defaults are SamAutomaticMaskGenerator's."""

    weights: str  # a local directory holding a transformers SamModel (and its image processor)
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    # Islands and holes smaller than this many pixels are removed (0: off, SAM's default).
    min_mask_region_area: int = 0
    device: str = "cpu"
    # Masks upscaled to full size at once are limited to this many bytes of float32.
    upscale_budget_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("sam weights: give the local SamModel directory")
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError(
                f"points_per_side and points_per_batch must be >= 1, got "
                f"{self.points_per_side}, {self.points_per_batch}"
            )
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"sam {name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")


@dataclass(kw_only=True)
class SegmenterConfig:
    """SAM when `sam` is set, else the classical segmenter."""

    sam: SamConfig | None = None
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)

    @property
    def backend(self) -> str:
        return "sam" if self.sam is not None else "classical"

    def build(self) -> Segmenter:
        if self.sam is not None:
            from osprey.infer.sam import SamSegmenter

            return SamSegmenter(self.sam)
        from osprey.infer.classical import ClassicalSegmenter

        return ClassicalSegmenter(self.classical)


def check_points(
    points: Sequence[Sequence[float]], size: tuple[int, int]
) -> list[tuple[float, float]]:
    """(x, y) points as floats; ValueError for one that is malformed or off the image."""
    height, width = size
    out = []
    for p in points:
        if len(p) != 2:
            raise ValueError(f"a point is (x, y), got {p!r}")
        x, y = float(p[0]), float(p[1])
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point {p!r} lies outside the {width}x{height} image")
        out.append((x, y))
    return out


def check_boxes(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> list[tuple[float, ...]]:
    """[x0, y0, x1, y1] boxes clipped to the image; ValueError for a malformed or empty one."""
    height, width = size
    out = []
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"a box is [x0, y0, x1, y1], got {b!r}")
        x0, y0, x1, y1 = (float(v) for v in b)
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        x1, y1 = min(x1, float(width)), min(y1, float(height))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {b!r} is empty inside the {width}x{height} image")
        out.append((x0, y0, x1, y1))
    return out


_LAZY = {
    "ClassicalSegmenter": "osprey.infer.classical",
    "SamSegmenter": "osprey.infer.sam",
    "stability_score": "osprey.infer.sam",
}


def __getattr__(name: str):
    # Lazy: importing the configs must not import torch (the job's driver and light workers).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'osprey.infer.segment' has no attribute {name!r}")
