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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from osprey.infer.regions import Region, sort_regions

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
            return SamSegmenter(self.sam)
        return ClassicalSegmenter(self.classical)


# --------------------------------------------------------------------------------------------
# Classical
# --------------------------------------------------------------------------------------------


class ClassicalSegmenter:
    def __init__(self, config: ClassicalConfig | None = None) -> None:
        self.config = config or ClassicalConfig()

    def segment(self, image: ImageInput) -> list[Region]:
        rgb = as_rgb(image)
        labels = self._label_map(rgb)
        min_area = self.config.min_area_fraction * labels.size
        regions = []
        for k, area in enumerate(np.bincount(labels.ravel())):
            if k > 0 and area and area >= min_area:
                regions.append(Region.from_mask(_upscale(labels, k, rgb.shape[:2])))
        return sort_regions(regions)

    def from_points(self, image: ImageInput, points: Sequence[Sequence[float]]) -> list[Region]:
        """The segment under each (x, y) point, one region per point."""
        rgb = as_rgb(image)
        labels = self._label_map(rgb)
        out = []
        for x, y in _check_points(points, rgb.shape[:2]):
            row = min(int(y * labels.shape[0] / rgb.shape[0]), labels.shape[0] - 1)
            col = min(int(x * labels.shape[1] / rgb.shape[1]), labels.shape[1] - 1)
            out.append(Region.from_mask(_upscale(labels, int(labels[row, col]), rgb.shape[:2])))
        return out

    def from_boxes(self, image: ImageInput, boxes: Sequence[Sequence[float]]) -> list[Region]:
        """Per [x0, y0, x1, y1] box, the union of the segments lying mostly (>50%) inside it,
        cut to the box; the whole box when no segment does."""
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        labels = self._label_map(rgb)
        sy, sx = labels.shape[0] / height, labels.shape[1] / width
        totals = np.bincount(labels.ravel())
        out = []
        for x0, y0, x1, y1 in _check_boxes(boxes, (height, width)):
            r0, r1 = int(y0 * sy), max(int(np.ceil(y1 * sy)), int(y0 * sy) + 1)
            c0, c1 = int(x0 * sx), max(int(np.ceil(x1 * sx)), int(x0 * sx) + 1)
            inside = np.bincount(labels[r0:r1, c0:c1].ravel(), minlength=totals.size)
            chosen = np.nonzero(inside > 0.5 * np.maximum(totals, 1))[0]
            box = np.zeros((height, width), dtype=bool)
            box[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            mask = np.zeros((height, width), dtype=bool)
            for k in chosen:
                mask |= _upscale(labels, int(k), (height, width)).astype(bool)
            mask &= box
            out.append(Region.from_mask(mask if mask.any() else box))
        return out

    def _label_map(self, rgb: np.ndarray) -> np.ndarray:
        """Segment ids (1..K) at the working size."""
        from skimage.segmentation import felzenszwalb

        cfg = self.config
        small = _shrink(rgb, cfg.max_side)
        min_size = max(1, int(cfg.min_area_fraction * small.shape[0] * small.shape[1]))
        labels = felzenszwalb(small, scale=cfg.scale, sigma=cfg.sigma, min_size=min_size) + 1
        if cfg.split_depth > 0:
            labels = _split_touching(labels, cfg.split_depth * max(small.shape[:2]))
        return labels.astype(np.int32)


def _shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _split_touching(labels: np.ndarray, depth: float) -> np.ndarray:
    """Split each segment at the watershed between distance-transform cores deeper than depth.

    Two overlapping discs of one colour form one segment with two distance maxima; a single
    convex (or star-like) shape has one, so it stays whole.
    """
    from scipy import ndimage as ndi
    from skimage.measure import label as connected
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    out = np.zeros_like(labels)
    next_id = 1
    biggest = int(np.bincount(labels.ravel()).argmax())
    for k, where in enumerate(ndi.find_objects(labels), start=1):
        if where is None:
            continue
        # A pad of one pixel so the distance transform sees the segment's border.
        rows = slice(max(where[0].start - 1, 0), where[0].stop + 1)
        cols = slice(max(where[1].start - 1, 0), where[1].stop + 1)
        segment = labels[rows, cols] == k
        pieces = None
        # The largest segment is usually the background: splitting it only fragments it.
        if k != biggest:
            dist = ndi.distance_transform_edt(segment)
            cores = connected(h_maxima(dist, depth).astype(bool) & segment)
            if cores.max() > 1:
                pieces = watershed(-dist, cores, mask=segment)
        view = out[rows, cols]
        if pieces is None:
            view[segment] = next_id
            next_id += 1
        else:
            for p in range(1, int(pieces.max()) + 1):
                view[pieces == p] = next_id
                next_id += 1
    return out


def _upscale(labels: np.ndarray, k: int, size: tuple[int, int]) -> np.ndarray:
    """Segment k of a working-size label map as a full-size uint8 mask (nearest neighbour).

    Only the segment's bounding box is upscaled, so a full-size label map is never built.
    """
    height, width = size
    mask = np.zeros((height, width), dtype=np.uint8)
    rows_k, cols_k = np.nonzero(labels == k)
    if rows_k.size == 0:
        return mask
    # Full-size pixel centres mapped to working-size pixels, as a nearest resize does.
    src_rows = np.minimum(
        ((np.arange(height) + 0.5) * labels.shape[0] / height).astype(int), labels.shape[0] - 1
    )
    src_cols = np.minimum(
        ((np.arange(width) + 0.5) * labels.shape[1] / width).astype(int), labels.shape[1] - 1
    )
    r0, r1 = (
        np.searchsorted(src_rows, rows_k.min()),
        np.searchsorted(src_rows, rows_k.max(), "right"),
    )
    c0, c1 = (
        np.searchsorted(src_cols, cols_k.min()),
        np.searchsorted(src_cols, cols_k.max(), "right"),
    )
    mask[r0:r1, c0:c1] = labels[np.ix_(src_rows[r0:r1], src_cols[c0:c1])] == k
    return mask


def _check_points(
    points: Sequence[Sequence[float]], size: tuple[int, int]
) -> list[tuple[float, float]]:
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


def _check_boxes(
    boxes: Sequence[Sequence[float]], size: tuple[int, int]
) -> list[tuple[float, ...]]:
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


# --------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------


class SamSegmenter:
    def __init__(self, config: SamConfig) -> None:
        from transformers import SamImageProcessor, SamModel

        self.config = config
        self.device = torch.device(config.device)
        self.model = SamModel.from_pretrained(config.weights, local_files_only=True)
        self.model.to(self.device).eval()
        try:
            self.processor = SamImageProcessor.from_pretrained(
                config.weights, local_files_only=True
            )
        except OSError:
            # A weights directory without preprocessor_config.json: SAM's own preprocessing at the
            # model's input size.
            side = self.model.config.vision_config.image_size
            self.processor = SamImageProcessor(
                size={"longest_edge": side}, pad_size={"height": side, "width": side}
            )

    # ---- public ---------------------------------------------------------------------------

    @torch.no_grad()
    def segment(self, image: ImageInput) -> list[Region]:
        cfg = self.config
        state = self._embed(as_rgb(image))
        height, width = state.original
        n = cfg.points_per_side
        # SAM's grid: cell centres of an n x n grid over the image.
        ticks = (np.arange(n) + 0.5) / n
        grid = np.stack(np.meshgrid(ticks * width, ticks * height), axis=-1).reshape(-1, 2)
        found: list[tuple[np.ndarray, Region]] = []  # (xyxy box, region)
        for start in range(0, len(grid), cfg.points_per_batch):
            points = grid[start : start + cfg.points_per_batch]
            low_res, iou = self._decode(state, points=points, multimask=True)
            found += self._filter(state, low_res.flatten(0, 1), iou.flatten())
        found = _nms(found, cfg.box_nms_thresh)
        if cfg.min_mask_region_area > 0:
            found = self._clean(found)
        return sort_regions([region for _, region in found])

    @torch.no_grad()
    def from_points(self, image: ImageInput, points: Sequence[Sequence[float]]) -> list[Region]:
        """One region per (x, y) point: of SAM's three masks, the one with the best predicted IoU."""
        state = self._embed(as_rgb(image))
        checked = np.array(_check_points(points, state.original), dtype=np.float64).reshape(-1, 2)
        low_res, iou = self._decode(state, points=checked, multimask=True)
        best = iou.argmax(-1)
        rows = torch.arange(len(checked))
        return self._to_regions(state, low_res[rows, best], iou[rows, best])

    @torch.no_grad()
    def from_boxes(self, image: ImageInput, boxes: Sequence[Sequence[float]]) -> list[Region]:
        """One region per [x0, y0, x1, y1] box (SAM's single-mask output for a box prompt)."""
        state = self._embed(as_rgb(image))
        checked = np.array(_check_boxes(boxes, state.original), dtype=np.float64).reshape(-1, 4)
        low_res, iou = self._decode(state, boxes=checked, multimask=False)
        return self._to_regions(state, low_res[:, 0], iou[:, 0])

    # ---- steps ----------------------------------------------------------------------------

    def _embed(self, rgb: np.ndarray) -> _SamState:
        inputs = self.processor(images=rgb, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        pixels = inputs["pixel_values"].to(self.device, dtype)
        embeddings = self.model.get_image_embeddings(pixels)
        if isinstance(embeddings, tuple):
            embeddings = embeddings[0]
        original = tuple(int(v) for v in inputs["original_sizes"][0])
        reshaped = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
        return _SamState(embeddings, original, reshaped)

    def _decode(
        self,
        state: _SamState,
        points: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        multimask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (P, M, h, w) and predicted IoUs (P, M), on the CPU."""
        (height, width), (new_h, new_w) = state.original, state.reshaped
        scale = torch.tensor([new_w / width, new_h / height], dtype=torch.float32)
        kwargs = {}
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32) * scale
            kwargs["input_points"] = coords[None, :, None, :].to(self.device)
            kwargs["input_labels"] = torch.ones(
                1, len(points), 1, dtype=torch.long, device=self.device
            )
        if boxes is not None:
            coords = torch.as_tensor(boxes, dtype=torch.float32) * scale.repeat(2)
            kwargs["input_boxes"] = coords[None].to(self.device)
        out = self.model(image_embeddings=state.embeddings, multimask_output=multimask, **kwargs)
        return out.pred_masks[0].float().cpu(), out.iou_scores[0].float().cpu()

    def _upscaled(self, state: _SamState, low_res: torch.Tensor):
        """Yield (indices, full-size logits) in chunks that fit the upscale budget."""
        height, width = state.original
        chunk = max(1, self.config.upscale_budget_bytes // (4 * height * width))
        for start in range(0, low_res.shape[0], chunk):
            part = low_res[start : start + chunk, None]
            full = self.processor.post_process_masks(
                [part], [state.original], [state.reshaped], binarize=False
            )[0][:, 0]
            yield range(start, start + part.shape[0]), full

    def _filter(
        self, state: _SamState, low_res: torch.Tensor, iou: torch.Tensor
    ) -> list[tuple[np.ndarray, Region]]:
        cfg = self.config
        # As in SAM, a threshold of 0 turns its filter off.
        passed = (
            iou > cfg.pred_iou_thresh
            if cfg.pred_iou_thresh > 0
            else torch.ones_like(iou, dtype=torch.bool)
        )
        keep = torch.nonzero(passed)[:, 0]
        found = []
        for rows, logits in self._upscaled(state, low_res[keep]):
            stability = stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset)
            for j, score in zip(rows, stability.tolist(), strict=True):
                if cfg.stability_score_thresh > 0 and score <= cfg.stability_score_thresh:
                    continue
                mask = (logits[j - rows.start] > cfg.mask_threshold).numpy()
                if not mask.any():
                    continue
                region = Region.from_mask(mask, float(iou[keep[j]]), score)
                found.append((_xyxy(region), region))
        return found

    def _to_regions(
        self, state: _SamState, low_res: torch.Tensor, iou: torch.Tensor
    ) -> list[Region]:
        cfg = self.config
        regions = []
        for rows, logits in self._upscaled(state, low_res):
            stability = stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset)
            for j in rows:
                mask = (logits[j - rows.start] > cfg.mask_threshold).numpy()
                regions.append(
                    Region.from_mask(mask, float(iou[j]), float(stability[j - rows.start]))
                )
        return regions

    def _clean(self, found: list[tuple[np.ndarray, Region]]) -> list[tuple[np.ndarray, Region]]:
        """SAM's postprocess_small_regions: drop small holes and islands, then NMS again,
        preferring masks the cleaning left unchanged."""
        area = self.config.min_mask_region_area
        cleaned: list[tuple[np.ndarray, Region]] = []
        unchanged: list[bool] = []
        for _, region in found:
            mask = region.mask().astype(bool)
            fixed = ~_drop_small_components(~mask, area)  # fill holes
            fixed = _drop_small_components(fixed, area)  # remove islands
            if not fixed.any():
                continue
            same = bool(np.array_equal(fixed, mask))
            new = (
                region
                if same
                else Region.from_mask(fixed, region.predicted_iou, region.stability_score)
            )
            cleaned.append((_xyxy(new), new))
            unchanged.append(same)
        scores = [1.0 if same else 0.0 for same in unchanged]
        return _nms(cleaned, self.config.box_nms_thresh, scores)


@dataclass(frozen=True)
class _SamState:
    embeddings: torch.Tensor
    original: tuple[int, int]  # (height, width)
    reshaped: tuple[int, int]  # after resizing the longest side to SAM's input size


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of each mask thresholded at threshold + offset and threshold - offset (SAM's)."""
    inner = (logits > threshold + offset).flatten(1).sum(-1).float()
    outer = (logits > threshold - offset).flatten(1).sum(-1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner))


def _drop_small_components(mask: np.ndarray, area: int) -> np.ndarray:
    """`mask` without its connected components under `area` pixels (all kept if all are small:
    SAM keeps the largest then; here the mask is left as it is)."""
    from scipy import ndimage as ndi

    components, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    small = np.nonzero(sizes < area)[0] + 1
    if small.size == 0 or small.size == n:
        return mask
    return mask & ~np.isin(components, small)


def _xyxy(region: Region) -> np.ndarray:
    x, y, w, h = region.bbox
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def _nms(
    found: list[tuple[np.ndarray, Region]], threshold: float, scores: list[float] | None = None
) -> list[tuple[np.ndarray, Region]]:
    """Box non-maximum suppression, by predicted IoU unless `scores` are given."""
    from torchvision.ops import nms

    if not found:
        return []
    boxes = torch.as_tensor(np.stack([box for box, _ in found]))
    if scores is None:
        scores = [region.predicted_iou or 0.0 for _, region in found]
    keep = nms(boxes, torch.as_tensor(scores, dtype=torch.float32), threshold)
    return [found[i] for i in keep.tolist()]
