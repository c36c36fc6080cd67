"""The classical segmenter: segment everything without model weights (the job's default).

Felzenszwalb-Huttenlocher graph segmentation of the colours (scikit-image) at `max_side`
pixels; each segment but the largest (usually the background) is split where a
distance-transform watershed finds several cores deeper than `split_depth`, which separates two
overlapping shapes of one colour; segments under `min_area_fraction` of the image are dropped,
and masks are scaled back to the image's full size. On the synthetic shapes set it finds about
nine shapes in ten at IoU >= 0.8 (tests/test_segment.py); it knows nothing of objects, so on
photos it returns colour regions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from osprey.infer.regions import Region, sort_regions
from osprey.infer.segment_config import ClassicalConfig
from osprey.infer.segment_inputs import ImageInput, as_rgb, check_boxes, check_points


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
        for x, y in check_points(points, rgb.shape[:2]):
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
        for x0, y0, x1, y1 in check_boxes(boxes, (height, width)):
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
