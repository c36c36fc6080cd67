"""Panoptic quality, mIoU and the panoptic PNG decoding against an independent implementation:
torchmetrics' `PanopticQuality` and `MulticlassJaccardIndex`, on randomised label maps with
void and crowd regions.

Ours follows panopticapi's `pq_compute` (the paper's evaluator, through detectron2) and
detectron2's `SemSegEvaluator`. torchmetrics differs from them in three documented places, each
pinned by a small case below with its value worked out by hand:
- a prediction's void pixels: torchmetrics drops a ground-truth segment's pixels that the
  prediction leaves void from the IoU's union, and skips a false negative that the prediction
  leaves more than half void; panopticapi counts both (the paper's numbers);
- crowd regions: torchmetrics has none; marked void for it, a prediction of *another* class
  lying mostly on a crowd region is ignored by torchmetrics but a false positive in
  panopticapi, and a matched prediction's pixels on a crowd region stay in panopticapi's union;
- mIoU: torchmetrics' macro average also counts classes that are predicted but absent from the
  ground truth (IoU 0); detectron2 averages over the classes present in the ground truth.
The randomised cases stay where the definitions coincide (a prediction is void only where the
ground truth is, a crowd region is predicted as its own class) and must agree to 1e-6.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import PanopticQuality as TmPanopticQuality

from osprey.eval.openvocab import (
    Category,
    OpenVocabScorer,
    PanopticQuality,
    SemanticIoU,
    id2rgb,
    rgb2id,
)

THINGS = (1, 3, 7)
STUFF = (10, 12)
ISTHING = {**{c: True for c in THINGS}, **{c: False for c in STUFF}}
VOID_CATEGORY = 0  # not a class: torchmetrics maps it to its void colour


def voronoi(rng, seeds: np.ndarray, size: int) -> np.ndarray:
    ys, xs = np.mgrid[:size, :size]
    d = (ys[..., None] - seeds[:, 0]) ** 2 + (xs[..., None] - seeds[:, 1]) ** 2
    return d.argmin(-1)


def random_scene(rng, size=40, cells=12, crowd=True):
    """A ground-truth panoptic map (random 24-bit ids; void 0; stuff at most one segment per
    class, as in COCO) and a prediction from moved Voronoi seeds: partly the same segments,
    partly relabelled, split or merged. The prediction is void only where the ground truth is,
    and predicts each crowd region as its own segment of the crowd's class."""
    seeds = rng.integers(0, size, (cells, 2))
    cell = voronoi(rng, seeds, size)
    ids = rng.choice(np.arange(1, 2**24), 2 * cells + 2, replace=False)
    gt = np.zeros((size, size), np.int64)
    segments, stuff_id, crowd_of = [], {}, {}
    for k in range(cells):
        if rng.random() < 0.15 or not (cell == k).any():
            continue  # void, or a seed that another one hides
        category = int(rng.choice(THINGS + STUFF))
        if not ISTHING[category] and category in stuff_id:
            gt[cell == k] = stuff_id[category]
            continue
        seg_id = int(ids[k])
        gt[cell == k] = seg_id
        iscrowd = int(
            crowd and ISTHING[category] and category not in crowd_of and rng.random() < 0.3
        )
        if iscrowd:
            crowd_of[category] = seg_id
        if not ISTHING[category]:
            stuff_id[category] = seg_id
        segments.append({"id": seg_id, "category_id": category, "iscrowd": iscrowd})
    gt_category = {s["id"]: s["category_id"] for s in segments}

    moved = np.clip(seeds + rng.integers(-5, 6, seeds.shape), 0, size - 1)
    pred_cell = voronoi(rng, moved, size)
    pred = np.zeros_like(gt)
    pred_category, pred_stuff = {}, {}
    for k in range(cells):
        origin = gt[tuple(seeds[k])]
        keep = origin in gt_category and rng.random() < 0.7
        category = gt_category[origin] if keep else int(rng.choice(THINGS + STUFF))
        seg_id = int(ids[cells + k])
        if not ISTHING[category]:
            seg_id = pred_stuff.setdefault(category, seg_id)
        pred[pred_cell == k] = seg_id
        pred_category[seg_id] = category
    if rng.random() < 0.5:
        pred[gt == 0] = 0
    for category, seg_id in crowd_of.items():
        crowd_pred = int(ids[-1]) + category  # a fresh id per crowd region
        pred[gt == seg_id] = crowd_pred
        pred_category[crowd_pred] = category
    pred_segments = [
        {"id": int(i), "category_id": pred_category[int(i)]} for i in np.unique(pred) if i != 0
    ]
    return gt, segments, pred, pred_segments


def through_png(ids: np.ndarray) -> np.ndarray:
    """Write ids as a panoptic PNG, read it back and decode it with ours."""
    buffer = io.BytesIO()
    Image.fromarray(id2rgb(ids)).save(buffer, format="PNG")
    rgb = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    decoded = rgb2id(rgb)
    # The COCO panoptic format's id, written independently: R | G << 8 | B << 16.
    rgb = rgb.astype(np.int64)
    assert np.array_equal(decoded, rgb[..., 0] | rgb[..., 1] << 8 | rgb[..., 2] << 16)
    return decoded


