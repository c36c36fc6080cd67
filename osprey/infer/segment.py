"""Segment everything: the regions the captioner describes.

Two segmenters share one interface (`segment`, `from_points`, `from_boxes`, all returning
`Region`s in the upright image's pixel grid, largest first):

- `SamSegmenter`: SAM's automatic mask generation on transformers' `SamModel`, loaded from a
  local weights directory, done by transformers' own mask-generation steps (the
  `mask-generation` pipeline's): a grid of `points_per_side`**2 single-point prompts per crop
  (`crop_n_layers` adds SAM's zoomed-in crops), three masks per point, kept when the predicted
  IoU exceeds `pred_iou_thresh` and the stability score (the IoU of the mask thresholded at
  +-`stability_score_offset` around `mask_threshold`) exceeds `stability_score_thresh`, then
  box NMS at `box_nms_thresh`; `min_mask_region_area` removes small islands and holes (SAM's
  step that transformers lacks). The defaults are SAM's (`SamAutomaticMaskGenerator`), which
  the reference demo uses.
- `ClassicalSegmenter`, the default when no SAM weights are configured, so the job runs anywhere
  offline: Felzenszwalb-Huttenlocher graph segmentation of the colours (scikit-image), then each
  segment is split where a distance-transform watershed finds several cores (two touching shapes
  of the same colour), and segments under `min_area_fraction` of the image are dropped. It works
  at `max_side` pixels and scales masks back to full size. It has no scores (None).

This module chooses and builds one. The interface and input checks live in
osprey.infer.segment_inputs, the configs in osprey.infer.segment_config, the segmenters in
osprey.infer.classical and osprey.infer.sam (which alone imports torch and transformers); all
are importable from here, and none of them imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from osprey.infer.segment_config import ClassicalConfig, SamConfig
from osprey.infer.segment_inputs import (
    ImageInput,
    Segmenter,
    as_rgb,
    check_boxes,
    check_points,
)

# Also, lazily (see __getattr__): ClassicalSegmenter, SamSegmenter, stability_score.
__all__ = [
    "ClassicalConfig",
    "ImageInput",
    "SamConfig",
    "Segmenter",
    "SegmenterConfig",
    "as_rgb",
    "check_boxes",
    "check_points",
]


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
