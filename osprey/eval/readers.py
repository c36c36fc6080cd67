"""Benchmark annotations in their original formats -> evaluation items, one per image.

An item is a dict of ITEM_FIELDS: the image (a URI to read, or its bytes for the shapes set), the
regions to ask about (each with its own id, its mask as COCO RLE or a segment id of a panoptic
PNG, and its ground truth), or for image-level questions (POPE) the question and its label.
Regions of one image travel together, so the captioning engine runs the vision tower and the
shared prompt once per image. Reading only parses annotation files: masks stay RLE and PNGs and
images are opened by the workers that caption them.

Formats:
- LVIS / PACO (Osprey's `lvis_val_1k_category.json`, `paco_val_1k_category.json`): a JSON list
  of images {file_name, height, width, categories: [name, ...], annotations: [{segmentation},
  ...]}; the i-th annotation is named by the i-th category.
- RefCOCOg (Osprey's `finetune_refcocog_val_with_mask.json`): COCO-form; each `images` entry is
  one referring expression (`caption`) of a COCO image (`file_name` "COCO_train2014_<id>.jpg",
  read as "<id>.jpg" like the reference), its annotation(s) the region it describes.
  The original refer release (`refs(umd).p` with COCO's `instances.json`) reads too: one region
  per ref of the split, all its sentences as references.
- ADE20K / Cityscapes: COCO panoptic format (`*_panoptic_val.json` + a folder of PNGs whose
  colour encodes segment ids), as detectron2's preparation scripts and cityscapesScripts'
  `createPanopticImgs.py` write them.
- ADE20K instances (reference scoring): `ade20k_instance_val.json`, COCO instances format as
  detectron2's `prepare_ade20k_ins_seg.py` writes it (RLE masks, ids shared with the panoptic
  JSON); Cityscapes' own `gtFine/val/<city>/*_gtFine_{labelIds,instanceIds}.png`.
- POPE: JSON lines {question_id, image, text, label}.
- shapes: the synthetic set's parquet shards (its `category` rows).
"""

from __future__ import annotations

import json
import pickle
import posixpath
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from osprey.data.masks import annotation_to_rle
from osprey.eval.openvocab import Category
from osprey.io.storage import Location

ITEM_FIELDS = (
    "item_id",  # unique per item
    "image_path",  # URI of the image file, or None when `image` holds the bytes
    "image",  # encoded image bytes (shapes) or None
    "panoptic_path",  # URI of a panoptic PNG whose segment ids the regions name, or None
    "question",  # this item's own question (POPE, shapes), else None: the benchmark's
    "regions",  # JSON list of {"id", "mask": RLE | None, "segment": int | None, "truth"}
    "truth",  # JSON: image-level ground truth (POPE's label, a panoptic image's segments)
)

Item = dict[str, Any]


def _item(item_id: str, **fields: Any) -> Item:
    item = {name: None for name in ITEM_FIELDS} | {"item_id": item_id}
    for key in ("regions", "truth"):
        if key in fields:
            fields[key] = json.dumps(fields[key])
    item.update(fields)
    return item


def _rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    rle = annotation_to_rle(segmentation, height, width)
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


# --------------------------------------------------------------------------------------------
# LVIS / PACO
# --------------------------------------------------------------------------------------------


def read_category_json(annotations: Location, images: Location) -> list[Item]:
    """Osprey's LVIS/PACO evaluation JSON; regions named "<entry>:<annotation>"."""
    data = annotations.read_json()
    if not isinstance(data, list):
        raise ValueError(f"{annotations.uri}: expected a JSON list of images")
    by_file: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for index, entry in enumerate(data):
        where = f"{annotations.uri}: entry {index}"
        for key in ("file_name", "height", "width", "categories", "annotations"):
            if key not in entry:
                raise ValueError(f"{where}: missing {key!r}")
        if len(entry["categories"]) != len(entry["annotations"]):
            raise ValueError(
                f"{where}: {len(entry['categories'])} categories for "
                f"{len(entry['annotations'])} annotations"
            )
        name = entry["file_name"]
        if name not in by_file:
            order.append(name)
        for k, (category, ann) in enumerate(
            zip(entry["categories"], entry["annotations"], strict=True)
        ):
            mask = _rle(ann["segmentation"], int(entry["height"]), int(entry["width"]))
            by_file[name].append(
                {"id": f"{index}:{k}", "mask": mask, "segment": None, "truth": category}
            )
    return [_item(name, image_path=images.child(name).uri, regions=by_file[name]) for name in order]


