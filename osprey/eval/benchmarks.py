"""The benchmarks of the paper's table (and `shapes`): where their files are, what each asks,
how each is scored, and the numbers Osprey-7B reached.

Each benchmark reads its annotations (osprey.eval.readers) from a `BenchmarkData` (a root folder
laid out as the data sets ship, or explicit paths), asks one question per region (or per POPE
question) with the reference scripts' prompts, and scores the predictions with its metric
module. The `osprey eval --help` text and docs/evaluation.md are written from `BENCHMARKS`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pandas as pd

from osprey.constants import IMAGE_PREFIX, IMAGE_TOKEN
from osprey.eval import readers
from osprey.io.storage import Location, S3Options, resolve
from osprey.prompts.templates import CATEGORY_PROMPT

# The reference scripts' prompts. LVIS/PACO use the demo's image prefix; the RefCOCOg and
# open-vocabulary scripts write "<image>." (with a full stop) before the overview line.
_DOTTED_PREFIX = IMAGE_TOKEN + ".\nThis provides an overview of the picture.\n"
CATEGORY_QUESTION = IMAGE_PREFIX + CATEGORY_PROMPT
REFCOCOG_QUESTION = _DOTTED_PREFIX + "Please give me a short description of <region>."
OPENVOCAB_QUESTION = _DOTTED_PREFIX + "What is in <region>? Using a short phrase."


@dataclass(kw_only=True)
class BenchmarkData:
    """Where a benchmark's files are: `root` laid out as in docs/evaluation.md, or any file
    given explicitly (local paths or s3:// URIs)."""

    root: str | None = None
    annotations: str | None = None  # the annotation file (JSON / JSON lines / refer pickle)
    images: str | None = None  # the image folder
    panoptic: str | None = None  # the panoptic PNG folder (ADE20K, Cityscapes)
    # COCO instances.json (RefCOCOg from the refer pickle); ADE20K: ade20k_instance_val.json
    instances: str | None = None
    ground_truth: str | None = None  # Cityscapes: the gtFine/val folder
    # ADE20K/Cityscapes: "reference" (the paper's evaluators and files) or "coco" (panoptic only)
    scoring: str = "reference"
    # ADE20K/Cityscapes class names: None the paper's (osprey/eval/classes/), "json" the panoptic
    # JSON's, else a file of "<id>:<name>,<synonym>,..." lines in the JSON's category order.
    class_names: str | None = None
    split: str = "val"  # split of the refer pickle
    s3: S3Options | None = None

    def __post_init__(self) -> None:
        if self.scoring not in ("reference", "coco"):
            raise ValueError(f"scoring must be 'reference' or 'coco', got {self.scoring!r}")

    def location(self, explicit: str | None, default: str | None, what: str) -> Location:
        if explicit:
            return resolve(explicit, self.s3)
        if self.root and default is not None:
            return resolve(self.root, self.s3).child(default)
        raise ValueError(f"give --data (the benchmark's folder) or --{what}")


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    name: str
    title: str
    metrics: str  # in words, for the help text
    question: str | None  # None: each item has its own (POPE, shapes)
    template: str = "osprey_v1"
    max_new_tokens: int = 32
    layout: str  # the default files under --data
    defaults: dict[str, str] = field(default_factory=dict)  # BenchmarkData field -> under root
    paper: dict[str, float] = field(default_factory=dict)  # Osprey-7B, in percent
    paper_note: str = ""
    read: Callable[[BenchmarkData], tuple[list[dict], Any]]
    # (items, predictions, what `read` returned beside the items, the data) -> metrics
    score: Callable[[list[dict], pd.DataFrame, Any, BenchmarkData], dict[str, float]]


# --------------------------------------------------------------------------------------------
# Readers bound to their default layout
# --------------------------------------------------------------------------------------------


def _paths(bench_defaults: dict[str, str], data: BenchmarkData, *names: str) -> list[Location]:
    return [
        data.location(getattr(data, name), bench_defaults.get(name), name.replace("_", "-"))
        for name in names
    ]


def _category_reader(defaults: dict[str, str]):
    def read(data: BenchmarkData):
        ann, images = _paths(defaults, data, "annotations", "images")
        return readers.read_category_json(ann, images), None

    return read


def _refcocog_reader(defaults: dict[str, str]):
    def read(data: BenchmarkData):
        ann, images = _paths(defaults, data, "annotations", "images")
        if ann.path.endswith(".p") or ann.path.endswith(".pkl"):
            (instances,) = _paths(defaults, data, "instances")
            return readers.read_refer(ann, instances, images, data.split), None
        return readers.read_refcocog(ann, images), None

    return read


def _panoptic_reader(defaults: dict[str, str], image_of, bundled: str):
    def read(data: BenchmarkData):
        ann, panoptic, images = _paths(defaults, data, "annotations", "panoptic", "images")
        items, categories = readers.read_panoptic(ann, panoptic, images, image_of)
        if data.class_names == "json":
            return items, categories
        if data.class_names:
            where = resolve(data.class_names, data.s3)
            names = readers.read_class_names(where.read_bytes().decode("utf-8"), where.uri)
            return items, readers.rename_categories(categories, names, where.uri)
        # The paper's prompt-engineered names (with synonyms), when the JSON is the full set.
        text = resources.files("osprey.eval").joinpath("classes", bundled).read_text()
        names = readers.read_class_names(text, bundled)
        if len(names) == len(categories):
            categories = readers.rename_categories(categories, names, bundled)
        return items, categories

    return read


def _pope_reader(defaults: dict[str, str]):
    def read(data: BenchmarkData):
        ann, images = _paths(defaults, data, "annotations", "images")
        return readers.read_pope(ann, images), None

    return read


def _shapes_reader(data: BenchmarkData):
    (val,) = _paths({"images": "val"}, data, "images")
    return readers.read_shapes(val), None


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def _answered(predictions: pd.DataFrame) -> pd.DataFrame:
    return predictions[predictions["error"].isna()]


def _errors(predictions: pd.DataFrame) -> dict[str, float]:
    return {"errors": float(predictions["error"].notna().sum())}


def _encoder():
    from osprey.eval.semantic import SentenceEncoder

    return SentenceEncoder()


def score_category(items, predictions: pd.DataFrame, _context, _data) -> dict[str, float]:
    """Semantic Similarity and Semantic IoU; a failed region counts as an empty answer."""
    from osprey.eval.semantic import category_metrics

    answers = predictions["prediction"].fillna("").tolist()
    truths = [json.loads(t) for t in predictions["truth"]]
    metrics, _ = category_metrics(answers, truths, _encoder())
    return metrics | _errors(predictions)


def score_captions(items, predictions: pd.DataFrame, _context, _data) -> dict[str, float]:
    from osprey.eval.captioning import caption_metrics, clean_caption

    preds = {
        r.region_id: clean_caption(r.prediction if isinstance(r.prediction, str) else "")
        for r in predictions.itertuples()
    }
    refs = {r.region_id: json.loads(r.truth) for r in predictions.itertuples()}
    out = caption_metrics(preds, refs)
    return out | {"regions": float(len(preds))} | _errors(predictions)


def score_openvocab(
    items, predictions: pd.DataFrame, categories, data: BenchmarkData, *, cityscapes: bool = False
) -> dict[str, float]:
    """Class matching, then PQ, mIoU and mask AP over every image (ground truth re-read from
    the panoptic PNGs; with `data.scoring` "reference", AP from ADE20K's instance JSON, and
    Cityscapes' mIoU and AP from cityscapesScripts on its gtFine PNGs)."""
    import io

    import numpy as np
    from PIL import Image

    from osprey.eval.cityscapes import CityscapesEvaluation
    from osprey.eval.openvocab import ClassMatcher, OpenVocabScorer, rgb2id

    reference = data.scoring == "reference"
    instances = gt_fine = None
    if reference and not cityscapes:
        (where,) = _paths(_ADE, data, "instances")
        instances = readers.read_instance_json(where)
    if reference and cityscapes:
        (gt_fine,) = _paths(_CITYSCAPES, data, "ground_truth")
    matcher = ClassMatcher(categories, _encoder())
    evaluation = CityscapesEvaluation() if gt_fine is not None else None
    scorer = OpenVocabScorer(categories, cityscapes=evaluation)
    by_item = {item_id: frame for item_id, frame in predictions.groupby("item_id", sort=False)}
    try:
        for item in items:
            frame = by_item.get(item["item_id"])
            truth = json.loads(item["truth"])
            png = resolve(item["panoptic_path"], data.s3).read_bytes()
            gt_ids = rgb2id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            regions = json.loads(item["regions"])
            answers = {}
            if frame is not None:
                answers = dict(zip(frame["region_id"], frame["prediction"], strict=True))
            # A region without an answer (an error) is left out of the prediction: void.
            asked = [r for r in regions if isinstance(answers.get(r["id"]), str)]
            probabilities = matcher.probabilities([answers[r["id"]] for r in asked])
            extra = {}
            if instances is not None:
                if item["item_id"] not in instances:
                    raise ValueError(f"image {item['item_id']!r} is not in the instance JSON")
                extra["instances"] = instances[item["item_id"]]
            if gt_fine is not None:
                labels, ids = readers.cityscapes_gtfine(gt_fine, item["item_id"])
                extra["gtfine"] = (labels.read_bytes(), ids.read_bytes())
            scorer.add(
                item["item_id"],
                gt_ids,
                truth["segments"],
                [r["segment"] for r in asked],
                probabilities,
                **extra,
            )
        return scorer.summary() | _errors(predictions)
    finally:
        if evaluation is not None:
            evaluation.close()


def score_pope(items, predictions: pd.DataFrame, _context, _data) -> dict[str, float]:
    """A failed question counts as an empty answer, which the reference's reading takes as
    "yes" (no "no" in it)."""
    from osprey.eval.pope import answer_is_yes, label_is_yes, pope_metrics

    answers = [answer_is_yes(p if isinstance(p, str) else "") for p in predictions["prediction"]]
    labels = [label_is_yes(json.loads(t)) for t in predictions["truth"]]
    return pope_metrics(answers, labels) | _errors(predictions)


def score_shapes(items, predictions: pd.DataFrame, _context, _data) -> dict[str, float]:
    """Exact "<colour> <shape>" after normalisation (osprey.eval.shapes), plus colour and shape
    alone; also Semantic IoU, the paper's word-overlap measure, for comparison."""
    from osprey.eval.semantic import clean_answer, semantic_iou
    from osprey.eval.shapes import ShapesScore, score_answer

    score = ShapesScore()
    ious = []
    for prediction, truth in zip(predictions["prediction"], predictions["truth"], strict=True):
        text = prediction if isinstance(prediction, str) else ""
        score_answer(score, text, json.loads(truth))
        ious.append(semantic_iou(clean_answer(text), json.loads(truth)))
    out = score.as_metrics()
    out["semantic_iou"] = 100 * sum(ious) / len(ious) if ious else 0.0
    return out | _errors(predictions)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


_LVIS = {"annotations": "lvis_val_1k_category.json", "images": "images"}
_PACO = {"annotations": "paco_val_1k_category.json", "images": "images"}
_REFCOCOG = {
    "annotations": "finetune_refcocog_val_with_mask.json",
    "images": "images",
    "instances": "instances.json",
}
_ADE = {
    "annotations": "ade20k_panoptic_val.json",
    "panoptic": "ade20k_panoptic_val",
    "images": "images/validation",
    "instances": "ade20k_instance_val.json",
}
_CITYSCAPES = {
    "annotations": "gtFine/cityscapes_panoptic_val.json",
    "panoptic": "gtFine/cityscapes_panoptic_val",
    "images": "leftImg8bit/val",
    "ground_truth": "gtFine/val",
}
_POPE = {"annotations": "coco_pope_random.json", "images": "val2014"}

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="lvis",
            title="LVIS referring object classification",
            metrics="Semantic Similarity / Semantic IoU",
            question=CATEGORY_QUESTION,
            max_new_tokens=64,
            defaults=_LVIS,
            layout="lvis_val_1k_category.json, images/ (COCO images named as the JSON's file_name)",
            paper={"semantic_similarity": 65.24, "semantic_iou": 38.19},
            read=_category_reader(_LVIS),
            score=score_category,
        ),
        Benchmark(
            name="paco",
            title="PACO referring object (and part) classification",
            metrics="Semantic Similarity / Semantic IoU",
            question=CATEGORY_QUESTION,
            max_new_tokens=64,
            defaults=_PACO,
            layout="paco_val_1k_category.json, images/ (COCO images named as the JSON's file_name)",
            paper={"semantic_similarity": 73.06, "semantic_iou": 52.72},
            read=_category_reader(_PACO),
            score=score_category,
        ),
        Benchmark(
            name="refcocog",
            title="RefCOCOg region captioning",
            metrics="METEOR / CIDEr",
            question=REFCOCOG_QUESTION,
            max_new_tokens=128,
            defaults=_REFCOCOG,
            layout=(
                "finetune_refcocog_val_with_mask.json (or --annotations 'refs(umd).p' with "
                "instances.json), images/ (COCO train2014 images as <id>.jpg)"
            ),
            paper={"meteor": 16.6, "cider": 108.3},
            paper_note="Osprey-7B fine-tuned on RefCOCOg",
            read=_refcocog_reader(_REFCOCOG),
            score=score_captions,
        ),
        Benchmark(
            name="ade20k",
            title="ADE20K-150 open-vocabulary segmentation with ground-truth masks",
            metrics="PQ / AP / mIoU",
            question=OPENVOCAB_QUESTION,
            max_new_tokens=64,
            defaults=_ADE,
            layout="ade20k_panoptic_val.json, ade20k_panoptic_val/*.png, images/validation/*.jpg",
            paper={"pq": 42.50, "ap": 31.72, "miou": 29.94},
            read=_panoptic_reader(_ADE, readers.ade20k_image, "ade20k_150.txt"),
            score=score_openvocab,
        ),
        Benchmark(
            name="cityscapes",
            title="Cityscapes open-vocabulary segmentation with ground-truth masks",
            metrics="PQ / AP / mIoU",
            question=OPENVOCAB_QUESTION,
            max_new_tokens=64,
            defaults=_CITYSCAPES,
            layout=(
                "gtFine/cityscapes_panoptic_val.json, gtFine/cityscapes_panoptic_val/*.png, "
                "leftImg8bit/val/<city>/*_leftImg8bit.png"
            ),
            paper={"pq": 50.64, "ap": 29.17, "miou": 49.78},
            read=_panoptic_reader(_CITYSCAPES, readers.cityscapes_image, "cityscapes.txt"),
            score=functools.partial(score_openvocab, cityscapes=True),
        ),
        Benchmark(
            name="pope",
            title="POPE object hallucination (yes/no questions about whole images)",
            metrics="accuracy / precision / recall / F1 / yes-ratio",
            question=None,
            max_new_tokens=64,
            defaults=_POPE,
            layout="coco_pope_random.json (or _popular, _adversarial), val2014/ (COCO images)",
            paper_note="reported in the paper per split (random, popular, adversarial)",
            read=_pope_reader(_POPE),
            score=score_pope,
        ),
        Benchmark(
            name="shapes",
            title="category questions on the synthetic shapes validation split",
            metrics="exact accuracy, colour and shape accuracy, Semantic IoU",
            question=None,
            template="vicuna_v1",
            max_new_tokens=8,
            defaults={"images": "val"},
            layout="the folder `osprey demo` / write_shapes_dataset wrote (its val/*.parquet)",
            paper_note="not in the paper; every quickstart model gets a score",
            read=_shapes_reader,
            score=score_shapes,
        ),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
