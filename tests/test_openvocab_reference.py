"""Open-vocabulary scoring as the paper's pipeline computes it, on tiny files in the original
formats: Cityscapes' gtFine PNGs through cityscapesScripts' evaluators, and ADE20K's AP against
its instance JSON (prepare_ade20k_ins_seg.py's output) rather than the panoptic PNGs."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from osprey.data.converters import resolve
from osprey.eval.benchmarks import BENCHMARKS, BenchmarkData
from osprey.eval.cityscapes import CityscapesEvaluation
from osprey.eval.openvocab import Category, OpenVocabScorer, id2rgb
from osprey.eval.readers import cityscapes_gtfine, read_instance_json

H, W = 48, 64
ROAD, PERSON, CAR, UNLABELED = 7, 24, 26, 0  # Cityscapes label ids


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def cityscapes_scene():
    """A frame's panoptic ids, its gtFine label-id / instance-id PNGs (as createPanopticImgs and
    the Cityscapes release write them) and the segments asked about: road, car, person, void."""
    labels = np.full((H, W), ROAD, np.uint8)
    labels[24:, :28] = CAR
    labels[24:, 36:] = PERSON
    labels[:4] = UNLABELED
    instances = labels.astype(np.int32)
    instances[labels == CAR] = CAR * 1000
    instances[labels == PERSON] = PERSON * 1000
    panoptic = np.zeros((H, W), np.int64)
    panoptic[labels == ROAD], panoptic[labels == CAR], panoptic[labels == PERSON] = 1, 2, 3
    segments = [
        {"id": 1, "category_id": ROAD, "iscrowd": 0},
        {"id": 2, "category_id": CAR, "iscrowd": 0},
        {"id": 3, "category_id": PERSON, "iscrowd": 0},
    ]
    gtfine = (png(labels), png(instances.astype(np.uint16)))
    return labels, panoptic, segments, gtfine


CATEGORIES = [
    Category(ROAD, "road", False),
    Category(CAR, "car", True),
    Category(PERSON, "person", True),
]


def score_cityscapes(probabilities: np.ndarray) -> dict[str, float]:
    _, panoptic, segments, gtfine = cityscapes_scene()
    evaluation = CityscapesEvaluation()
    try:
        scorer = OpenVocabScorer(CATEGORIES, cityscapes=evaluation)
        scorer.add(
            "aachen_000000_000019", panoptic, segments, [1, 2, 3], probabilities, gtfine=gtfine
        )
        return scorer.summary()
    finally:
        evaluation.close()


def test_cityscapes_scored_by_cityscapesscripts():
    right = np.eye(3)
    out = score_cityscapes(right)
    assert out["miou"] == pytest.approx(100) and out["ap"] == pytest.approx(100)
    assert out["ap50"] == pytest.approx(100)

    # The person called a car; the car's segment also scores "person" above the person's own.
    wrong = np.array([[1, 0, 0], [0, 0.5, 0.5], [0, 0.7, 0.3]])
    out = score_cityscapes(wrong)
    labels, *_ = cityscapes_scene()
    car, person = (labels == CAR).sum(), (labels == PERSON).sum()
    # Class IoU over the evaluated classes present (void ignored): road 1, car, person 0.
    assert out["miou"] == pytest.approx(100 * (1 + car / (car + person) + 0) / 3)
    assert 0 < out["ap"] < 100
    assert out["ap50"] == pytest.approx(out["ap"])  # masks are exact: every overlap alike


def test_cityscapes_bad_files_are_a_clear_error():
    evaluation = CityscapesEvaluation()
    try:
        scorer = OpenVocabScorer(CATEGORIES, cityscapes=evaluation)
        _, panoptic, segments, (labels, _) = cityscapes_scene()
        small = png(np.zeros((H // 2, W), np.uint8))
        scorer.add(
            "aachen_000000_000019", panoptic, segments, [1], np.eye(3)[:1], gtfine=(small, labels)
        )
        with pytest.raises(ValueError, match="cityscapesScripts"):
            scorer.summary()
        with pytest.raises(ValueError, match="gtFine"):
            scorer.add("x", panoptic, segments, [1], np.eye(3)[:1])
    finally:
        evaluation.close()


def test_cityscapes_gtfine_paths(tmp_path):
    labels, ids = cityscapes_gtfine(resolve(str(tmp_path)), "frankfurt_000001_000538")
    assert labels.uri.endswith("frankfurt/frankfurt_000001_000538_gtFine_labelIds.png")
    assert ids.uri.endswith("frankfurt/frankfurt_000001_000538_gtFine_instanceIds.png")
    with pytest.raises(ValueError, match="Cityscapes image id"):
        cityscapes_gtfine(resolve(str(tmp_path)), "ADE_val_00000001")


def test_ade20k_ap_from_the_instance_json(tmp_path):
    # Panoptic: wall (stuff) on top, one "person" segment below. The instance JSON (as
    # prepare_ade20k_ins_seg.py writes it: RLE strings, contiguous ids shared with the panoptic
    # JSON) splits that region into two people.
    categories = [Category(0, "wall", False), Category(12, "person", True)]
    panoptic = np.zeros((H, W), np.int64)
    panoptic[:24], panoptic[24:] = 1, 2
    segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 12}]
    annotations = []
    for k, columns in enumerate((slice(0, 32), slice(32, W)), start=1):
        mask = np.zeros((H, W), np.uint8)
        mask[24:, columns] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        annotations.append({
            "id": k, "image_id": "ADE_val_00000001", "iscrowd": 0, "category_id": 12,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": rle,
            "area": int(mask.sum()),
        })  # fmt: skip
    data = {
        "images": [
            {"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg", "height": H, "width": W}
        ],
        "annotations": annotations,
        "categories": [{"id": 12, "name": "person"}],
    }
    path = tmp_path / "ade20k_instance_val.json"
    path.write_text(json.dumps(data))
    instances = read_instance_json(resolve(str(path)))
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])

    scorer = OpenVocabScorer(categories)
    scorer.add(
        "ADE_val_00000001",
        panoptic,
        segments,
        [1, 2],
        probabilities,
        instances=instances["ADE_val_00000001"],
    )
    ours = scorer.summary()

    # Independently: pycocotools on the instance JSON and the thing detections (each segment
    # with the person class, scored by its probability; detectron2's instance_inference).
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        detections = [
            {"image_id": "ADE_val_00000001", "category_id": 12, "score": float(probabilities[k, 1]),
             "segmentation": mask_utils.encode(np.asfortranarray((panoptic == seg).astype(np.uint8)))}
            for k, seg in enumerate((1, 2))
        ]  # fmt: skip
        evaluation = COCOeval(gt, gt.loadRes(detections), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert ours["ap"] == pytest.approx(100 * evaluation.stats[0])
    assert ours["ap50"] == pytest.approx(100 * evaluation.stats[1])

    # The panoptic-only ("coco") path scores the merged region as one exact person instead.
    alternative = OpenVocabScorer(categories)
    alternative.add("ADE_val_00000001", panoptic, segments, [1, 2], probabilities)
    assert alternative.summary()["ap"] == pytest.approx(100)
    assert ours["ap"] < 50


def write_cityscapes(root) -> None:
    """gtFine as the release and createPanopticImgs.py lay it out, for one frame of aachen."""
    labels, panoptic, segments, (label_png, instance_png) = cityscapes_scene()
    name = "aachen_000000_000019"
    (root / "gtFine" / "val" / "aachen").mkdir(parents=True)
    (root / "gtFine" / "val" / "aachen" / f"{name}_gtFine_labelIds.png").write_bytes(label_png)
    (root / "gtFine" / "val" / "aachen" / f"{name}_gtFine_instanceIds.png").write_bytes(
        instance_png
    )
    (root / "gtFine" / "cityscapes_panoptic_val").mkdir()
    Image.fromarray(id2rgb(panoptic)).save(
        root / "gtFine" / "cityscapes_panoptic_val" / f"{name}_gtFine_panoptic.png"
    )
    data = {
        "images": [{"id": name, "file_name": f"{name}_leftImg8bit.png", "height": H, "width": W}],
        "annotations": [
            {
                "image_id": name,
                "file_name": f"{name}_gtFine_panoptic.png",
                "segments_info": segments,
            }
        ],
        "categories": [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in CATEGORIES],
    }
    (root / "gtFine" / "cityscapes_panoptic_val.json").write_text(json.dumps(data))


@pytest.mark.parametrize("scoring", ["reference", "coco"])
def test_cityscapes_benchmark_scores_its_files(tmp_path, scoring):
    write_cityscapes(tmp_path)
    bench = BENCHMARKS["cityscapes"]
    data = BenchmarkData(root=str(tmp_path), scoring=scoring)
    items, categories = bench.read(data)
    regions = json.loads(items[0]["regions"])
    answers = {1: "road", 2: "car", 3: "car"}  # the person called a car
    frame = pd.DataFrame(
        {
            "item_id": [items[0]["item_id"]] * len(regions),
            "region_id": [r["id"] for r in regions],
            "prediction": [answers[r["segment"]] for r in regions],
            "error": [None] * len(regions),
        }
    )
    out = bench.score(items, frame, categories, data)
    labels, *_ = cityscapes_scene()
    car, person = (labels == CAR).sum(), (labels == PERSON).sum()
    assert out["miou"] == pytest.approx(100 * (1 + car / (car + person)) / 3, abs=1e-6)
    assert out["images"] == 1 and out["errors"] == 0
    if scoring == "reference":
        with pytest.raises(FileNotFoundError):
            bench.score(items, frame, categories, BenchmarkData(root=str(tmp_path / "none")))


def test_ade20k_benchmark_takes_ap_from_its_instance_json(tmp_path):
    # One image: wall on top, one panoptic "person" segment below that the instance JSON splits
    # into two people (as in test_ade20k_ap_from_the_instance_json).
    name = "ADE_val_00000001"
    panoptic = np.zeros((H, W), np.int64)
    panoptic[:24], panoptic[24:] = 1, 2
    (tmp_path / "ade20k_panoptic_val").mkdir()
    Image.fromarray(id2rgb(panoptic)).save(tmp_path / "ade20k_panoptic_val" / f"{name}.png")
    image = {"id": name, "file_name": f"{name}.jpg", "height": H, "width": W}
    segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 12}]
    categories = [
        {"id": 0, "name": "wall", "isthing": 0},
        {"id": 12, "name": "person", "isthing": 1},
    ]
    (tmp_path / "ade20k_panoptic_val.json").write_text(
        json.dumps({
            "images": [image], "categories": categories,
            "annotations": [{"image_id": name, "file_name": f"{name}.png", "segments_info": segments}],
        })
    )  # fmt: skip
    people = []
    for k, columns in enumerate((slice(0, 32), slice(32, W)), start=1):
        mask = np.zeros((H, W), np.uint8)
        mask[24:, columns] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        people.append(
            {"id": k, "image_id": name, "iscrowd": 0, "category_id": 12, "segmentation": rle}
        )
    (tmp_path / "ade20k_instance_val.json").write_text(
        json.dumps({"images": [image], "annotations": people, "categories": categories[1:]})
    )
    bench = BENCHMARKS["ade20k"]
    scores = {}
    for scoring in ("reference", "coco"):
        data = BenchmarkData(root=str(tmp_path), scoring=scoring, class_names="json")
        items, cats = bench.read(data)
        regions = json.loads(items[0]["regions"])
        frame = pd.DataFrame({
            "item_id": [name] * 2, "region_id": [r["id"] for r in regions],
            "prediction": ["wall", "person"], "error": [None, None],
        })  # fmt: skip
        scores[scoring] = bench.score(items, frame, cats, data)
    assert scores["coco"]["ap"] == pytest.approx(100)  # the panoptic segment is one exact person
    assert scores["reference"]["ap"] < 50  # against two people, each half of it
    assert scores["reference"]["pq"] == scores["coco"]["pq"] == pytest.approx(100)
