"""jobs/prepare.py on a real local Ray cluster (loopback only): chunks cover every entry once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from osprey.data import masks, shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def coco_files(tmp_path: Path, n: int) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
    for i in range(1, n + 1):
        name = f"{i:012d}.jpg"
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, format="JPEG")
        data["images"].append({"id": i, "file_name": name, "height": 24, "width": 32})
        poly = [[1, 1, 10 + i, 1, 10 + i, 20, 1, 20]]
        data["annotations"].append({"id": i, "image_id": i, "category_id": 1, "segmentation": poly})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, images


def test_prepare_job_covers_every_entry_once(tmp_path, local_ray, capsys):
    from jobs.prepare import main

    assert {n["NodeManagerAddress"] for n in local_ray.nodes()} == {"127.0.0.1"}
    ann_file, images = coco_files(tmp_path, n=7)
    out = tmp_path / "shards"
    argv = ["coco", "--annotations", str(ann_file), "--images", str(images), "--out", str(out)]
    paths = main(argv + ["--entries-per-task", "3", "--rows-per-shard", "2"])

    # 3 tasks (3, 3 and 1 entries), each writing its own prefix, 2 rows per file
    assert [Path(p).name for p in paths] == [
        "part00000-00000.parquet",
        "part00000-00001.parquet",
        "part00001-00000.parquet",
        "part00001-00001.parquet",
        "part00002-00000.parquet",
    ]
    rows = [row for p in paths for row in shards.iter_rows(p)]
    seen = Counter(row["sample_id"] for row in rows)
    assert seen == Counter(f"coco:{i}" for i in range(1, 8))
    for row in rows:
        i = int(row["sample_id"].split(":")[1])
        assert row["image"] == (images / f"{i:012d}.jpg").read_bytes()
        poly = [[1, 1, 10 + i, 1, 10 + i, 20, 1, 20]]
        expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 24, 32)))
        np.testing.assert_array_equal(masks.decode_region(row["regions"][0]), expected)
    assert "prepare coco: 7 rows, skipped 0 annotations and 0 entries" in capsys.readouterr().out


def test_prepare_job_is_a_module_entrypoint():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--entries-per-task" in result.stdout