# --------------------------------------------------------------------------------------------
# RefCOCOg
# --------------------------------------------------------------------------------------------


def coco2014_short_name(file_name: str) -> str:
    """The reference reads "COCO_train2014_000000123.jpg" as "000000123.jpg"."""
    return file_name.split("_")[-1]


def read_refcocog(annotations: Location, images: Location) -> list[Item]:
    """Osprey's finetune_refcocog_val_with_mask.json; regions named by annotation id."""
    data = annotations.read_json()
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{annotations.uri}: expected a COCO-form file with an 'images' list")
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    regions: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for entry in data["images"]:
        name = coco2014_short_name(entry["file_name"])
        if name not in regions:
            order.append(name)
        for ann in by_image.get(entry["id"], []):
            mask = _rle(ann["segmentation"], int(entry["height"]), int(entry["width"]))
            regions[name].append(
                {"id": str(ann["id"]), "mask": mask, "segment": None, "truth": [entry["caption"]]}
            )
    return [
        _item(name, image_path=images.child(name).uri, regions=regions[name])
        for name in order
        if regions[name]
    ]


def read_refer(
    refs: Location, instances: Location, images: Location, split: str = "val"
) -> list[Item]:
    """The original refer release: `refs(umd).p` (a pickled list of refs) with COCO's
    instances.json; one region per ref of `split`, every sentence a reference caption."""
    loaded = pickle.loads(refs.read_bytes())  # noqa: S301 - the data set's own format
    coco = instances.read_json()
    anns = {a["id"]: a for a in coco["annotations"]}
    infos = {im["id"]: im for im in coco["images"]}
    regions: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for ref in loaded:
        if ref.get("split") != split:
            continue
        info, ann = infos[ref["image_id"]], anns[ref["ann_id"]]
        name = coco2014_short_name(info["file_name"])
        if name not in regions:
            order.append(name)
        mask = _rle(ann["segmentation"], int(info["height"]), int(info["width"]))
        truth = [s["sent"] for s in ref["sentences"]]
        regions[name].append(
            {"id": str(ref["ref_id"]), "mask": mask, "segment": None, "truth": truth}
        )
    return [_item(name, image_path=images.child(name).uri, regions=regions[name]) for name in order]


# --------------------------------------------------------------------------------------------
# COCO panoptic (ADE20K, Cityscapes)
# --------------------------------------------------------------------------------------------


def ade20k_image(images: Location, info: dict) -> Location:
    return images.child(info["file_name"])


_CITYSCAPES_ID = re.compile(r"^([a-z_]+?)_(\d{6})_(\d{6})")


def cityscapes_image(images: Location, info: dict) -> Location:
    """leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png from the image id (the
    panoptic JSON's file_name, "<id>_gtFine_leftImg8bit.png", names no real file)."""
    match = _CITYSCAPES_ID.match(str(info["id"]))
    if not match:
        return images.child(info["file_name"])
    city = match.group(1)
    return images.child(posixpath.join(city, f"{match.group(0)}_leftImg8bit.png"))


def read_panoptic(
    annotations: Location,
    panoptic: Location,
    images: Location,
    image_of: Callable[[Location, dict], Location] = ade20k_image,
    max_segments: int = 300,
) -> tuple[list[Item], list[Category]]:
    """COCO panoptic JSON + PNG folder -> items (one region per segment of segments_info, at
    most `max_segments` like the reference's 300 queries) and the categories."""
    data = annotations.read_json()
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotations.uri}: missing the {key!r} list of a panoptic file")
    categories = [
        Category(int(c["id"]), str(c["name"]), bool(c.get("isthing", 0)))
        for c in data["categories"]
    ]
    infos = {im["id"]: im for im in data["images"]}
    items = []
    for ann in data["annotations"]:
        info = infos.get(ann["image_id"])
        if info is None:
            raise ValueError(f"{annotations.uri}: annotation of unknown image {ann['image_id']!r}")
        segments = [
            {
                "id": int(s["id"]),
                "category_id": int(s["category_id"]),
                "iscrowd": int(s.get("iscrowd", 0)),
                **({"area": int(s["area"])} if "area" in s else {}),
            }
            for s in ann["segments_info"]
        ]
        # The reference asks about the PNG's segments in increasing id order.
        ordered = sorted(segments, key=lambda s: s["id"])[:max_segments]
        regions = [
            {
                "id": f"{ann['image_id']}:{s['id']}",
                "mask": None,
                "segment": s["id"],
                "truth": s["category_id"],
            }
            for s in ordered
        ]
        items.append(
            _item(
                str(ann["image_id"]),
                image_path=image_of(images, info).uri,
                panoptic_path=panoptic.child(ann["file_name"]).uri,
                regions=regions,
                truth={
                    "segments": segments,
                    "height": info.get("height"),
                    "width": info.get("width"),
                },
            )
        )
    return items, categories


