"""The segmenters' typed configurations (no torch: the job's driver and light workers import it)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # SAM's crops: layer i adds (2**i)**2 overlapping crops of the image, each prompted with the
    # same grid (0: the whole image only, SAM's default).
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
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
        if self.crop_n_layers < 0:
            raise ValueError(f"sam crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if not 0 <= self.crop_overlap_ratio < 1:
            raise ValueError(
                f"sam crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio}"
            )
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
