"""A stage's sources mixed per epoch as the reference's random sampler over the concatenation of
all data sets mixes them, with regions and question templates re-drawn every epoch."""

import dataclasses

import numpy as np
import pytest

import osprey
from osprey.data.examples import ExampleBuilder, ExampleConfig
from osprey.data.mix import Unit, cut_blocks, epoch_order
from osprey.data.pipeline import PipelineConfig, build_dataset, collate, epoch_rows, plan_stage
from osprey.data.shapes import shapes_corpus, write_shapes_dataset
from osprey.data.shards import iter_rows, write_shards
from osprey.prompts import save_tokenizer, train_tokenizer
from osprey.train.loop import SourceTally

TINY = osprey.get_config("tiny")
SHARES = {"coco": 0.6, "lvis": 0.3, "paco": 0.1}


def synthetic_sources(rows: dict[str, int], unit_rows: int) -> list[list[Unit]]:
    sources = []
    for s, n in enumerate(rows.values()):
        units = []
        for start in range(0, n, unit_rows):
            stop = min(n, start + unit_rows)
            units.append(Unit(s, f"{s}.parquet", start // unit_rows, 0, stop - start, stop - start))
        sources.append(units)
    return sources


def row_sources(order: list[Unit]) -> np.ndarray:
    return np.concatenate([np.full(u.rows, u.source) for u in order])


def worst_window_gap(stream: np.ndarray, shares: list[float], window: int) -> float:
    """Largest |share in a window - overall share| over every window of `window` rows."""
    worst = 0.0
    for s, share in enumerate(shares):
        counts = np.convolve(stream == s, np.ones(window, dtype=int), mode="valid")
        worst = max(worst, float(np.abs(counts / window - share).max()))
    return worst


def test_every_tenth_of_an_epoch_holds_each_source_at_its_share():
    rows = {name: int(6000 * share) for name, share in SHARES.items()}
    sources = synthetic_sources(rows, unit_rows=16)
    for epoch in range(3):
        order = epoch_order(sources, seed=0, epoch=epoch)
        assert sorted(order, key=lambda u: (u.source, u.row_group)) == [
            u for units in sources for u in units
        ], "every unit exactly once"
        stream = row_sources(order)
        assert worst_window_gap(stream, list(SHARES.values()), len(stream) // 10) <= 0.05


def test_positions_are_as_likely_as_under_the_references_uniform_shuffle():
    """The reference (RandomSampler over a ConcatDataset) puts every row at a uniformly random
    position: over many epochs each source's expected share of every tenth is its overall share,
    for our plan as for a uniform permutation drawn here."""
    rows = {name: int(600 * share) for name, share in SHARES.items()}
    sources = synthetic_sources(rows, unit_rows=4)
    labels = np.concatenate([np.full(n, s) for s, n in enumerate(rows.values())])
    rng = np.random.default_rng(1)
    ours, reference = np.zeros((10, 3)), np.zeros((10, 3))
    epochs = 300
    for epoch in range(epochs):
        for total, stream in (
            (ours, row_sources(epoch_order(sources, seed=7, epoch=epoch))),
            (reference, labels[rng.permutation(len(labels))]),
        ):
            for tenth, part in enumerate(np.array_split(stream, 10)):
                total[tenth] += np.bincount(part, minlength=3) / len(part)
    expected = np.array(list(SHARES.values()))
    # 300 epochs of 60-row tenths: the uniform shuffle's mean is within ~0.011 at 3 sigma.
    assert np.abs(reference / epochs - expected).max() < 0.02
    assert np.abs(ours / epochs - expected).max() < 0.02
    # Within one epoch, ours strays from the shares less than the uniform shuffle does.
    gaps = [
        [worst_window_gap(stream, list(expected), 60) for stream in pair]
        for pair in (
            (row_sources(epoch_order(sources, 7, e)), labels[rng.permutation(len(labels))])
            for e in range(50)
        )
    ]
    assert np.mean([ours for ours, _ in gaps]) < np.mean([theirs for _, theirs in gaps])


def test_order_is_a_function_of_seed_and_epoch():
    sources = synthetic_sources({"a": 90, "b": 40}, unit_rows=4)
    first = epoch_order(sources, seed=3, epoch=1)
    assert epoch_order(sources, seed=3, epoch=1) == first
    assert epoch_order(sources, seed=3, epoch=2) != first
    assert epoch_order(sources, seed=4, epoch=1) != first
    assert epoch_order(sources, 3, 1, shuffle=False) == [u for s in sources for u in s]
    blocks = cut_blocks(first, block_rows=10)
    assert [u for b in blocks for u in b] == first
    assert all(sum(u.rows for u in b) >= 10 for b in blocks[:-1])
    with pytest.raises(ValueError, match="block_rows"):
        cut_blocks(first, 0)


def test_regions_and_templates_are_drawn_anew_each_epoch(shapes_mix):
    _, tokenizer, rows = shapes_mix
    config = ExampleConfig(vision=TINY.vision, max_length=512)
    epochs = [ExampleBuilder(tokenizer, dataclasses.replace(config, epoch=e)) for e in (0, 1)]
    changed = 0
    for row in rows[:20]:
        a, again, b = epochs[0](row), epochs[0](row), epochs[1](row)
        assert a["error"] == b["error"] == ""
        assert np.array_equal(a["input_ids"], again["input_ids"]), "same epoch, same draw"
        # The same regions are asked about, in another order and with their masks in step.
        assert sorted(a["mask_counts"]) == sorted(b["mask_counts"])
        changed += not np.array_equal(a["input_ids"], b["input_ids"])
    assert changed >= 10, "region order re-drawn for most multi-region rows"
    with pytest.raises(ValueError, match="epoch"):
        ExampleConfig(epoch=-1)


def test_source_tally_closes_each_tenth_once():
    tally = SourceTally(["a", "b"], micro_per_epoch=25)
    closed = []
    for number in range(1, 26):
        done = tally.add(["a", "b", "a"], number)
        if done is not None:
            closed.append((done, tally.pop()))
    assert [t for t, _ in closed] == list(range(10))
    assert sum(c[0] for _, c in closed) == 50 and sum(c[1] for _, c in closed) == 25
    assert tally.metrics([3, 1]) == {"source_rows/a": 3, "source_rows/b": 1}


@pytest.fixture(scope="module")
def shapes_mix(tmp_path_factory):
    """Three category sources with shares 60/30/10 (1200/600/200 rows, written as converted
    data sets are: no conversations, the question is templated from the regions) in row groups
    of 2, so the mix is fine-grained at this small size; and a 60/30/10-row copy to map."""
    root = tmp_path_factory.mktemp("mix")
    write_shapes_dataset(
        root / "shapes", n=100, seed=11, val_fraction=0.0, tasks=("category",), progress=False
    )
    tokenizer = train_tokenizer(shapes_corpus(), vocab_size=TINY.llm.vocab_size)
    save_tokenizer(tokenizer, root / "tok")
    shards = sorted((root / "shapes" / "train").glob("*.parquet"))
    base = [dict(r, conversations=[]) for f in shards for r in iter_rows(str(f))]
    base = [r for r in base if len(r["regions"]) >= 3]
    rows, k = [], 0
    for name, share in SHARES.items():
        mine = []
        for _ in range(int(2000 * share)):
            row = base[k % len(base)]
            mine.append(dict(row, sample_id=f"{name}:{k:04d}", source=name))
            k += 1
        write_shards(mine, str(root / "big" / name), name, rows_per_shard=250, row_group_rows=2)
        write_shards(mine[: len(mine) // 20], str(root / "small" / name), name, row_group_rows=2)
        rows += mine
    return root, tokenizer, rows


def examples(root, epoch: int) -> tuple[list[str], dict[str, list[int]]]:
    """One epoch of the small mix through build_dataset: sample ids in order, tokens by id."""
    paths = [str(root / "small" / name) for name in SHARES]
    config = ExampleConfig(vision=TINY.vision, max_length=512, seed=2)
    pipeline = PipelineConfig(block_rows=16, unit_rows=2)
    ds = build_dataset(paths, str(root / "tok"), config, pipeline, epoch=epoch)
    ids, tokens = [], {}
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        out = collate(batch)
        assert not out.skipped
        assert out.sources == [i.split(":")[0] for i in out.sample_ids]
        ids += out.sample_ids
        for j, i in enumerate(out.sample_ids):
            tokens[i] = out.input_ids[j][out.attention_mask[j] > 0].tolist()
    return ids, tokens


@pytest.mark.slow
def test_ray_stream_holds_the_shares_in_every_tenth_and_changes_each_epoch(shapes_mix, local_ray):
    root, _, rows = shapes_mix
    plan = plan_stage([str(root / "big" / name) for name in SHARES], unit_rows=2)
    assert plan.rows == 2000 and plan.source_names == tuple(sorted(SHARES))
    pipeline = PipelineConfig(block_rows=16, unit_rows=2)
    names, all_ids = list(SHARES), sorted(r["sample_id"] for r in rows)
    orders = []
    for epoch in (0, 1, 0):
        ds = epoch_rows(plan, seed=2, epoch=epoch, pipeline=pipeline).select_columns(["sample_id"])
        ids = [
            i for b in ds.iter_batches(batch_size=500, batch_format="numpy") for i in b["sample_id"]
        ]
        assert sorted(ids) == all_ids, "every row exactly once per epoch"
        labels = np.array([names.index(i.split(":")[0]) for i in ids])
        assert worst_window_gap(labels, list(SHARES.values()), len(ids) // 10) <= 0.05
        orders.append(ids)
    assert orders[0] != orders[1], "each epoch has its own order"
    assert orders[2] == orders[0], "an epoch read again is the same stream: what resuming needs"


@pytest.mark.slow
def test_ray_examples_redraw_regions_each_epoch_and_replay_exactly(shapes_mix, local_ray):
    root, _, _ = shapes_mix
    (ids0, tokens0), (ids1, tokens1) = examples(root, 0), examples(root, 1)
    assert sorted(ids0) == sorted(ids1) and len(set(ids0)) == len(ids0) == 100
    assert ids0 != ids1
    redrawn = sum(tokens0[i] != tokens1[i] for i in ids0)
    assert redrawn > len(ids0) // 2, "regions and templates drawn anew each epoch"
    assert examples(root, 1) == (ids1, tokens1), "the same epoch gives the same draws"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stage2_run_logs_each_sources_rows_per_tenth_of_the_epoch(shapes_mix, local_ray, tmp_path):
    """A stage-2 run (mask extractor only) on a three-source 60/30/10 mix: every tenth of the
    epoch is logged to MLflow as one metric per source, summed over both workers."""
    from mlflow.tracking import MlflowClient

    from osprey.train.config import StageConfig
    from osprey.train.runner import RunOptions, run_stage

    root, _, _ = shapes_mix
    sizes = {"coco": 60, "lvis": 30, "paco": 10}
    stage = StageConfig(
        name="stage2",
        preset="tiny",
        trains=["mask_extractor"],
        data=[str(root / "small" / name) for name in sizes],
        tasks=["category"],
        tokenizer=str(root / "tok"),
        lr=1e-3,
        global_batch_size=10,
        micro_batch_size=5,  # 50 rows per worker: 10 micro-batches, one per tenth
        epochs=1,
        max_length=512,
    )
    options = RunOptions(output_dir=str(tmp_path / "run"), pipeline="mix", num_workers=2)
    result = run_stage(stage, options)
    assert result.steps == 10
    client = MlflowClient(options.tracker().tracking_uri)
    per_source = {}
    for name in sizes:
        history = client.get_metric_history(result.run_id, f"source_rows/{name}")
        per_source[name] = {m.step: int(m.value) for m in history}
        assert sorted(per_source[name]) == list(range(10)), "one value per tenth"
        assert sum(per_source[name].values()) == sizes[name], "every row of the source counted"
    for tenth in range(10):
        assert sum(per_source[name][tenth] for name in sizes) == 10  # 2 workers x 5 rows
