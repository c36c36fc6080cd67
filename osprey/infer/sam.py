"""SAM's automatic mask generation on transformers' `SamModel` (local weights only).

Segment everything is transformers' own `mask-generation` procedure, step for step with its
image processor's utilities (`generate_crop_boxes`, `post_process_masks`, `filter_masks`,
`post_process_for_mask_generation`), so it returns what `pipeline("mask-generation")` returns
for the same model, image and thresholds (tests/test_segment.py): per crop a grid of
`points_per_side`**2 single-point prompts in batches of `points_per_batch`, three masks per
point, kept when the predicted IoU exceeds `pred_iou_thresh` and the stability score exceeds
`stability_score_thresh` (a threshold of 0 turns its filter off, as in SAM), masks touching a
crop's inner edge dropped, then one box NMS at `box_nms_thresh` over all crops (transformers'
choice; SAM's own generator runs NMS per crop first). Two things are ours: masks are upscaled to
full size a budgeted chunk at a time instead of a whole batch at once (the same numbers, less
memory), and SAM's removal of islands and holes under `min_mask_region_area`, which
transformers does not offer, runs after the library's steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from osprey.infer.regions import Region, sort_regions
from osprey.infer.segment_config import SamConfig
from osprey.infer.segment_inputs import ImageInput, as_rgb, check_boxes, check_points


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
        rgb = as_rgb(image)
        processor = self.processor
        target = processor.size.get("longest_edge", processor.size.get("height"))
        crop_boxes, grid, crops, labels = processor.generate_crop_boxes(
            rgb, target, cfg.crop_n_layers, cfg.crop_overlap_ratio, cfg.points_per_side, 1
        )
        inputs = processor(images=crops, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        full_size = rgb.shape[:2]
        rles: list[dict] = []
        ious: list[torch.Tensor] = []
        stabilities: list[torch.Tensor] = []
        boxes: list[torch.Tensor] = []
        for c in range(len(crops)):
            state = self._state(inputs, c, dtype)
            for start in range(0, grid.shape[1], cfg.points_per_batch):
                out = self.model(
                    image_embeddings=state.embeddings,
                    input_points=grid[:, start : start + cfg.points_per_batch, c : c + 1].to(
                        self.device
                    ),
                    input_labels=labels[:, start : start + cfg.points_per_batch, c : c + 1].to(
                        self.device
                    ),
                    multimask_output=True,
                )
                low_res = out.pred_masks[0].float().cpu().flatten(0, 1)
                iou = out.iou_scores[0].float().cpu().flatten()
                # filter_masks' predicted-IoU test, before the costly upscaling.
                keep = iou > cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0 else iou == iou
                low_res, iou = low_res[keep], iou[keep]
                for rows, logits in self._upscaled(state, low_res):
                    # filter_masks returns the scores it was given for the masks it keeps: given
                    # row numbers, it tells which rows survived, so each keeps its IoU and
                    # stability.
                    rle, kept, box = processor.filter_masks(
                        logits[:, None],
                        torch.arange(rows.start, rows.stop, dtype=torch.float64)[:, None],
                        full_size,
                        crop_boxes[c],
                        0.0,
                        cfg.stability_score_thresh,
                        cfg.mask_threshold,
                        cfg.stability_score_offset,
                    )
                    kept = kept.long()
                    stability = stability_score(
                        logits, cfg.mask_threshold, cfg.stability_score_offset
                    )
                    rles += rle
                    ious.append(iou[kept])
                    stabilities.append(stability[kept - rows.start])
                    boxes.append(box)
        if not rles:
            return []
        masks, _, kept_rles, _ = processor.post_process_for_mask_generation(
            rles, torch.cat(ious), torch.cat(boxes), cfg.box_nms_thresh
        )
        # NMS hands back the very RLE objects it kept: their identity gives each one's row.
        row = {id(rle): i for i, rle in enumerate(rles)}
        kept_rows = [row[id(rle)] for rle in kept_rles]
        all_ious, all_stabilities = torch.cat(ious), torch.cat(stabilities)
        found = []
        for mask, i in zip(masks, kept_rows, strict=True):
            region = Region.from_mask(mask.numpy(), float(all_ious[i]), float(all_stabilities[i]))
            found.append((_xyxy(region), region))
        if cfg.min_mask_region_area > 0:
            found = self._clean(found)
        return sort_regions([region for _, region in found])

    @torch.no_grad()
    def from_points(self, image: ImageInput, points: Sequence[Sequence[float]]) -> list[Region]:
        """One region per (x, y) point: of SAM's three masks, the one with the best predicted IoU."""
        state = self._embed(as_rgb(image))
        checked = np.array(check_points(points, state.original), dtype=np.float64).reshape(-1, 2)
        low_res, iou = self._decode(state, points=checked, multimask=True)
        best = iou.argmax(-1)
        rows = torch.arange(len(checked))
        return self._to_regions(state, low_res[rows, best], iou[rows, best])

    @torch.no_grad()
    def from_boxes(self, image: ImageInput, boxes: Sequence[Sequence[float]]) -> list[Region]:
        """One region per [x0, y0, x1, y1] box (SAM's single-mask output for a box prompt)."""
        state = self._embed(as_rgb(image))
        checked = np.array(check_boxes(boxes, state.original), dtype=np.float64).reshape(-1, 4)
        low_res, iou = self._decode(state, boxes=checked, multimask=False)
        return self._to_regions(state, low_res[:, 0], iou[:, 0])

    # ---- steps ----------------------------------------------------------------------------

    def _embed(self, rgb: np.ndarray) -> _SamState:
        inputs = self.processor(images=rgb, return_tensors="pt")
        return self._state(inputs, 0, next(self.model.parameters()).dtype)

    def _state(self, inputs, index: int, dtype: torch.dtype) -> _SamState:
        """The image embedding and sizes of the `index`-th image the processor prepared."""
        pixels = inputs["pixel_values"][index : index + 1].to(self.device, dtype)
        embeddings = self.model.get_image_embeddings(pixels)
        if isinstance(embeddings, tuple):  # SAM-HQ also returns intermediate embeddings
            embeddings = embeddings[0]
        original = tuple(int(v) for v in inputs["original_sizes"][index])
        reshaped = tuple(int(v) for v in inputs["reshaped_input_sizes"][index])
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
