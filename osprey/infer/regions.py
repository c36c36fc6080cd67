"""Regions found in an image: an RLE mask with its box, area and segmentation scores.

Masks travel as COCO compressed RLE (pycocotools), never as pixel arrays, so that a hundred
masks of a 12-megapixel photo cost kilobytes between pipeline stages; `RleMasks` decodes them
one at a time where pixels are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


@dataclass(frozen=True, slots=True)
class Region:
    """One mask of an image (in the upright image's pixel grid) and how sure the segmenter is."""

    counts: bytes = field(repr=False)  # COCO compressed RLE
    size: tuple[int, int]  # (height, width)
    bbox: tuple[float, float, float, float]  # COCO [x, y, w, h]
    area: int
    # SAM's predicted mask IoU and stability score; None when the segmenter has none.
    predicted_iou: float | None = None
    stability_score: float | None = None

    @classmethod
    def from_mask(
        cls,
        mask: np.ndarray,
        predicted_iou: float | None = None,
        stability_score: float | None = None,
    ) -> Region:
        if mask.ndim != 2:
            raise ValueError(f"a region mask must be 2-D (H, W), got shape {mask.shape}")
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
        return cls(
            counts=rle["counts"],
            size=(int(rle["size"][0]), int(rle["size"][1])),
            bbox=tuple(float(v) for v in mask_utils.toBbox(rle)),
            area=int(mask_utils.area(rle)),
            predicted_iou=None if predicted_iou is None else float(predicted_iou),
            stability_score=None if stability_score is None else float(stability_score),
        )

    @classmethod
    def from_rle(cls, rle: dict[str, Any]) -> Region:
        """A region from a COCO compressed RLE ({"size": [h, w], "counts": text or bytes}), as
        users and the Serve API give masks; ValueError when it is not one."""
        try:
            counts = rle["counts"]
            size = [int(v) for v in rle["size"]]
            if len(size) != 2 or not isinstance(counts, str | bytes):
                raise TypeError
            coded = {
                "size": size,
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
            bbox = mask_utils.toBbox(coded)
            area = mask_utils.area(coded)
        except (KeyError, TypeError, ValueError, UnicodeError) as exc:
            raise ValueError(f"not a COCO RLE mask ({type(exc).__name__}: {exc})") from None
        return cls(
            counts=coded["counts"],
            size=(size[0], size[1]),
            bbox=tuple(float(v) for v in bbox),
            area=int(area),
        )

    @property
    def rle(self) -> dict[str, Any]:
        return {"size": list(self.size), "counts": self.counts}

    def mask(self) -> np.ndarray:
        """The (H, W) uint8 mask."""
        return mask_utils.decode(self.rle)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (RLE counts as ASCII text), for passing between pipeline stages."""
        return {
            "counts": self.counts.decode("ascii"),
            "size": list(self.size),
            "bbox": list(self.bbox),
            "area": self.area,
            "predicted_iou": self.predicted_iou,
            "stability_score": self.stability_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        counts = data["counts"]
        return cls(
            counts=counts.encode("ascii") if isinstance(counts, str) else bytes(counts),
            size=(int(data["size"][0]), int(data["size"][1])),
            bbox=tuple(float(v) for v in data["bbox"]),
            area=int(data["area"]),
            predicted_iou=data.get("predicted_iou"),
            stability_score=data.get("stability_score"),
        )


class RleMasks(Sequence[np.ndarray]):
    """Regions seen as a sequence of (H, W) uint8 masks, each decoded only when indexed."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.regions = list(regions)

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self.regions[i].mask() for i in range(*index.indices(len(self)))]
        return self.regions[index].mask()


def sort_regions(regions: list[Region]) -> list[Region]:
    """Largest first, then by position: a fixed order, so mask indices are reproducible."""
    return sorted(regions, key=lambda r: (-r.area, r.bbox[1], r.bbox[0]))