def read_instance_json(annotations: Location) -> dict[str, list[dict[str, Any]]]:
    """COCO instances JSON -> {image id (as text): [{category_id, segmentation RLE, iscrowd}]};
    polygons and uncompressed RLE are turned into RLE at the image's size."""
    data = annotations.read_json()
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotations.uri}: missing the {key!r} list of an instances file")
    sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in data["images"]}
    out: dict[str, list[dict[str, Any]]] = {str(i): [] for i in sizes}
    for ann in data["annotations"]:
        if ann.get("image_id") not in sizes:
            raise ValueError(
                f"{annotations.uri}: annotation of unknown image {ann.get('image_id')!r}"
            )
        height, width = sizes[ann["image_id"]]
        out[str(ann["image_id"])].append(
            {
                "category_id": int(ann["category_id"]),
                "segmentation": _rle(ann["segmentation"], height, width),
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    return out


def cityscapes_gtfine(gt_fine: Location, image_id: str) -> tuple[Location, Location]:
    """The label-id and instance-id PNGs of a Cityscapes image under gtFine/<split>/."""
    match = _CITYSCAPES_ID.match(image_id)
    if not match:
        raise ValueError(f"{image_id!r} is not a Cityscapes image id (<city>_<seq>_<frame>)")
    folder = gt_fine.child(match.group(1))
    return (
        folder.child(f"{match.group(0)}_gtFine_labelIds.png"),
        folder.child(f"{match.group(0)}_gtFine_instanceIds.png"),
    )


def read_class_names(text: str, where: str = "class names") -> list[str]:
    """Class names with synonyms, one class per line "<id>:<name>[,<synonym>...]" in the order
    of the panoptic JSON's categories (the reference's `*_with_prompt_eng.txt` form; a line
    named `invalid_class_id`, ADE20K's 0, is skipped)."""
    names = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, name = line.partition(":")
        if not name or not key.strip().isdigit():
            raise ValueError(f"{where}: expected '<id>:<names>', got {line!r}")
        if name.strip() != "invalid_class_id":
            names.append(name.strip())
    return names


def rename_categories(categories: list[Category], names: list[str], where: str) -> list[Category]:
    """The categories (in the JSON's order) with the names of a class-name file."""
    if len(names) != len(categories):
        raise ValueError(
            f"{where} names {len(names)} classes but the panoptic JSON has {len(categories)}"
        )
    return [Category(c.id, n, c.isthing) for c, n in zip(categories, names, strict=True)]


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------


def read_pope(questions: Location, images: Location) -> list[Item]:
    """POPE's JSON lines; an image named "COCO_val2014_<id>.jpg" is also tried as "<id>.jpg"."""
    items = []
    for n, record in enumerate(questions.read_jsonl()):
        for key in ("image", "text", "label"):
            if key not in record:
                raise ValueError(f"{questions.uri}: line {n + 1} lacks {key!r}")
        image = images.child(record["image"])
        if not image.exists():
            short = images.child(record["image"].split("_")[-1])
            image = short if short.exists() else image
        items.append(
            _item(
                str(record.get("question_id", n)),
                image_path=image.uri,
                question=record["text"],
                truth=record["label"],
            )
        )
    return items


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------

_REGION = re.compile(r"<region\d+>")


def read_shapes(val_dir: Location) -> list[Item]:
    """The synthetic set's category rows: each image's own category question, every region."""
    import pyarrow.parquet as pq

    items = []
    for name in sorted(n for n in val_dir.list_files() if n.endswith(".parquet")):
        with val_dir.fs.open_input_file(val_dir.child(name).path) as handle:
            table = pq.read_table(handle)
        for row in table.to_pylist():
            if row["task"] != "category":
                continue
            question = _REGION.sub("<region>", row["conversations"][0]["value"])
            regions = [
                {
                    "id": f"{row['sample_id']}:{k}",
                    "mask": {"size": list(r["size"]), "counts": _text(r["counts"])},
                    "segment": None,
                    "truth": r["category"],
                }
                for k, r in enumerate(row["regions"])
            ]
            items.append(
                _item(str(row["sample_id"]), image=row["image"], question=question, regions=regions)
            )
    return items


def _text(counts: Any) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
