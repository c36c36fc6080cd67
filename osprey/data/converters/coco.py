"""COCO-form annotation files: COCO instances, PascalPart, PartImageNet, RefCOCO*, Visual Genome.

All of them are {"images": [...], "annotations": [...], "categories": [...]} files. One row per
image entry that has at least one annotation; its annotations become the row's regions in file
order, each labelled with the text the model must answer for it (stored in the region's
`category`). The conversation is left empty: the training pipeline templates it per task, because
Osprey draws the question wording and the region subset anew every time it reads a sample.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from osprey.data.converters.base import (
    ConversionStats,
    decode_region,
    entry_size,
    image_candidates,
    load_image,
    make_row,
)
from osprey.io.storage import Location, as_location

Labeller = Callable[[dict[str, Any], dict[str, Any]], "str | None"]


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def load_coco_form(annotations: Location) -> dict[str, Any]:
    data = annotations.read_json()
    if not isinstance(data, dict):
        raise ValueError(f"{annotations.uri}: expected a COCO-form object, got a JSON {type(data)}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotations.uri}: missing the {key!r} list of a COCO-form file")
    return data


def _group_by_image(annotations: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in annotations:
        by_image[ann.get("image_id")].append(ann)
    return by_image


def category_names(categories: list[dict[str, Any]], part_separator: str | None) -> dict[Any, str]:
    """category id -> answer text.

    Part data sets answer "object:part" (PascalPart) or "object part" (PartImageNet). Their files
    usually name categories that way already; a bare part name is joined to its supercategory.
    """
    names = {}
    for cat in categories:
        name = str(cat.get("name", ""))
        parent = cat.get("supercategory")
        if part_separator and part_separator not in name and parent and parent != name:
            name = f"{parent}{part_separator}{name}"
        names[cat.get("id")] = name
    return names


@dataclass
class _CocoFormConverter:
    annotations: str | Location
    images: str | Location
    source: str
    task: str

    def __post_init__(self) -> None:
        self.annotations = as_location(self.annotations)
        self.images = as_location(self.images)

    def entries(self) -> list[dict[str, Any]]:
        data = load_coco_form(self.annotations)
        by_image = _group_by_image(data["annotations"])
        label = self.labeller(data)
        out = []
        for info in data["images"]:
            labelled = [
                {"id": ann.get("id"), "segmentation": ann.get("segmentation"), "label": text}
                for ann in by_image.get(info.get("id"), [])
                if not ann.get("ignore", False)
                for text in [label(ann, info)]
            ]
            # Osprey trains only on images that have annotations; the rest are not entries.
            if labelled:
                out.append({"image": info, "anns": labelled})
        return out

    def labeller(self, data: dict[str, Any]) -> Labeller:
        """(annotation, image entry) -> the region's answer text, or None if it has none."""
        raise NotImplementedError

    def convert(self, entry: dict[str, Any], stats: ConversionStats) -> dict[str, Any] | None:
        info = entry["image"]
        where = f"{self.source} image {info.get('id')}"
        size = entry_size(info, stats, where)
        if size is None:
            return None
        width, height = size
        regions = []
        for ann in entry["anns"]:
            ann_where = f"{self.source} annotation {ann['id']} (image {info.get('id')})"
            if not ann["label"]:
                stats.skip_annotation(ann_where, "no label (unknown category or empty text)")
                continue
            region = decode_region(
                ann["segmentation"], height, width, ann["label"], stats, ann_where
            )
            if region is not None:
                regions.append(region)
        if not regions:
            stats.skip_entry(where, "no usable annotation")
            return None
        image = load_image(
            self.images, image_candidates(str(info.get("file_name", ""))), stats, where, size
        )
        if image is None:
            return None
        return make_row(
            sample_id=f"{self.source}:{info.get('id')}",
            source=self.source,
            task=self.task,
            image=image,
            regions=regions,
        )


@dataclass
class CocoInstances(_CocoFormConverter):
    """COCO instances, PascalPart, PartImageNet: region label = category name (task "category")."""

    source: str = "coco"
    task: str = "category"
    part_separator: str | None = None  # ":" for PascalPart, " " for PartImageNet

    def labeller(self, data: dict[str, Any]) -> Labeller:
        names = category_names(data.get("categories") or [], self.part_separator)
        return lambda ann, info: names.get(ann.get("category_id"))


@dataclass
class RefCoco(_CocoFormConverter):
    """Osprey's finetune_refcoco*_train_with_mask.json: each image entry is one referring
    expression (`caption`) with the annotation(s) it refers to; region label = the expression."""

    source: str = "refcoco"
    task: str = "refer"

    def labeller(self, data: dict[str, Any]) -> Labeller:
        return lambda ann, info: _text(info.get("caption"))


@dataclass
class VisualGenome(_CocoFormConverter):
    """vg_train_with_mask.json (HQ-SAM masks): region label = the region's `caption` (task
    "short"); annotations flagged `ignore` are left out, as Osprey does."""

    source: str = "vg"
    task: str = "short"

    def labeller(self, data: dict[str, Any]) -> Labeller:
        return lambda ann, info: _text(ann.get("caption"))
