"""What every segmenter takes and checks: the image, point and box prompts, the interface."""

from __future__ import annotations

from collections.abc import Sequence
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
