"""Each benchmark reader on small files written in the benchmark's exact original format."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from osprey.eval.benchmarks import BENCHMARKS, BenchmarkData
from osprey.eval.openvocab import id2rgb
from osprey.eval.readers import (
    cityscapes_image,
    read_category_json,
    read_class_names,
    read_panoptic,
    read_pope,
    read_refcocog,
    read_refer,
    read_shapes,
)
from osprey.io.storage import resolve


def decode(region) -> np.ndarray:
    rle = {"size": region["mask"]["size"], "counts": region["mask"]["counts"].encode()}
    return mask_utils.decode(rle)


def write_image(path, height=20, width=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)
    return path


def square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_lvis_paco_json(tmp_path):
    # Osprey's lvis_val_1k_category.json / paco_val_1k_category.json: a list of images.
    rle = mask_utils.encode(
        np.asfortranarray(np.pad(np.ones((4, 4), np.uint8), ((0, 16), (0, 26))))
    )
    rle["counts"] = rle["counts"].decode()
    data = [
        {
            "file_name": "000000000139.jpg",
            "height": 20,
            "width": 30,
            "categories": ["baseball_bat", "mug:handle"],
            "annotations": [
                {"segmentation": square_polygon(10, 5, 20, 15), "bbox": [10, 5, 10, 10]},
                {"segmentation": rle},
            ],
        },
        {
            "file_name": "000000000285.jpg",
            "height": 20,
            "width": 30,
            "categories": ["bear"],
            "annotations": [{"segmentation": square_polygon(0, 0, 5, 5)}],
        },
    ]
    ann = tmp_path / "lvis_val_1k_category.json"
    ann.write_text(json.dumps(data))
    items = read_category_json(resolve(str(ann)), resolve(str(tmp_path / "images")))
    assert [i["item_id"] for i in items] == ["000000000139.jpg", "000000000285.jpg"]
    assert items[0]["image_path"] == str(tmp_path / "images" / "000000000139.jpg")
    regions = json.loads(items[0]["regions"])
    assert [r["id"] for r in regions] == ["0:0", "0:1"]
    assert [r["truth"] for r in regions] == ["baseball_bat", "mug:handle"]
    first, second = decode(regions[0]), decode(regions[1])
    assert first.shape == (20, 30) and first[10, 15] == 1 and first[2, 2] == 0
    assert second.sum() == 16 and second[:4, :4].all()

    bad = [dict(data[0], categories=["one"])]
    ann.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="1 categories for 2 annotations"):
        read_category_json(resolve(str(ann)), resolve(str(tmp_path)))


def test_refcocog_osprey_json(tmp_path):
    # finetune_refcocog_val_with_mask.json: one image entry per expression.
    data = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000042.jpg", "height": 20, "width": 30,
             "caption": "the man on the left"},
            {"id": 2, "file_name": "COCO_train2014_000000000042.jpg", "height": 20, "width": 30,
             "caption": "a dog"},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "segmentation": square_polygon(0, 0, 10, 10), "category_id": 1},
            {"id": 12, "image_id": 2, "segmentation": square_polygon(15, 5, 25, 15), "category_id": 18},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }  # fmt: skip
    ann = tmp_path / "finetune_refcocog_val_with_mask.json"
    ann.write_text(json.dumps(data))
    items = read_refcocog(resolve(str(ann)), resolve(str(tmp_path / "images")))
    # Both expressions are about one COCO image, read as "<id>.jpg" like the reference.
    assert len(items) == 1
    assert items[0]["image_path"].endswith("images/000000000042.jpg")
    regions = json.loads(items[0]["regions"])
    assert [(r["id"], r["truth"]) for r in regions] == [
        ("11", ["the man on the left"]),
        ("12", ["a dog"]),
    ]
    assert decode(regions[1])[10, 20] == 1


def test_refcocog_refer_pickle(tmp_path):
    # The refer release: refs(umd).p (pickled list) + COCO's instances.json.
    refs = [
        {"ref_id": 5, "ann_id": 100, "image_id": 42, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000042_100.jpg",
         "sentences": [{"sent": "man in red", "raw": "Man in red.", "tokens": ["man", "in", "red"]},
                       {"sent": "left man", "raw": "left man", "tokens": ["left", "man"]}]},
        {"ref_id": 6, "ann_id": 100, "image_id": 42, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000042_100.jpg", "sentences": [{"sent": "x"}]},
    ]  # fmt: skip
    instances = {
        "images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 20, "width": 30}],
        "annotations": [{"id": 100, "image_id": 42, "segmentation": square_polygon(0, 0, 10, 10),
                         "category_id": 1, "iscrowd": 0}],
    }  # fmt: skip
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    items = read_refer(
        resolve(str(tmp_path / "refs(umd).p")),
        resolve(str(tmp_path / "instances.json")),
        resolve(str(tmp_path / "images")),
    )
    assert len(items) == 1
    [region] = json.loads(items[0]["regions"])
    assert region["id"] == "5" and region["truth"] == ["man in red", "left man"]
    # The benchmark picks the pickle reader from the file name.
    data = BenchmarkData(root=str(tmp_path), annotations=str(tmp_path / "refs(umd).p"))
    items2, _ = BENCHMARKS["refcocog"].read(data)
    assert items2 == items


def write_panoptic(root, file_name, ids, segments, image_name):
    (root / "panoptic").mkdir(parents=True, exist_ok=True)
    Image.fromarray(id2rgb(ids)).save(root / "panoptic" / file_name)
    return {"image_id": image_name, "file_name": file_name, "segments_info": segments}


def test_ade20k_panoptic(tmp_path):
    # detectron2's prepare_ade20k_pan_seg.py output: COCO panoptic JSON + RGB-id PNGs.
    ids = np.zeros((20, 30), np.int64)
    ids[:10], ids[10:, :15], ids[10:, 15:] = 1, 7 * 256 + 3, 70000
    segments = [
        {"id": 70000, "category_id": 12, "iscrowd": 0, "area": 150, "bbox": [15, 10, 15, 10]},
        {"id": 1, "category_id": 0, "iscrowd": 0, "area": 300, "bbox": [0, 0, 30, 10]},
        {"id": 7 * 256 + 3, "category_id": 12, "iscrowd": 1, "area": 150, "bbox": [0, 10, 15, 10]},
    ]
    data = {
        "images": [{"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg",
                    "height": 20, "width": 30}],
        "annotations": [write_panoptic(tmp_path, "ADE_val_00000001.png", ids, segments,
                                       "ADE_val_00000001")],
        "categories": [{"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
                       {"id": 12, "name": "person, individual", "isthing": 1, "color": [150, 5, 61]}],
    }  # fmt: skip
    (tmp_path / "ade20k_panoptic_val.json").write_text(json.dumps(data))
    items, categories = read_panoptic(
        resolve(str(tmp_path / "ade20k_panoptic_val.json")),
        resolve(str(tmp_path / "panoptic")),
        resolve(str(tmp_path / "images")),
    )
    assert [(c.id, c.isthing, c.synonyms) for c in categories] == [
        (0, False, ["wall"]),
        (12, True, ["person", "individual"]),
    ]
    [item] = items
    assert item["image_path"].endswith("images/ADE_val_00000001.jpg")
    assert item["panoptic_path"].endswith("panoptic/ADE_val_00000001.png")
    regions = json.loads(item["regions"])
    # In increasing segment id order, as the reference walks the PNG's ids.
    assert [r["segment"] for r in regions] == [1, 7 * 256 + 3, 70000]
    assert [r["truth"] for r in regions] == [0, 12, 12]
    truth = json.loads(item["truth"])
    assert {s["id"]: s["iscrowd"] for s in truth["segments"]} == {70000: 0, 1: 0, 1795: 1}

    # The masks the workers build from the PNG are the segments' pixels.
    from osprey.eval.answer import item_masks

    masks = item_masks(item, regions)
    assert [int(m.sum()) for m in masks] == [300, 150, 150]

    # A class-name file (the reference's form) renames the categories in the JSON's order.
    names = tmp_path / "names.txt"
    names.write_text("0:invalid_class_id\n1:wall,walls\n2:person,people\n")
    assert read_class_names(names.read_text()) == ["wall,walls", "person,people"]
    spec = BenchmarkData(root=str(tmp_path), panoptic=str(tmp_path / "panoptic"))
    _, cats = BENCHMARKS["ade20k"].read(
        BenchmarkData(**{**spec.__dict__, "class_names": str(names)})
    )
    assert [(c.id, c.synonyms) for c in cats] == [
        (0, ["wall", "walls"]),
        (12, ["person", "people"]),
    ]
    # By default the paper's names apply only to the full 150-class JSON; "json" keeps the JSON's.
    for choice in (None, "json"):
        _, cats = BENCHMARKS["ade20k"].read(
            BenchmarkData(**{**spec.__dict__, "class_names": choice})
        )
        assert cats == categories
    names.write_text("0:wall\n")
    with pytest.raises(ValueError, match="names 1 classes but the panoptic JSON has 2"):
        BENCHMARKS["ade20k"].read(BenchmarkData(**{**spec.__dict__, "class_names": str(names)}))


def test_the_papers_class_names_are_bundled():
    from importlib import resources

    for name, count in (("ade20k_150.txt", 150), ("cityscapes.txt", 19)):
        text = resources.files("osprey.eval").joinpath("classes", name).read_text()
        assert len(read_class_names(text)) == count
    text = resources.files("osprey.eval").joinpath("classes", "cityscapes.txt").read_text()
    assert read_class_names(text)[13] == "car,cars"


def test_cityscapes_panoptic_paths(tmp_path):
    # cityscapesScripts' createPanopticImgs.py: image ids "<city>_<seq>_<frame>", segment ids
    # labelId * 1000 + instance for things, labelId for stuff.
    ids = np.full((20, 30), 7, np.int64)
    ids[5:15, 5:15] = 26 * 1000 + 1
    root = tmp_path / "cityscapes"
    segments = [
        {"id": 7, "category_id": 7, "iscrowd": 0, "area": 500, "bbox": [0, 0, 30, 20]},
        {"id": 26001, "category_id": 26, "iscrowd": 0, "area": 100, "bbox": [5, 5, 10, 10]},
    ]
    (root / "gtFine" / "cityscapes_panoptic_val").mkdir(parents=True)
    Image.fromarray(id2rgb(ids)).save(
        root / "gtFine" / "cityscapes_panoptic_val" / "frankfurt_000000_000294_gtFine_panoptic.png"
    )
    data = {
        "images": [{"id": "frankfurt_000000_000294", "height": 20, "width": 30,
                    "file_name": "frankfurt_000000_000294_gtFine_leftImg8bit.png"}],
        "annotations": [{"image_id": "frankfurt_000000_000294",
                         "file_name": "frankfurt_000000_000294_gtFine_panoptic.png",
                         "segments_info": segments}],
        "categories": [{"id": 7, "name": "road", "supercategory": "flat", "isthing": 0, "color": [128, 64, 128]},
                       {"id": 26, "name": "car", "supercategory": "vehicle", "isthing": 1, "color": [0, 0, 142]}],
    }  # fmt: skip
    (root / "gtFine" / "cityscapes_panoptic_val.json").write_text(json.dumps(data))
    items, categories = BENCHMARKS["cityscapes"].read(BenchmarkData(root=str(root)))
    [item] = items
    assert item["image_path"] == str(
        root / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    )
    assert [c.name for c in categories] == ["road", "car"]
    assert cityscapes_image(resolve(str(root)), {"id": "x", "file_name": "x.png"}).path.endswith(
        "x.png"
    )


def test_pope_jsonl(tmp_path):
    # POPE's coco_pope_random.json: JSON lines.
    lines = [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a snowboard in the image?", "label": "yes"},
        {"question_id": 2, "image": "000000210789.jpg", "text": "Is there a dog in the image?",
         "label": "no"},
    ]  # fmt: skip
    (tmp_path / "coco_pope_random.json").write_text("\n".join(json.dumps(x) for x in lines))
    write_image(tmp_path / "val2014" / "000000310196.jpg")
    items = read_pope(
        resolve(str(tmp_path / "coco_pope_random.json")), resolve(str(tmp_path / "val2014"))
    )
    assert [i["item_id"] for i in items] == ["1", "2"]
    # The COCO_val2014_ name is missing: the short name that exists is taken instead.
    assert items[0]["image_path"].endswith("val2014/000000310196.jpg")
    assert items[1]["image_path"].endswith("val2014/000000210789.jpg")
    assert items[0]["question"] == "Is there a snowboard in the image?"
    assert items[0]["regions"] is None and json.loads(items[1]["truth"]) == "no"


def test_shapes_validation_split(tmp_path):
    import re

    import pyarrow.parquet as pq

    from osprey.data.shapes import write_shapes_dataset

    write_shapes_dataset(str(tmp_path / "shapes"), n=20, seed=1, progress=False)
    items = read_shapes(resolve(str(tmp_path / "shapes" / "val")))
    # Read here from the shards: each region of a `category` row, its question with the region
    # written <region1>, and its category as the truth.
    expected = []
    for shard in sorted((tmp_path / "shapes" / "val").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            if row["task"] == "category":
                first = row["conversations"][0]["value"]
                question = re.sub(r"<region\d*>", "<region1>", first)
                expected += [(row["image"], r, question, r["category"]) for r in row["regions"]]
    regions = [r for item in items for r in json.loads(item["regions"])]
    assert len(regions) == len(expected) > 0
    assert [r["truth"] for r in regions] == [truth for *_, truth in expected]
    assert all(item["image"] and "<region>" in item["question"] for item in items)
    assert all("<region1>" in q for _, _, q, _ in expected)


def test_missing_paths_name_the_option():
    with pytest.raises(ValueError, match="--data"):
        BENCHMARKS["lvis"].read(BenchmarkData())
