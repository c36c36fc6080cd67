"""Open-vocabulary segmentation with ground-truth masks: PQ, mask AP and mIoU.

The paper (section 5.2, Table 1) asks the model about every ground-truth segment of an image
("What is in <region>? Using a short phrase."), matches each answer to the data set's classes,
and scores the labelled segments as a segmenter's output. As in the reference script
(`eval_open_vocab_seg_detectron2.py`, after FC-CLIP):

- class matching: a class name may list synonyms ("building, edifice"); each synonym becomes
  "There is a {} in the scene." and is embedded with all-MiniLM-L6-v2 like the answer; a
  class's score is its best synonym's cosine similarity, and a segment's class probabilities
  the softmax of its scores over the classes;
- panoptic: a segment takes its most probable class; segments of the same *stuff* class merge
  into one; PQ / SQ / RQ follow the COCO panoptic API exactly (IoU > 0.5 matches, crowd and
  void handling, averaged over the classes that occur);
- semantic: each pixel of a segment takes its class (pixels outside every segment class 0, as
  the reference's empty score map gives); mIoU over the classes present in the ground truth,
  with void pixels ignored (detectron2's SemSegEvaluator);
- instances: the 100 most probable (segment, class) pairs of an image, kept when the class is a
  *thing*, scored by that probability, evaluated with pycocotools' COCOeval (`segm`) against the
  thing segments; AP is AP@[.5:.95].

All metrics are in percent. Two ways to get the semantic and instance ground truth (`scoring`):

- "reference" (default), as the paper's detectron2 pipeline: Cityscapes' mIoU and AP come from
  cityscapesScripts' own evaluators on `gtFine_labelIds.png` / `gtFine_instanceIds.png`
  (`osprey.eval.cityscapes`); ADE20K's AP is COCOeval against the instances of
  `ade20k_instance_val.json` (detectron2's prepare_ade20k_ins_seg.py output, category ids shared
  with the panoptic JSON) instead of the panoptic PNGs' thing segments. ADE20K's mIoU stays on
  the panoptic PNGs (detectron2 reads the semantic PNGs, which agree with them on the 150
  classes).
- "coco": everything derived from the panoptic PNGs alone (no other files needed), AP with
  COCOeval; numbers equal the reference's where those files agree with the panoptic ones.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SCENE_TEMPLATE = "There is a {} in the scene."
VOID = 0  # panoptic segment id of unlabelled pixels
OFFSET = 256 * 256 * 256  # panopticapi's pairing offset (above any RGB id)
TOP_K_INSTANCES = 100


@dataclass(frozen=True, slots=True)
class Category:
    """A class of a panoptic data set; `name` may list synonyms separated by commas."""

    id: int
    name: str
    isthing: bool

    @property
    def synonyms(self) -> list[str]:
        return [s.strip() for s in self.name.replace(", ", ",").split(",") if s.strip()]


def rgb2id(image: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) -> segment ids: R + 256 G + 256^2 B."""
    if image.ndim == 2:
        return image.astype(np.int64)
    image = image.astype(np.int64)
    return image[..., 0] + 256 * image[..., 1] + 256 * 256 * image[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ClassMatcher:
    """Scores answers against a class vocabulary through sentence embeddings."""

    def __init__(self, categories: Sequence[Category], encoder, template: str = SCENE_TEMPLATE):
        self.categories = list(categories)
        self.encoder = encoder
        sentences, owner = [], []
        for index, category in enumerate(self.categories):
            for synonym in category.synonyms:
                sentences.append(template.format(synonym))
                owner.append(index)
        if not sentences:
            raise ValueError("the class vocabulary is empty")
        self.sentences = sentences
        self.owner = np.array(owner)
        self.embeddings = encoder.encode(sentences)

    def scores(self, answers: Sequence[str]) -> np.ndarray:
        """(N, C): per answer, each class's best synonym cosine similarity."""
        if not answers:
            return np.zeros((0, len(self.categories)), np.float32)
        cosine = self.encoder.encode([a.strip() for a in answers]) @ self.embeddings.T
        out = np.full((len(answers), len(self.categories)), -np.inf, np.float32)
        for column, index in enumerate(self.owner):
            out[:, index] = np.maximum(out[:, index], cosine[:, column])
        return out

    def probabilities(self, answers: Sequence[str]) -> np.ndarray:
        return softmax(self.scores(answers))


# --------------------------------------------------------------------------------------------
# Panoptic quality (the COCO panoptic API's pq_compute, per image then summed)
# --------------------------------------------------------------------------------------------


@dataclass
class _ClassStat:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0


@dataclass
class PanopticQuality:
    categories: dict[int, bool]  # category id -> isthing
    stats: dict[int, _ClassStat] = field(default_factory=dict)

    def add(
        self,
        gt_ids: np.ndarray,
        gt_segments: Sequence[dict],
        pred_ids: np.ndarray,
        pred_segments: Sequence[dict],
    ) -> None:
        """One image: id maps (H, W) and their segments ({id, category_id[, iscrowd, area]})."""
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ")
        gt = {int(s["id"]): dict(s) for s in gt_segments}
        pred = {int(s["id"]): dict(s) for s in pred_segments}
        for segment in gt.values():
            segment.setdefault("iscrowd", 0)
        if any(s["category_id"] not in self.categories for s in pred.values()):
            raise KeyError("a predicted segment has a category outside the data set's")
        labels, counts = np.unique(pred_ids, return_counts=True)
        for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
            if label not in pred:
                if label == VOID:
                    continue
                raise KeyError(f"segment {label} is in the PNG but not in segments_info")
            pred[label]["area"] = count
        empty = [label for label, segment in pred.items() if "area" not in segment]
        if empty:
            raise KeyError(f"predicted segments {empty} are in segments_info but not in the PNG")
        if any("area" not in s for s in gt.values()):
            gt_labels, gt_counts = np.unique(gt_ids, return_counts=True)
            areas = dict(zip(gt_labels.tolist(), gt_counts.tolist(), strict=True))
            for label, segment in gt.items():
                segment.setdefault("area", areas.get(label, 0))

        pairs = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
        labels, counts = np.unique(pairs, return_counts=True)
        overlap = {
            (int(label // OFFSET), int(label % OFFSET)): int(count)
            for label, count in zip(labels, counts, strict=True)
        }
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in overlap.items():
            if gt_label not in gt or pred_label not in pred:
                continue
            g, p = gt[gt_label], pred[pred_label]
            if g["iscrowd"] == 1 or g["category_id"] != p["category_id"]:
                continue
            union = p["area"] + g["area"] - intersection - overlap.get((VOID, pred_label), 0)
            iou = intersection / union
            if iou > 0.5:
                stat = self._stat(g["category_id"])
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd = {}
        for gt_label, g in gt.items():
            if gt_label in gt_matched:
                continue
            if g["iscrowd"] == 1:
                crowd[g["category_id"]] = gt_label
                continue
            self._stat(g["category_id"]).fn += 1
        for pred_label, p in pred.items():
            if pred_label in pred_matched:
                continue
            intersection = overlap.get((VOID, pred_label), 0)
            if p["category_id"] in crowd:
                intersection += overlap.get((crowd[p["category_id"]], pred_label), 0)
            if intersection / p["area"] > 0.5:
                continue
            self._stat(p["category_id"]).fp += 1

    def _stat(self, category: int) -> _ClassStat:
        return self.stats.setdefault(category, _ClassStat())

    def summary(self) -> dict[str, float]:
        out = {}
        for suffix, keep in (("", None), ("_th", True), ("_st", False)):
            pq = sq = rq = 0.0
            n = 0
            for category, isthing in self.categories.items():
                if keep is not None and isthing != keep:
                    continue
                s = self.stats.get(category, _ClassStat())
                if s.tp + s.fp + s.fn == 0:
                    continue
                n += 1
                pq += s.iou / (s.tp + 0.5 * s.fp + 0.5 * s.fn)
                sq += s.iou / s.tp if s.tp else 0.0
                rq += s.tp / (s.tp + 0.5 * s.fp + 0.5 * s.fn)
            out[f"pq{suffix}"] = 100 * pq / n if n else 0.0
            out[f"sq{suffix}"] = 100 * sq / n if n else 0.0
            out[f"rq{suffix}"] = 100 * rq / n if n else 0.0
        return out


# --------------------------------------------------------------------------------------------
# Semantic segmentation: mIoU from a confusion matrix (detectron2's SemSegEvaluator)
# --------------------------------------------------------------------------------------------


class SemanticIoU:
    """Confusion counts over `num_classes` classes; ground truth -1 is ignored."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes + 1, num_classes + 1), np.int64)  # [pred, gt]

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        gt = np.where(gt < 0, self.num_classes, gt).astype(np.int64)
        if pred.min(initial=0) < 0 or pred.max(initial=0) >= self.num_classes:
            raise ValueError("predicted classes must be in [0, num_classes)")
        n = self.num_classes + 1
        self.confusion += np.bincount(
            (n * pred.astype(np.int64) + gt).ravel(), minlength=n * n
        ).reshape(n, n)

    def summary(self) -> dict[str, float]:
        conf = self.confusion[:-1, :-1].astype(np.float64)
        tp = np.diag(conf)
        pos_gt = conf.sum(axis=0)
        pos_pred = conf.sum(axis=1)
        present = pos_gt > 0
        union = pos_gt + pos_pred - tp
        valid = present & (union > 0)
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
        acc = np.divide(tp, pos_gt, out=np.zeros_like(tp), where=present)
        return {
            "miou": 100 * float(iou[valid].sum() / valid.sum()) if valid.any() else 0.0,
            "macc": 100 * float(acc[present].sum() / present.sum()) if present.any() else 0.0,
            "pixel_accuracy": 100 * float(tp.sum() / pos_gt.sum()) if pos_gt.sum() else 0.0,
        }


# --------------------------------------------------------------------------------------------
# Mask AP through pycocotools
# --------------------------------------------------------------------------------------------


def mask_ap(
    images: Sequence[dict],
    ground_truth: Sequence[dict],
    detections: Sequence[dict],
    category_ids: Sequence[int],
) -> dict[str, float]:
    """COCO `segm` AP (x100) of detections ({image_id, category_id, segmentation RLE, score})
    against ground-truth instances ({image_id, category_id, segmentation RLE, iscrowd}).

    Returns {} when no ground-truth instance exists (AP is undefined).
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not ground_truth:
        return {}
    annotations = []
    for i, ann in enumerate(ground_truth, start=1):
        rle = ann["segmentation"]
        annotations.append(
            {
                "id": i,
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    if not detections:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [
                {"id": im["id"], "height": im["height"], "width": im["width"]} for im in images
            ],
            "annotations": annotations,
            "categories": [{"id": c} for c in category_ids],
        }
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(gt, dt, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {
        "ap": 100 * max(stats[0], 0),
        "ap50": 100 * max(stats[1], 0),
        "ap75": 100 * max(stats[2], 0),
    }


# --------------------------------------------------------------------------------------------
# The whole benchmark, one image at a time
# --------------------------------------------------------------------------------------------


SCORINGS = ("reference", "coco")


class OpenVocabScorer:
    """Accumulates PQ, mIoU and mask AP from each image's ground truth and segment answers.

    With `cityscapes` (a `CityscapesEvaluation`), mIoU and AP come from cityscapesScripts'
    evaluators, and every `add` must bring the image's gtFine PNGs.
    """

    def __init__(
        self,
        categories: Sequence[Category],
        top_k: int = TOP_K_INSTANCES,
        cityscapes=None,
    ) -> None:
        self.cityscapes = cityscapes
        self.categories = list(categories)
        self.index = {c.id: i for i, c in enumerate(self.categories)}
        self.top_k = top_k
        self.pq = PanopticQuality({c.id: c.isthing for c in self.categories})
        self.semantic = SemanticIoU(len(self.categories))
        self.images: list[dict] = []
        self.instances: list[dict] = []
        self.detections: list[dict] = []

    def add(
        self,
        image_id,
        gt_ids: np.ndarray,
        gt_segments: Sequence[dict],
        segment_ids: Sequence[int],
        probabilities: np.ndarray,
        *,
        instances: Sequence[dict] | None = None,
        gtfine: tuple[bytes, bytes] | None = None,
    ) -> list[int]:
        """One image: its panoptic id map and segments_info, the ids of the segments that were
        asked about and their (N, C) class probabilities. Returns each segment's category id.

        `instances`: the image's ground-truth instances ({category_id, segmentation RLE,
        iscrowd}) for AP, instead of the panoptic thing segments (ADE20K's instance JSON).
        `gtfine`: the image's Cityscapes label-id and instance-id PNG bytes (with `cityscapes`).
        """
        if self.cityscapes is not None and gtfine is None:
            raise ValueError(f"image {image_id!r}: Cityscapes scoring needs its gtFine PNGs")
        if len(segment_ids) != len(probabilities):
            raise ValueError(f"{len(segment_ids)} segments but {len(probabilities)} score rows")
        labels = probabilities.argmax(axis=1) if len(segment_ids) else np.zeros(0, int)
        chosen = [self.categories[k].id for k in labels]

        # Panoptic: things stay apart, stuff of one class merges (the first segment's id).
        pred_ids = np.zeros(gt_ids.shape, np.int64)
        pred_segments, stuff = [], {}
        for seg_id, category_id in zip(segment_ids, chosen, strict=True):
            pixels = gt_ids == seg_id
            if not pixels.any():
                continue
            isthing = self.categories[self.index[category_id]].isthing
            if not isthing and category_id in stuff:
                pred_ids[pixels] = stuff[category_id]
                continue
            if not isthing:
                stuff[category_id] = seg_id
            pred_ids[pixels] = seg_id
            pred_segments.append({"id": seg_id, "category_id": category_id})
        known = [s for s in gt_segments if s["category_id"] in self.index]
        self.pq.add(gt_ids, known, pred_ids, pred_segments)

        # Semantic: void (and unknown classes) ignored; pixels outside every segment class 0.
        gt_sem = np.full(gt_ids.shape, -1, np.int64)
        for s in known:
            gt_sem[gt_ids == s["id"]] = self.index[s["category_id"]]
        pred_sem = np.zeros(gt_ids.shape, np.int64)
        for seg_id, k in zip(segment_ids, labels, strict=True):
            pred_sem[gt_ids == seg_id] = k
        self.semantic.add(gt_sem, pred_sem)

        # Instances: the top-k (segment, class) pairs, thing classes only.
        height, width = gt_ids.shape
        self.images.append({"id": image_id, "height": height, "width": width})
        things = {c.id for c in self.categories if c.isthing}
        if instances is not None:
            self.instances += [
                {
                    "image_id": image_id,
                    "category_id": int(ann["category_id"]),
                    "segmentation": ann["segmentation"],
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
                for ann in instances
                if ann["category_id"] in things
            ]
        else:
            for s in known:
                if s["category_id"] in things:
                    self.instances.append(
                        {
                            "image_id": image_id,
                            "category_id": s["category_id"],
                            "segmentation": _rle(gt_ids == s["id"]),
                            "iscrowd": int(s.get("iscrowd", 0)),
                        }
                    )
        detections = []
        if len(segment_ids):
            flat = probabilities.ravel()
            k = min(self.top_k, flat.size)
            # Stable order (highest first, then lower index) so ties break the same every run.
            top = np.argsort(-flat, kind="stable")[:k]
            rles: dict[int, dict] = {}
            for index in top:
                row, column = divmod(int(index), probabilities.shape[1])
                category_id = self.categories[column].id
                if category_id not in things:
                    continue
                if row not in rles:
                    rles[row] = _rle(gt_ids == segment_ids[row])
                detections.append((row, category_id, float(flat[index])))
                self.detections.append(
                    {
                        "image_id": image_id,
                        "category_id": category_id,
                        "segmentation": rles[row],
                        "score": float(flat[index]),
                    }
                )
        if self.cityscapes is not None:
            label_ids = np.asarray([c.id for c in self.categories])[pred_sem]
            self.cityscapes.add(
                str(image_id),
                *gtfine,
                label_ids,
                [(gt_ids == segment_ids[row], cat, score) for row, cat, score in detections],
            )
        return chosen

    def summary(self) -> dict[str, float]:
        things = [c.id for c in self.categories if c.isthing]
        out = {**self.pq.summary(), **self.semantic.summary()}
        if self.cityscapes is not None:
            out.update(self.cityscapes.summary())
        else:
            out.update(mask_ap(self.images, self.instances, self.detections, things))
        out["images"] = float(len(self.images))
        return out


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