def torchmetrics_pair(ids: np.ndarray, segments, void_ids=()) -> torch.Tensor:
    """(H, W, 2) (category, instance) for torchmetrics; void and `void_ids` get category 0."""
    category = np.full(ids.shape, VOID_CATEGORY, np.int64)
    for s in segments:
        if s["id"] not in void_ids:
            category[ids == s["id"]] = s["category_id"]
    instance = np.where(category == VOID_CATEGORY, 0, ids)
    return torch.from_numpy(np.stack([category, instance], -1))


def torchmetrics_pq() -> TmPanopticQuality:
    return TmPanopticQuality(
        things=set(THINGS),
        stuffs=set(STUFF),
        allow_unknown_preds_category=True,
        return_sq_and_rq=True,
        return_per_class=True,
    )


def assert_same_stats(ours: PanopticQuality, theirs: TmPanopticQuality) -> None:
    continuous = {c: i for i, c in enumerate(sorted(THINGS) + sorted(STUFF))}
    for category, i in continuous.items():
        s = ours.stats.get(category)
        tp, fp, fn, iou = (s.tp, s.fp, s.fn, s.iou) if s else (0, 0, 0, 0.0)
        assert (tp, fp, fn) == (
            int(theirs.true_positives[i]),
            int(theirs.false_positives[i]),
            int(theirs.false_negatives[i]),
        ), f"category {category}"
        # torchmetrics divides in float32.
        assert iou == pytest.approx(float(theirs.iou_sum[i]), abs=1e-6)


def assert_same_summary(summary: dict, theirs: TmPanopticQuality) -> None:
    per_class = theirs.compute()  # (C, 3): pq, sq, rq per class, things then stuff
    present = (theirs.true_positives + theirs.false_positives + theirs.false_negatives) > 0
    n_things = len(THINGS)
    for suffix, columns in (
        ("", slice(None)),
        ("_th", slice(0, n_things)),
        ("_st", slice(n_things, None)),
    ):
        keep = present[columns]
        for j, name in enumerate(("pq", "sq", "rq")):
            values = per_class[columns, j][keep]
            expected = float(values.mean()) if keep.any() else 0.0
            # Ours in percent; torchmetrics' fractions are float32.
            assert summary[f"{name}{suffix}"] / 100 == pytest.approx(expected, abs=1e-6), (
                name + suffix
            )


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_quality_equals_torchmetrics_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    ours = PanopticQuality(dict(ISTHING))
    theirs = torchmetrics_pq()
    crowds = 0
    for _ in range(6):
        gt, segments, pred, pred_segments = random_scene(rng)
        gt, pred = through_png(gt), through_png(pred)
        ours.add(gt, segments, pred, pred_segments)
        crowd_ids = {s["id"] for s in segments if s["iscrowd"]}
        crowds += len(crowd_ids)
        theirs.update(
            torchmetrics_pair(pred, pred_segments)[None],
            torchmetrics_pair(gt, segments, void_ids=crowd_ids)[None],
        )
    stats = ours.stats.values()
    # The random scenes exercise every case: matches, misses, false positives, crowds.
    assert sum(s.tp for s in stats) and sum(s.fp for s in stats) and sum(s.fn for s in stats)
    assert crowds
    assert_same_stats(ours, theirs)
    assert_same_summary(ours.summary(), theirs)


