"""The synthetic shapes data set: exact masks, every task, seeded output, splits and corpus."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from osprey.data.masks import decode_region
from osprey.data.schema import SHARD_SCHEMA
from osprey.data.shapes import (
    BACKGROUND_LABEL,
    BACKGROUND_RGB,
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    SHAPES_TASKS,
    SIZES,
    ShapesConfig,
    category_of,
    image_rows,
    label_maps,
    normalize_answer,
    render_sample,
    shapes_corpus,
    write_shapes_dataset,
)
from osprey.data.shards import iter_rows, read_shard

N_IMAGES = 40
REGION_REF = re.compile(r"<region(\d+)>")


def _read_split(root: str, split: str) -> list[dict]:
    paths = sorted(os.listdir(os.path.join(root, split)))
    return [row for p in paths for row in iter_rows(os.path.join(root, split, p))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    meta = write_shapes_dataset(
        root, n=N_IMAGES, seed=0, val_fraction=0.25, rows_per_shard=50, progress=False
    )
    rows = {split: _read_split(root, split) for split in ("train", "val")}
    return root, meta, rows


def _all_rows(dataset) -> list[dict]:
    return [row for rows in dataset[2].values() for row in rows]


def _decode_image(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))


def _refs(row: dict) -> list[int]:
    return [int(m) for turn in row["conversations"] for m in REGION_REF.findall(turn["value"])]


def _words(text: str) -> set[str]:
    return set(re.findall(r"<region\d+>|[A-Za-z0-9]+", text))


# --- reproducibility --------------------------------------------------------------------------


def test_same_arguments_give_identical_files(dataset, tmp_path):
    root, meta, _ = dataset
    again = write_shapes_dataset(
        str(tmp_path), n=N_IMAGES, seed=0, val_fraction=0.25, rows_per_shard=50, progress=False
    )
    assert again["counts"] == meta["counts"] and again["config"] == meta["config"]
    paths = meta["files"]["train"] + meta["files"]["val"]
    assert len(paths) == 4 + 2  # 30 train and 10 val images, 6 rows each, 50 rows per shard
    for path in paths:
        rel = os.path.relpath(path, root)
        a = read_shard(path)
        b = read_shard(os.path.join(str(tmp_path), rel))
        assert a.equals(b), rel


def test_different_seed_gives_different_rows():
    a = image_rows(0, "train", ShapesConfig(seed=0))
    b = image_rows(0, "train", ShapesConfig(seed=1))
    assert a[0]["image"] != b[0]["image"]
    assert image_rows(0, "train", ShapesConfig(seed=0)) == a


def test_a_task_subset_leaves_other_tasks_unchanged():
    full = {r["task"]: r for r in image_rows(5, "train")}
    only = image_rows(5, "train", tasks=["posneg"])
    assert only == [full["posneg"]]


# --- masks ------------------------------------------------------------------------------------


def _check_exact(image: np.ndarray, masks: list[np.ndarray], colours: list[str], cfg) -> None:
    """Masks are disjoint and cover exactly the pixels painted in their colour."""
    stack = np.stack(masks).astype(bool)
    assert (stack.sum(axis=0) <= 1).all(), "regions overlap"
    for mask, colour in zip(stack, colours, strict=True):
        assert (image[mask] == COLOUR_RGB[colour]).all()
        assert mask.sum() >= cfg.min_visible_fraction * cfg.image_size**2
    for colour in set(colours):
        painted = (image == COLOUR_RGB[colour]).all(axis=-1)
        union = stack[[c == colour for c in colours]].any(axis=0)
        assert (painted == union).all(), f"{colour} pixels outside their masks"
    background = ~stack.any(axis=0)
    assert any((image[background] == rgb).all() for rgb in BACKGROUND_RGB.values())


def test_rendered_masks_are_exact_visible_pixels():
    cfg = ShapesConfig()
    for index in range(30):
        scene = render_sample(np.random.default_rng(index), cfg)
        assert cfg.min_shapes <= len(scene.labels) <= cfg.max_shapes
        colours = [label.colour for label in scene.labels]
        _check_exact(scene.image, list(scene.masks), colours, cfg)
        for mask, label in zip(scene.masks, scene.labels, strict=True):
            assert mask.sum() == label.area
            assert label.area >= cfg.min_visible_ratio * label.full_area
        categories = [label.category for label in scene.labels]
        assert len(set(categories)) == len(categories)


def test_row_regions_decode_to_exact_masks(dataset):
    cfg = ShapesConfig()
    for row in _all_rows(dataset):
        if row["task"] != "category":
            continue
        assert row["width"] == row["height"] == cfg.image_size
        masks = [decode_region(region) for region in row["regions"]]
        colours = [region["category"].split()[0] for region in row["regions"]]
        _check_exact(_decode_image(row), masks, colours, cfg)
        for region, mask in zip(row["regions"], masks, strict=True):
            assert region["area"] == mask.sum()


def test_masks_survive_stride_32_pooling():
    # Osprey's mask pooling: bilinear resize to the feature map, then > 0.
    cfg = ShapesConfig()
    for index in range(30):
        scene = render_sample(np.random.default_rng(index), cfg)
        masks = torch.from_numpy(scene.masks.astype(np.float32))[:, None]
        small = F.interpolate(masks, size=(4, 4), mode="bilinear", align_corners=False)
        assert ((small > 0).flatten(1).any(dim=1)).all()


def test_noise_changes_pixels_not_masks():
    plain = render_sample(np.random.default_rng(7), ShapesConfig())
    noisy = render_sample(np.random.default_rng(7), ShapesConfig(noise_std=6.0))
    assert (plain.masks == noisy.masks).all()
    diff = np.abs(plain.image.astype(int) - noisy.image.astype(int))
    assert 0 < diff.mean() < 10


def test_label_maps_match_masks():
    scene = render_sample(np.random.default_rng(3), ShapesConfig())
    colour_map, shape_map = label_maps(scene)
    covered = scene.masks.any(axis=0)
    assert (colour_map[~covered] == BACKGROUND_LABEL).all()
    assert (shape_map[~covered] == BACKGROUND_LABEL).all()
    for mask, label in zip(scene.masks, scene.labels, strict=True):
        assert (colour_map[mask] == 1 + COLOURS.index(label.colour)).all()
        assert (shape_map[mask] == 1 + SHAPES.index(label.shape)).all()


# --- tasks ------------------------------------------------------------------------------------


def test_every_image_has_every_task_with_the_same_image(dataset):
    by_image: dict[str, list[dict]] = {}
    for row in _all_rows(dataset):
        assert set(row) == set(SHARD_SCHEMA.names)
        by_image.setdefault(row["sample_id"].rsplit(":", 1)[0], []).append(row)
    assert len(by_image) == N_IMAGES
    for image_id, rows in by_image.items():
        assert sorted(r["task"] for r in rows) == sorted(SHAPES_TASKS)
        assert len({r["image"] for r in rows}) == 1
        for row in rows:
            assert row["sample_id"] == f"{image_id}:{row['task']}"
        region_sets = [r["regions"] for r in rows if r["task"] != "caption"]
        assert all(regions == region_sets[0] for regions in region_sets)


def test_turns_alternate_and_refer_to_every_region_once(dataset):
    for row in _all_rows(dataset):
        turns = row["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"].strip() for t in turns)
        assert "<image>" not in " ".join(t["value"] for t in turns)
        assert not any(REGION_REF.search(t["value"]) for t in turns if t["from"] == "gpt")
        if row["task"] == "caption":
            assert row["regions"] == [] and _refs(row) == []
        else:
            # One <mask><pos> per region, so the loader can pair them one to one.
            assert sorted(_refs(row)) == list(range(1, len(row["regions"]) + 1)), row["sample_id"]


def _question_answers(row: dict) -> list[tuple[str, str]]:
    turns = row["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def test_category_and_short_answers_match_regions(dataset):
    for row in _all_rows(dataset):
        if row["task"] not in ("category", "short"):
            continue
        for question, answer in _question_answers(row):
            (ref,) = _refs({"conversations": [{"value": question}]})
            category = row["regions"][ref - 1]["category"]
            if row["task"] == "category":
                assert answer == category
            else:
                assert category_of(answer) == category
                assert answer.split()[1] in SIZES


def test_first_category_turn_carries_an_instruction(dataset):
    for row in _all_rows(dataset):
        if row["task"] == "category":
            first = row["conversations"][0]["value"]
            assert "\n" in first and first.splitlines()[-1].startswith("What is the category of")


def test_detailed_answers_name_their_region(dataset):
    for row in _all_rows(dataset):
        if row["task"] == "detailed":
            for question, answer in _question_answers(row):
                (ref,) = _refs({"conversations": [{"value": question}]})
                assert category_of(answer) == row["regions"][ref - 1]["category"]
                assert "of the image" in answer


def _posneg_truth(question: str, category: str) -> bool:
    colour, shape = category.split()
    words = normalize_answer(REGION_REF.sub(" ", question)).split()
    asked_colour = next((w for w in words if w in COLOURS), None)
    asked_shape = next((w for w in words if w in SHAPES), None)
    assert asked_colour or asked_shape, question
    return (asked_colour in (None, colour)) and (asked_shape in (None, shape))


def test_posneg_answers_are_right_and_balanced(dataset):
    totals = Counter()
    for row in _all_rows(dataset):
        if row["task"] != "posneg":
            continue
        answers = Counter()
        for question, answer in _question_answers(row):
            (ref,) = _refs({"conversations": [{"value": question}]})
            truth = _posneg_truth(question, row["regions"][ref - 1]["category"])
            assert answer == ("Yes" if truth else "No"), question
            answers[answer] += 1
        assert abs(answers["Yes"] - answers["No"]) <= 1
        totals.update(answers)
    assert 0.4 <= totals["Yes"] / (totals["Yes"] + totals["No"]) <= 0.6


def _centroid(region: dict) -> tuple[float, float]:
    ys, xs = np.nonzero(decode_region(region))
    return float(xs.mean()), float(ys.mean())


def _check_relation(question: str, answer: str, centroids: list[tuple[float, float]]) -> None:
    named = [int(k) - 1 for k in re.findall(r"region(\d+)", question)]
    if len(named) != 2:
        return
    a, b = named
    (ax, ay), (bx, by) = centroids[a], centroids[b]
    if question.startswith("Which is further left"):
        winner = a if ax < bx else b
        assert answer == f"It is region{winner + 1}."
    elif question.startswith("Which is higher"):
        winner = a if ay < by else b
        assert answer == f"It is region{winner + 1}."
    elif "relative to" in question:
        expected = {
            "to the left of": ax < bx,
            "to the right of": ax > bx,
            "above": ay < by,
            "below": ay > by,
        }
        relation = answer.removeprefix("It is ").rsplit(" region", 1)[0]
        assert expected[relation], (question, answer)


def test_conversation_opening_and_answers(dataset):
    for row in _all_rows(dataset):
        if row["task"] != "conversation":
            continue
        n = len(row["regions"])
        centroids = [_centroid(region) for region in row["regions"]]
        opening = row["conversations"][0]["value"].splitlines()[0]
        listed = ", ".join(f"region{k}<region{k}>" for k in range(1, n + 1))
        assert opening == f"There are {n} regions in the picture: {listed}."
        for question, answer in _question_answers(row):
            question = question.splitlines()[-1]
            named = re.findall(r"region(\d+)", question)
            assert all(1 <= int(k) <= n for k in named)
            if question.startswith("What colour is"):
                colour = row["regions"][int(named[0]) - 1]["category"].split()[0]
                assert answer == f"It is {colour}."
            _check_relation(question, answer, centroids)
            if question.startswith("Which region shows the"):
                category = question.removeprefix("Which region shows the ").rstrip("?")
                (k,) = re.findall(r"region(\d+)", answer)
                assert row["regions"][int(k) - 1]["category"] == category


def test_caption_lists_every_shape(dataset):
    by_image = {}
    for row in _all_rows(dataset):
        by_image.setdefault(row["sample_id"].rsplit(":", 1)[0], {})[row["task"]] = row
    for rows in by_image.values():
        caption = rows["caption"]["conversations"][1]["value"]
        for region in rows["category"]["regions"]:
            assert region["category"] in caption


# --- splits, meta -----------------------------------------------------------------------------


def test_train_and_val_are_disjoint_images(dataset):
    root, meta, rows = dataset
    ids = {s: {r["sample_id"].split(":")[2] for r in rows[s]} for s in rows}
    assert ids["train"].isdisjoint(ids["val"])
    assert len(ids["train"]) + len(ids["val"]) == N_IMAGES
    assert len(ids["val"]) == round(N_IMAGES * 0.25)
    images = {s: {r["image"] for r in rows[s]} for s in rows}
    assert images["train"].isdisjoint(images["val"])
    for split in rows:
        assert all(r["sample_id"].startswith(f"shapes:{split}:") for r in rows[split])


def test_meta_counts_and_config(dataset):
    root, meta, rows = dataset
    with open(os.path.join(root, "meta.json")) as f:
        stored = json.load(f)
    relative = {s: [os.path.relpath(p, root) for p in paths] for s, paths in meta["files"].items()}
    assert stored == {**meta, "files": relative}
    assert stored["files"]["val"] == ["val/shapes-00000.parquet", "val/shapes-00001.parquet"]
    for split in rows:
        counts = meta["counts"][split]
        assert counts["rows"] == len(rows[split])
        assert counts["tasks"] == dict(Counter(r["task"] for r in rows[split]))
    assert ShapesConfig.from_dict(meta["config"]) == ShapesConfig()


def test_refuses_to_mix_with_existing_shards(dataset):
    root = dataset[0]
    with pytest.raises(FileExistsError):
        write_shapes_dataset(root, n=4, progress=False)


def test_overwrite_replaces_old_shards(tmp_path):
    write_shapes_dataset(str(tmp_path), n=6, rows_per_shard=6, progress=False)
    meta = write_shapes_dataset(
        str(tmp_path), n=3, rows_per_shard=100, overwrite=True, progress=False
    )
    assert sorted(os.listdir(tmp_path / "train")) == ["shapes-00000.parquet"]
    assert meta["counts"]["train"]["images"] + meta["counts"]["val"]["images"] == 3


def test_image_size_argument(tmp_path):
    meta = write_shapes_dataset(str(tmp_path), n=2, image_size=96, progress=False)
    assert meta["config"]["image_size"] == 96
    row = next(iter_rows(meta["files"]["train"][0]))
    assert _decode_image(row).shape == (96, 96, 3)


# --- corpus and scoring -----------------------------------------------------------------------


def test_corpus_covers_every_generated_word(dataset):
    corpus: set[str] = set()
    for text in shapes_corpus(n_examples=0):
        corpus |= _words(text)
    for row in _all_rows(dataset):
        for turn in row["conversations"]:
            missing = _words(turn["value"]) - corpus
            assert not missing, (missing, turn["value"])
    assert set(COLOURS) | set(SHAPES) | set(SIZES) <= corpus


def test_normalize_answer():
    assert normalize_answer("A Red circle.") == "red circle"
    assert normalize_answer("  the blue, STAR!  ") == "blue star"
    assert normalize_answer("an orange cross") == "orange cross"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("red circle", "red circle"),
        ("It is a small Orange Star.", "orange star"),
        ("two purple crosses", "purple cross"),
        ("a gray square", None),
        ("a green plus", "green cross"),
        ("a circle", None),
        ("", None),
    ],
)
def test_category_of(answer, expected):
    assert category_of(answer) == expected


# --- config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"colours": ("red", "pink")}, "colours"),
        ({"colours": ("red",)}, "colours"),
        ({"shapes": ("circle", "hexagon")}, "shapes"),
        ({"min_shapes": 4, "max_shapes": 3}, "min_shapes"),
        ({"size_areas": (0.2, 0.1, 0.3)}, "size_areas"),
        ({"min_visible_fraction": 0.2}, "min_visible_fraction"),
        ({"image_size": 8}, "image_size"),
        ({"backgrounds": ("pink",)}, "backgrounds"),
    ],
)
def test_config_rejects_bad_options(options, named):
    with pytest.raises(ValueError, match=named):
        ShapesConfig(**options)


def test_bad_task_and_split_options():
    with pytest.raises(ValueError, match="tasks"):
        image_rows(0, "train", tasks=["refer"])
    with pytest.raises(ValueError, match="val_fraction"):
        write_shapes_dataset("/nonexistent", n=4, val_fraction=1.0, progress=False)
