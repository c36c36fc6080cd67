"""Shapes images as SHARD_SCHEMA rows (one per task) and the train/val shard folders with
their meta.json."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from osprey.data.masks import encode_mask
from osprey.data.shapes.config import SHAPES_TASKS, SIZES, SOURCE, ShapesConfig
from osprey.data.shapes.drawing import ShapeLabel, encode_png, render_sample
from osprey.data.shapes.text import task_turns
from osprey.data.shards import write_shards

# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _image_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # One independent stream per (image, purpose): changing one task's text leaves the image
    # and the other tasks untouched.
    return np.random.default_rng([seed, index, stream])


def image_rows(
    index: int,
    split: str,
    cfg: ShapesConfig | None = None,
    tasks: Sequence[str] = SHAPES_TASKS,
) -> list[dict[str, Any]]:
    """The SHARD_SCHEMA rows (one per task) of image `index`; a pure function of its arguments."""
    cfg = cfg or ShapesConfig()
    _check_tasks(tasks)
    rng = _image_rng(cfg.seed, index, 0)
    scene = render_sample(rng, cfg)
    # Region order is shuffled so that <region1> is not always the bottom-most shape.
    order = rng.permutation(len(scene.labels)).tolist()
    labels = [_reindex(scene.labels[i], order) for i in order]
    regions = []
    for i in order:
        region = encode_mask(scene.masks[i])
        region["category"] = scene.labels[i].category
        regions.append(region)
    image = encode_png(scene.image)
    size = cfg.image_size
    rows = []
    for task in tasks:
        turns = task_turns(
            task, _image_rng(cfg.seed, index, 1 + SHAPES_TASKS.index(task)), scene, labels, cfg
        )
        rows.append(
            {
                "sample_id": f"{SOURCE}:{split}:{index:06d}:{task}",
                "source": SOURCE,
                "task": task,
                "image_path": f"{SOURCE}/{split}/{index:06d}.png",
                "image": image,
                "width": size,
                "height": size,
                "regions": [] if task == "caption" else regions,
                "conversations": turns,
            }
        )
    return rows


def _reindex(label: ShapeLabel, order: list[int]) -> ShapeLabel:
    """Map covered_by from draw order into region order."""
    position = {draw: k for k, draw in enumerate(order)}
    return dataclasses.replace(label, covered_by=tuple(position[j] for j in label.covered_by))


def _check_tasks(tasks: Sequence[str]) -> None:
    bad = [t for t in tasks if t not in SHAPES_TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks: unknown {bad}; choose from {list(SHAPES_TASKS)}")


def split_indices(n: int, seed: int, val_fraction: float) -> dict[str, list[int]]:
    """Disjoint image indices per split; at least one val image when val_fraction > 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([seed, 2**32 - 1]).permutation(n)
    val = set(perm[:n_val].tolist())
    return {
        "train": [i for i in range(n) if i not in val],
        "val": sorted(val),
    }


def _split_rows(
    indices: list[int],
    split: str,
    cfg: ShapesConfig,
    tasks: Sequence[str],
    counts: dict[str, int],
    bar: tqdm,
) -> Iterator[dict[str, Any]]:
    for index in indices:
        for row in image_rows(index, split, cfg, tasks):
            counts[row["task"]] = counts.get(row["task"], 0) + 1
            yield row
        bar.update(1)


def write_shapes_dataset(
    out_dir: str,
    *,
    n: int = 2000,
    seed: int | None = None,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    rows_per_shard: int = 2000,
    config: ShapesConfig | None = None,
    tasks: Sequence[str] = SHAPES_TASKS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write out_dir/{train,val}/shapes-*.parquet and out_dir/meta.json; return the meta.

    `seed` and `image_size` override `config` (default seed 0, image_size 128). The split is
    by image, so no image appears in both splits. The returned meta's "files" are the shard
    paths as written (under out_dir); meta.json lists them relative to out_dir.
    """
    cfg = config or ShapesConfig()
    overrides = {"seed": seed, "image_size": image_size}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    _check_tasks(tasks)
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    splits = split_indices(n, cfg.seed, val_fraction)
    _prepare_dirs(out_dir, list(splits), overwrite)
    counts: dict[str, dict[str, Any]] = {}
    files: dict[str, list[str]] = {}
    with tqdm(total=n, desc="shapes", unit="img", disable=not progress) as bar:
        for split, indices in splits.items():
            task_counts: dict[str, int] = {}
            rows = _split_rows(indices, split, cfg, tasks, task_counts, bar)
            paths = write_shards(rows, os.path.join(out_dir, split), "shapes", rows_per_shard)
            files[split] = [os.path.relpath(p, out_dir) for p in paths]
            counts[split] = {
                "images": len(indices),
                "rows": sum(task_counts.values()),
                "tasks": task_counts,
            }
    meta = {
        "source": SOURCE,
        "n": n,
        "val_fraction": val_fraction,
        "config": cfg.to_dict(),
        "tasks": list(tasks),
        "colours": list(cfg.colours),
        "shapes": list(cfg.shapes),
        "sizes": list(SIZES),
        "counts": counts,
        "files": files,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    # The caller gets paths it can open; meta.json keeps them relative so the folder can move.
    written = {split: [os.path.join(out_dir, p) for p in paths] for split, paths in files.items()}
    return {**meta, "files": written}


def _prepare_dirs(out_dir: str, splits: list[str], overwrite: bool) -> None:
    """Refuse to mix with an earlier data set's shards, or remove them when overwrite is set."""
    for split in splits:
        split_dir = os.path.join(out_dir, split)
        old = (
            sorted(f for f in os.listdir(split_dir) if f.endswith(".parquet"))
            if os.path.isdir(split_dir)
            else []
        )
        if old and not overwrite:
            raise FileExistsError(f"{split_dir} already holds shards; pass overwrite=True")
        for name in old:
            os.remove(os.path.join(split_dir, name))
        os.makedirs(split_dir, exist_ok=True)
