"""bench/ingest.py: its data and reference loader are right, and it runs end to end on a few
samples, so the benchmark cannot rot."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import osprey
from osprey.data.examples import ExampleBuilder, ExampleConfig
from osprey.data.pipeline import collate
from osprey.data.shapes import render_sample
from osprey.data.shards import iter_rows
from osprey.prompts import load_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ingest.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_polygons_decode_back_to_the_exact_masks(bench):
    scene = render_sample(np.random.default_rng(3))
    h, w = scene.masks.shape[1:]
    for mask in scene.masks:
        polygons = bench.mask_polygons(mask)
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
        assert np.array_equal(decoded.astype(bool), mask)


def test_reference_dataset_gives_the_shard_rows_examples(bench, tmp_path):
    data = bench.prepare_data(tmp_path, n=6, seed=1, image_size=128, rows_per_shard=4)
    config = ExampleConfig(vision=osprey.get_config("tiny").vision)
    build = ExampleBuilder(load_tokenizer(data.tokenizer), config)
    rows = {
        r["sample_id"]: r for f in sorted(data.shards.glob("*.parquet")) for r in iter_rows(str(f))
    }
    dataset = bench.CocoStage2Dataset(data.annotations, data.images, data.tokenizer, config)
    assert len(dataset) == len(rows) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        ours = collate({k: [v] for k, v in build(rows[item["sample_id"]]).items()})
        theirs = bench.collate_dense([item])
        assert theirs.sample_ids == ours.sample_ids
        for key in ("input_ids", "labels", "attention_mask", "images"):
            assert torch.equal(getattr(theirs, key), getattr(ours, key)), key
        assert torch.equal(theirs.masks[0], ours.masks[0])


@pytest.mark.slow
def test_bench_runs_and_prints_its_table(bench, local_ray, capsys):
    table = bench.main(["--samples", "40", "--repeats", "1", "--train-steps", "3"])
    assert capsys.readouterr().out.strip().endswith(table.splitlines()[-1])
    for row in (
        "Ray Data pipeline (shards)",
        "DataLoader (COCO JSON + PNG), 2 workers",
        "ratio pipeline / DataLoader",
        "identical batches: yes",
        "data wait",
        "target: pipeline not slower than the DataLoader:",
    ):
        assert row in table, row
    ours = next(line for line in table.splitlines() if line.startswith("Ray Data pipeline ("))
    assert float(ours.split()[4]) > 0  # samples/s


def test_the_equality_check_reports_what_differs(bench):
    ours, theirs = bench.Loader("ours", list), bench.Loader("theirs", list)
    ours.kept = {"x": {"input_ids": torch.tensor([1, 2])}, "y": {"input_ids": torch.tensor([4])}}
    theirs.kept = {"x": {"input_ids": torch.tensor([1, 3])}}
    problems = bench.compare_samples(ours, theirs, ["x", "y"])
    assert problems == ["x: input_ids differs", "y: not produced by theirs"]
    assert bench.identical_line(problems, 2).startswith("identical batches: NO")
    theirs.kept["x"] = ours.kept["x"]
    assert bench.compare_samples(ours, theirs, ["x"]) == []
    assert bench.identical_line([], 1).startswith("identical batches: yes")