def test_where_panopticapi_and_torchmetrics_differ():
    # Ground truth (4x4): a thing of class 1 (id 1) on the top half, a crowd region of class 3
    # (id 2) on the bottom-left quarter, void (0) on the bottom-right.
    gt = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]])
    segments = [
        {"id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 2, "category_id": 3, "iscrowd": 1},
    ]

    def both(pred, pred_segments):
        ours = PanopticQuality(dict(ISTHING))
        ours.add(gt, segments, pred, pred_segments)
        theirs = torchmetrics_pq()
        theirs.update(
            torchmetrics_pair(pred, pred_segments)[None],
            torchmetrics_pair(gt, segments, void_ids={2})[None],
        )
        return ours, theirs

    # 1. The prediction leaves 3 of the thing's 8 pixels void: panopticapi's IoU is 5/8, a
    #    match; torchmetrics leaves those pixels out of the union: 5/5.
    pred = np.array([[5, 5, 5, 5], [5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    ours, theirs = both(pred, [{"id": 5, "category_id": 1}])
    assert ours.stats[1].iou == pytest.approx(5 / 8)
    assert float(theirs.iou_sum[0]) == pytest.approx(1.0)

    #    Taken further, a prediction of 2 of its 8 pixels is a match for torchmetrics (2 / 2)
    #    and a miss for panopticapi (2 / 8).
    pred = np.array([[5, 5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    ours, theirs = both(pred, [{"id": 5, "category_id": 1}])
    assert (ours.stats[1].tp, ours.stats[1].fp, ours.stats[1].fn) == (0, 1, 1)
    assert (int(theirs.true_positives[0]), int(theirs.false_negatives[0])) == (1, 0)

    # 2. Left void altogether: panopticapi counts a false negative, torchmetrics skips it.
    pred = np.zeros_like(gt)
    ours, theirs = both(pred, [])
    assert (ours.stats[1].tp, ours.stats[1].fn) == (0, 1)
    assert (int(theirs.true_positives[0]), int(theirs.false_negatives[0])) == (0, 0)

    # 3. A prediction of class 7 over the crowd region of class 3 (and the void): a false
    #    positive for panopticapi (only a crowd region of its own class excuses it), ignored by
    #    torchmetrics, for which the crowd region is void.
    pred = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [6, 6, 6, 0], [6, 6, 0, 0]])
    pred_segments = [{"id": 1, "category_id": 1}, {"id": 6, "category_id": 7}]
    ours, theirs = both(pred, pred_segments)
    assert ours.stats[7].fp == 1
    assert int(theirs.false_positives[2]) == 0
    #    ... while a prediction of the crowd's own class there is ignored by both.
    ours, theirs = both(pred, [pred_segments[0], {"id": 6, "category_id": 3}])
    assert ours.stats.get(3) is None and int(theirs.false_positives[1]) == 0

    # 4. A matched prediction reaching onto the crowd region: panopticapi keeps those pixels in
    #    the union (8 / 10), torchmetrics drops them as void (8 / 8).
    pred = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    ours, theirs = both(pred, [{"id": 1, "category_id": 1}])
    assert ours.stats[1].iou == pytest.approx(8 / 10)
    assert float(theirs.iou_sum[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_open_vocab_scorer_equals_torchmetrics(seed):
    """The scorer's own prediction maps (segments take their most probable class; stuff of a
    class merges) scored as torchmetrics scores the same labelling."""
    rng = np.random.default_rng(100 + seed)
    names = {1: "person", 3: "car", 7: "dog", 10: "wall", 12: "sky"}
    categories = [Category(c, names[c], ISTHING[c]) for c in THINGS + STUFF]
    scorer = OpenVocabScorer(categories)
    theirs = torchmetrics_pq()
    jaccard = MulticlassJaccardIndex(num_classes=len(categories), ignore_index=-1, average="none")
    for image_id in range(5):
        gt, segments, _, _ = random_scene(rng, crowd=False)
        segment_ids = [s["id"] for s in segments]
        # Mostly right answers, some wrong.
        truth = [
            categories.index(next(c for c in categories if c.id == s["category_id"]))
            for s in segments
        ]
        probabilities = rng.random((len(segments), len(categories)))
        for row, k in enumerate(truth):
            if rng.random() < 0.7:
                probabilities[row, k] += 1
        chosen = scorer.add(image_id, gt, segments, segment_ids, probabilities)
        pred_segments = [
            {"id": i, "category_id": c} for i, c in zip(segment_ids, chosen, strict=True)
        ]
        theirs.update(
            torchmetrics_pair(gt, pred_segments)[None], torchmetrics_pair(gt, segments)[None]
        )
        index = {c.id: k for k, c in enumerate(categories)}
        gt_sem = np.full(gt.shape, -1)
        pred_sem = np.zeros(gt.shape, np.int64)
        for s, c in zip(segments, chosen, strict=True):
            gt_sem[gt == s["id"]] = index[s["category_id"]]
            pred_sem[gt == s["id"]] = index[c]
        jaccard.update(torch.from_numpy(pred_sem), torch.from_numpy(gt_sem))
    summary = scorer.summary()
    assert 0 < summary["pq"] < 100
    assert_same_stats(scorer.pq, theirs)
    assert_same_summary(summary, theirs)
    # mIoU over the classes present in the ground truth.
    present = jaccard.confmat.sum(1) > 0
    expected = float(jaccard.compute()[present].mean())
    assert summary["miou"] / 100 == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_miou_equals_torchmetrics_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    classes = 6
    ours = SemanticIoU(classes)
    per_class = MulticlassJaccardIndex(num_classes=classes, ignore_index=-1, average="none")
    macro = MulticlassJaccardIndex(num_classes=classes, ignore_index=-1, average="macro")
    for _ in range(4):
        # Class 5 is never in the ground truth but sometimes predicted; about 10% void.
        gt = rng.integers(0, classes - 1, (24, 24))
        gt[rng.random(gt.shape) < 0.1] = -1
        pred = np.where(
            rng.random(gt.shape) < 0.6, np.maximum(gt, 0), rng.integers(0, classes, gt.shape)
        )
        ours.add(gt, pred)
        for metric in (per_class, macro):
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    iou = per_class.compute()
    in_gt = per_class.confmat.sum(1) > 0  # confmat rows: ground truth
    assert not in_gt[classes - 1] and per_class.confmat[:, classes - 1].sum() > 0
    # Ours in percent; torchmetrics' IoUs are float32.
    assert ours.summary()["miou"] / 100 == pytest.approx(float(iou[in_gt].mean()), abs=1e-6)
    # torchmetrics' macro average also counts the predicted-only class (IoU 0): lower.
    assert float(macro.compute()) == pytest.approx(float(iou.mean()), abs=1e-6)
    assert ours.summary()["miou"] > 100 * float(macro.compute()) + 1
