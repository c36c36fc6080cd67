"""Converters: every source format, written in its original form, comes back out of our shards."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from osprey.data import masks, shards
from osprey.data.converters import (
    CocoInstances,
    ConversionStats,
    ImageFolder,
    LlavaCaptions,
    Osprey724K,
    RefCoco,
    Vcr,
    VisualGenome,
    iter_rows,
    resolve,
)
from osprey.data.prepare import add_prepare_arguments, run_prepare
from osprey.prompts import SHORT_ANSWER_SUFFIX as SHORT_ANSWER
from osprey.prompts import VCR_REFERENCE_WAYS, VCR_WHY_QUESTIONS

W, H = 40, 30


# ---------------------------------------------------------------- original-format fixtures


def write_image(path: Path, size: tuple[int, int] = (W, H), fmt: str = "PNG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def blob(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    mask[y : y + 7, x : x + 5] = 1
    mask[y + 2, x + 6] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's iscrowd form: column-major run lengths starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def coco_decode(segmentation, h: int = H, w: int = W) -> np.ndarray:
    """The reference decoding: what pycocotools makes of the original annotation."""
    if isinstance(segmentation, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w)))
    if isinstance(segmentation["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(segmentation, h, w))
    return mask_utils.decode(segmentation)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def convert_to_shards(converter, tmp_path: Path, rows_per_shard: int = 2):
    """Convert, write shards, read them back: the round trip every test checks."""
    stats = ConversionStats()
    out = tmp_path / "shards"
    paths = shards.write_shards(
        iter_rows(converter, stats, progress=False), str(out), "t", rows_per_shard
    )
    rows = [row for p in paths for row in shards.iter_rows(p)]
    assert stats.rows == len(rows)
    return rows, stats


def assert_masks_equal(region: dict, segmentation, h: int = H, w: int = W) -> None:
    ours = masks.decode_region(region)
    expected = coco_decode(segmentation, h, w)
    assert ours.shape == expected.shape == (h, w)
    np.testing.assert_array_equal(ours, expected)
    assert region["area"] == float(expected.sum())


# ---------------------------------------------------------------- COCO form


def coco_dataset(tmp_path: Path) -> tuple[Path, Path, dict]:
    images = tmp_path / "imgs"
    write_image(images / "000000000001.jpg")
    write_image(images / "000000000003.jpg")
    segs = {
        1: polygon(2, 3, 20, 15),
        2: uncompressed_rle(blob(seed=1)),
        3: compressed_rle(blob(seed=2)),
        4: polygon(100, 100, 140, 120),  # entirely outside the 40x30 image
        5: compressed_rle(blob(h=10, w=10, seed=3)),  # RLE of another size
        6: [[1, 1, 5, 5]],  # two points: pycocotools would read it as a box
        7: polygon(1, 1, 9, 9),  # unknown category id
    }
    annotations = [
        {"id": k, "image_id": 1, "category_id": 18 if k != 7 else 999, "segmentation": s}
        for k, s in segs.items()
    ]
    annotations[1]["iscrowd"] = 1
    annotations.append(
        {"id": 8, "image_id": 3, "category_id": 1, "segmentation": polygon(1, 1, 5, 5)}
    )
    data = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "000000000002.jpg", "height": H, "width": W},  # no annotations
            {"id": 3, "file_name": "000000000003.jpg", "height": 99, "width": W},  # wrong size
            {"id": 4, "file_name": "missing.jpg", "height": H, "width": W},
        ],
        "annotations": annotations
        + [{"id": 9, "image_id": 4, "category_id": 1, "segmentation": polygon(1, 1, 5, 5)}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    return write_json(tmp_path / "instances.json", data), images, segs


def test_coco_instances_masks_match_pycocotools(tmp_path, caplog):
    ann_file, images, segs = coco_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="osprey.data.converters"):
        rows, stats = convert_to_shards(CocoInstances(str(ann_file), str(images)), tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert row["sample_id"] == "coco:1" and row["source"] == "coco" and row["task"] == "category"
    assert row["image"] == (images / "000000000001.jpg").read_bytes()
    assert row["image_path"] == str(images / "000000000001.jpg")
    assert (row["width"], row["height"]) == (W, H)
    assert row["conversations"] == []
    assert [r["category"] for r in row["regions"]] == ["dog", "dog", "dog"]
    for region, k in zip(row["regions"], (1, 2, 3), strict=True):
        assert_masks_equal(region, segs[k])
    # annotations 4-7 are skipped; image 3 (size mismatch) and image 4 (missing file) too
    assert stats.skipped_annotations == 4
    assert stats.skipped_entries == 2
    for k in (4, 5, 6, 7):
        assert f"annotation {k} " in caplog.text
    assert "missing.jpg" in caplog.text


def test_part_datasets_answer_object_and_part(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "a.jpg")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon(1, 1, 9, 9)},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": polygon(10, 1, 19, 9)},
    ]
    images_list = [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}]
    pascal = write_json(
        tmp_path / "pascal.json",
        {
            "images": images_list,
            "annotations": anns,
            "categories": [
                {"id": 1, "name": "cat:head", "supercategory": "cat"},
                {"id": 2, "name": "tail", "supercategory": "dog"},
            ],
        },
    )
    part_in = write_json(
        tmp_path / "partimagenet.json",
        {
            "images": images_list,
            "annotations": anns,
            "categories": [
                {"id": 1, "name": "Quadruped Head", "supercategory": "Quadruped"},
                {"id": 2, "name": "Fin", "supercategory": "Fish"},
            ],
        },
    )
    rows, _ = convert_to_shards(
        CocoInstances(str(pascal), str(images), source="pascal_part", part_separator=":"),
        tmp_path / "p",
    )
    assert [r["category"] for r in rows[0]["regions"]] == ["cat:head", "dog:tail"]
    rows, _ = convert_to_shards(
        CocoInstances(str(part_in), str(images), source="partimagenet", part_separator=" "),
        tmp_path / "q",
    )
    assert [r["category"] for r in rows[0]["regions"]] == ["Quadruped Head", "Fish Fin"]


def test_refcoco_rows_are_referring_expressions(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "000000000009.jpg")  # the 2017 name of the file the JSON calls 2014
    seg_a, seg_b = polygon(2, 2, 12, 20), compressed_rle(blob(seed=5))
    data = {
        "images": [
            {
                "id": 100,
                "file_name": "COCO_train2014_000000000009.jpg",
                "height": H,
                "width": W,
                "caption": "the dog on the left",
            },
            {
                "id": 101,
                "file_name": "COCO_train2014_000000000009.jpg",
                "height": H,
                "width": W,
                "caption": "man in red",
            },
        ],
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 18, "segmentation": seg_a},
            {"id": 2, "image_id": 101, "category_id": 1, "segmentation": seg_b},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    ann_file = write_json(tmp_path / "finetune_refcoco_train_with_mask.json", data)
    rows, stats = convert_to_shards(RefCoco(str(ann_file), str(images)), tmp_path)
    assert [r["sample_id"] for r in rows] == ["refcoco:100", "refcoco:101"]
    assert {r["task"] for r in rows} == {"refer"}
    assert rows[0]["regions"][0]["category"] == "the dog on the left"
    assert rows[1]["regions"][0]["category"] == "man in red"
    assert_masks_equal(rows[0]["regions"][0], seg_a)
    assert_masks_equal(rows[1]["regions"][0], seg_b)
    assert rows[0]["image_path"].endswith("000000000009.jpg")
    assert stats.skipped_entries == stats.skipped_annotations == 0


def test_visual_genome_regions_carry_captions(tmp_path):
    images = tmp_path / "image"
    write_image(images / "1.jpg")
    segs = [uncompressed_rle(blob(seed=7)), polygon(3, 4, 30, 25), polygon(0, 0, 5, 5)]
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "a red kite", "segmentation": segs[0]},
            {"id": 12, "image_id": 1, "caption": "green grass", "segmentation": segs[1]},
            {"id": 13, "image_id": 1, "caption": "x", "segmentation": segs[2], "ignore": True},
        ],
        "categories": [],
    }
    ann_file = write_json(tmp_path / "vg_train_with_mask.json", data)
    rows, stats = convert_to_shards(VisualGenome(str(ann_file), str(images)), tmp_path)
    (row,) = rows
    assert row["task"] == "short" and row["sample_id"] == "vg:1"
    assert [r["category"] for r in row["regions"]] == ["a red kite", "green grass"]
    assert_masks_equal(row["regions"][0], segs[0])
    assert_masks_equal(row["regions"][1], segs[1])
    assert stats.skipped_annotations == 0


# ---------------------------------------------------------------- Osprey-724K


def osprey_entry(file_name: str, segs: list, **text) -> dict:
    return {
        "id": 1,
        "file_name": file_name,
        "height": H,
        "width": W,
        "annotation": [{"bbox": [0, 0, 1, 1], "segmentation": s, "category_id": 1} for s in segs],
        **text,
    }


CONVERSATION = [
    {"from": "human", "value": "What is the woman in <region1> holding?"},
    {"from": "gpt", "value": "The woman in <region1> holds a leash tied to <region2>."},
    {"from": "human", "value": "Compare <region1> and <region2>."},
    {"from": "gpt", "value": "<region2> is smaller."},
    {"from": "human", "value": "A trailing question without an answer is dropped."},
]


@pytest.mark.parametrize("kind", ["conversation", "short", "part"])
def test_osprey724k_conversations_name_regions_once(tmp_path, kind):
    images = tmp_path / "coco"
    write_image(images / "000000000042.jpg")
    segs = [polygon(1, 1, 15, 25), compressed_rle(blob(seed=11))]
    entries = [
        osprey_entry("COCO_train2014_000000000042.jpg", segs, conversations=CONVERSATION),
        # region 2 lies outside the image: the text refers to it, so the entry goes
        osprey_entry(
            "000000000042.jpg", [segs[0], polygon(90, 90, 99, 99)], conversations=CONVERSATION
        ),
        osprey_entry("000000000042.jpg", segs, conversations=[]),
    ]
    ann_file = write_json(tmp_path / f"osprey_{kind}.json", entries)
    rows, stats = convert_to_shards(Osprey724K(str(ann_file), str(images), kind), tmp_path)
    (row,) = rows
    assert row["task"] == kind and row["source"] == f"osprey_{kind}"
    assert row["sample_id"] == f"osprey_{kind}:COCO_train2014_000000000042.jpg:0"
    limit = SHORT_ANSWER if kind in ("short", "part") else ""
    intro = "Ther are 2 part regions in the picture: region1<region1>,region2<region2>. "
    assert row["conversations"] == [
        {"from": "human", "value": intro + "What is the woman in region1 holding?" + limit},
        {"from": "gpt", "value": "The woman in region1 holds a leash tied to region2."},
        {"from": "human", "value": "Compare region1 and region2." + limit},
        {"from": "gpt", "value": "region2 is smaller."},
    ]
    for region, seg in zip(row["regions"], segs, strict=True):
        assert_masks_equal(region, seg)
    assert stats.skipped_annotations == 1 and stats.skipped_entries == 2


def test_osprey724k_posneg_keeps_region_tags(tmp_path):
    images = tmp_path / "coco"
    write_image(images / "000000000007.jpg")
    segs = [uncompressed_rle(blob(seed=3)), polygon(20, 5, 35, 25)]
    conv = [
        {"from": "human", "value": "Is <region1> a cat?"},
        {"from": "gpt", "value": "No."},
        {"from": "human", "value": "Is <region2> a dog?"},
        {"from": "gpt", "value": "Yes."},
    ]
    bad = [{"from": "human", "value": "Is <region3> a cat?"}, {"from": "gpt", "value": "No."}]
    entries = [
        osprey_entry("000000000007.jpg", segs, conversations=conv),
        osprey_entry("000000000007.jpg", segs, conversations=bad),
    ]
    ann_file = write_json(tmp_path / "osprey_lvis_positive_negative.json", entries)
    rows, stats = convert_to_shards(Osprey724K(str(ann_file), str(images), "posneg"), tmp_path)
    (row,) = rows
    assert row["conversations"] == conv
    assert row["task"] == "posneg"
    for region, seg in zip(row["regions"], segs, strict=True):
        assert_masks_equal(region, seg)
    assert stats.skipped_entries == 1


def test_osprey724k_detailed_descriptions_become_region_labels(tmp_path):
    images = tmp_path / "coco"
    write_image(images / "000000000005.jpg")
    segs = [polygon(1, 1, 15, 25), compressed_rle(blob(seed=4)), polygon(80, 80, 90, 90)]
    entry = osprey_entry(
        "COCO_train2014_000000000005.jpg",
        segs,
        description=[
            "<region2>: A brown dog lying on a mat.\nIt looks asleep.",
            "<region1>: A woman in a grey coat.",
            "<region3>: Outside the picture.",
        ],
    )
    ann_file = write_json(tmp_path / "osprey_detail_description.json", [entry])
    rows, stats = convert_to_shards(Osprey724K(str(ann_file), str(images), "detailed"), tmp_path)
    (row,) = rows
    assert row["task"] == "detailed" and row["conversations"] == []
    # As Osprey reads them: the i-th description is region i's, whatever its tag; first line only.
    assert [r["category"] for r in row["regions"]] == [
        "A brown dog lying on a mat.",
        "A woman in a grey coat.",
    ]
    assert_masks_equal(row["regions"][0], segs[0])
    assert_masks_equal(row["regions"][1], segs[1])
    assert stats.skipped_annotations == 1 and stats.skipped_entries == 0


# ---------------------------------------------------------------- VCR


def test_vcr_objects_become_named_regions(tmp_path):
    root = tmp_path / "vcr1images"
    write_image(root / "movie_a" / "frame@0.jpg", fmt="JPEG")
    person = [[[2.0, 3.0], [15.0, 3.0], [15.0, 25.0], [2.0, 25.0]]]
    dog = [[[20.0, 10.0], [35.0, 12.0], [30.0, 28.0]], [[22.0, 2.0], [26.0, 2.0], [24.0, 6.0]]]
    meta = {
        "boxes": [[2, 3, 15, 25, 0.99], [20, 2, 35, 28, 0.9]],
        "segms": [person, dog],
        "names": ["person", "dog"],
        "width": W,
        "height": H,
    }
    write_json(root / "movie_a" / "frame@0.json", meta)
    line = {
        "objects": ["person", "dog"],
        "img_fn": "movie_a/frame@0.jpg",
        "metadata_fn": "movie_a/frame@0.json",
        "question_orig": "Why is 1 looking at 2?",
        "answer_orig": "1 wants to pet 2.",
        "rationale_orig": "2 is wagging its tail at 1.",
        "annot_id": "train-0",
    }
    stray = dict(line, annot_id="train-1", question_orig="Are 3 people here?")
    ann_file = tmp_path / "train.jsonl"
    ann_file.write_text(json.dumps(line) + "\n" + json.dumps(stray) + "\n")
    rows, stats = convert_to_shards(Vcr(str(ann_file), str(root)), tmp_path)
    (row,) = rows
    assert row["sample_id"] == "vcr:train-0" and row["task"] == "conversation"
    turns = [t["value"] for t in row["conversations"]]
    assert [t["from"] for t in row["conversations"]] == ["human", "gpt", "human", "gpt"]
    ways = [
        w.replace("<region>", "region1 <region1>,region2 <region2>") for w in VCR_REFERENCE_WAYS
    ]
    opening = "<image>\n.\nThis provides an overview of the picture.\n"
    assert turns[0].startswith(opening)
    assert turns[0][len(opening) :] in [
        w + "Why is person at region1 looking at dog at region2?" for w in ways
    ]
    assert turns[2] in VCR_WHY_QUESTIONS
    assert turns[1] == "person at region1 wants to pet dog at region2."
    assert turns[3] == "dog at region2 is wagging its tail at person at region1."
    assert [r["category"] for r in row["regions"]] == ["person", "dog"]
    for region, polys in zip(row["regions"], (person, dog), strict=True):
        flat = [[v for point in p for v in point] for p in polys]
        assert_masks_equal(region, flat)
    assert stats.skipped_entries == 1


# ---------------------------------------------------------------- captions and plain images


def test_llava_captions(tmp_path):
    images = tmp_path / "images"
    write_image(images / "00453" / "004539375.jpg", size=(33, 21), fmt="JPEG")
    write_image(images / "GCC_train_002582585.jpg", size=(17, 19))
    data = [
        {
            "id": "004539375",
            "image": "00453/004539375.jpg",
            "conversations": [
                {
                    "from": "human",
                    "value": "Render a clear and concise summary of the photo.\n<image>",
                },
                {"from": "gpt", "value": "a mattress topper"},
            ],
        },
        {
            "id": "GCC_train_002582585",
            "image": "GCC_train_002582585.jpg",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nProvide a brief description of the given image.",
                },
                {"from": "gpt", "value": "olive oil is a healthy ingredient"},
            ],
        },
        {"id": "gone", "image": "gone.jpg", "conversations": CONVERSATION[:2]},
        {
            "id": "GCC_train_002582585",
            "image": "GCC_train_002582585.jpg",
            "conversations": [
                {"from": "human", "value": "Describe it."},
                {"from": "gpt", "value": "an <image> in the answer"},
            ],
        },
    ]
    ann_file = write_json(tmp_path / "chat.json", data)
    rows, stats = convert_to_shards(LlavaCaptions(str(ann_file), str(images)), tmp_path)
    assert [(r["width"], r["height"]) for r in rows] == [(33, 21), (17, 19)]
    assert {r["task"] for r in rows} == {"caption"}
    assert all(r["regions"] == [] for r in rows)
    assert [r["conversations"] for r in rows] == [d["conversations"] for d in data[:2]]
    assert stats.skipped_entries == 2  # the missing image, the misplaced placeholder


def test_image_folder_lists_images_recursively(tmp_path):
    root = tmp_path / "photos"
    a = write_image(root / "b" / "x.png", size=(12, 8))
    b = write_image(root / "a.jpg", size=(10, 14), fmt="JPEG")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    rows, stats = convert_to_shards(ImageFolder(str(root)), tmp_path)
    assert [r["sample_id"] for r in rows] == ["images:a.jpg", "images:b/x.png"]
    assert [r["image"] for r in rows] == [b, a]
    assert [(r["width"], r["height"]) for r in rows] == [(10, 14), (12, 8)]
    assert {r["task"] for r in rows} == {"images"}
    assert all(r["regions"] == [] and r["conversations"] == [] for r in rows)
    assert stats.skipped_entries == 1  # broken.jpg


@pytest.fixture
def moto_s3(monkeypatch):
    # This interpreter's moto (a moto_server on PATH may belong to another Python).
    pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_prepare_images_from_s3(tmp_path, moto_s3, capsys):
    fs = pafs.S3FileSystem(
        endpoint_override=moto_s3, scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    fs.create_dir("bucket")
    local = {
        "in/a.png": write_image(tmp_path / "a.png"),
        "in/sub/b.png": write_image(tmp_path / "b.png"),
    }
    for key, data in local.items():
        with fs.open_output_stream(f"bucket/{key}") as f:
            f.write(data)
    args = parse(
        ["images", "--images", "s3://bucket/in", "--out", "s3://bucket/shards"]
        + ["--s3-endpoint", moto_s3, "--s3-scheme", "http", "--s3-region", "us-east-1"]
    )
    paths = run_prepare(args)
    assert paths == ["s3://bucket/shards/shard-00000.parquet"]
    rows = list(shards.iter_rows(paths[0].removeprefix("s3://"), filesystem=fs))
    assert [r["image_path"] for r in rows] == ["s3://bucket/in/a.png", "s3://bucket/in/sub/b.png"]
    assert [r["image"] for r in rows] == list(local.values())
    assert "2 rows" in capsys.readouterr().out


# ---------------------------------------------------------------- shards and the prepare command


def test_wrong_schema_parquet_names_the_column(tmp_path):
    ann_file, images, _ = coco_dataset(tmp_path)
    rows = list(iter_rows(CocoInstances(str(ann_file), str(images)), progress=False))
    table = shards.rows_to_table(rows)
    bad_type = table.set_column(
        table.schema.get_field_index("width"), "width", pa.array(["40"], pa.string())
    )
    pq.write_table(bad_type, tmp_path / "bad_type.parquet")
    with pytest.raises(shards.ShardSchemaError, match="'width'"):
        shards.read_shard(str(tmp_path / "bad_type.parquet"))
    pq.write_table(table.drop(["regions"]), tmp_path / "missing.parquet")
    with pytest.raises(shards.ShardSchemaError, match="'regions'"):
        shards.read_shard(str(tmp_path / "missing.parquet"))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    return parser.parse_args(argv)


def test_run_prepare_writes_shards_and_summarises(tmp_path, capsys):
    ann_file, images, _ = coco_dataset(tmp_path)
    out = tmp_path / "out"
    argv = ["coco", "--annotations", str(ann_file), "--images", str(images), "--out", str(out)]
    paths = run_prepare(parse(argv + ["--source-name", "lvis"]))
    assert paths == [str(out / "shard-00000.parquet")]
    assert shards.read_shard(paths[0]).column("source").to_pylist() == ["lvis"]
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("prepare lvis: 1 rows, skipped 4 annotations and 2 entries")
    with pytest.raises(ValueError, match="--overwrite"):
        run_prepare(parse(argv))
    assert run_prepare(parse(argv + ["--overwrite"])) == paths
    assert run_prepare(parse(argv + ["--overwrite", "--limit", "0"])) == []
    with pytest.raises(ValueError, match="--annotations"):
        run_prepare(parse(["vg", "--images", str(images), "--out", str(out)]))


def test_shapes_source_calls_the_shapes_writer(tmp_path, monkeypatch, capsys):
    calls = {}

    def write_shapes_dataset(out_dir, **kwargs):
        calls.update(kwargs, out_dir=out_dir)
        return shards.write_shards([], out_dir)  # an empty list: run_prepare must glob instead

    fake = types.ModuleType("osprey.data.shapes")
    fake.write_shapes_dataset = write_shapes_dataset
    monkeypatch.setitem(sys.modules, "osprey.data.shapes", fake)
    out = tmp_path / "shapes"
    argv = ["shapes", "--out", str(out), "--n", "12", "--seed", "3", "--val-fraction", "0.25"]
    assert run_prepare(parse(argv)) == []
    assert calls == {
        "out_dir": str(out),
        "n": 12,
        "seed": 3,
        "val_fraction": 0.25,
        "rows_per_shard": shards.DEFAULT_ROWS_PER_SHARD,
        "overwrite": False,
    }
    assert "prepare shapes: 0 rows" in capsys.readouterr().out


def test_resolve_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="gs://b"):
        resolve("gs://b/x")
