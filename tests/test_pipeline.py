"""The Ray Data pipeline from shards to padded training batches."""

import pytest
import torch

import osprey
from osprey.data.examples import ExampleBuilder, ExampleConfig
from osprey.data.pipeline import build_dataset, collate, list_shards
from osprey.data.shapes import shapes_corpus, write_shapes_dataset
from osprey.data.shards import ShardSchemaError, iter_rows
from osprey.prompts import save_tokenizer, train_tokenizer

TINY = osprey.get_config("tiny")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root / "data", n=24, seed=3, val_fraction=0.25, progress=False)
    tok = train_tokenizer(shapes_corpus(), vocab_size=TINY.llm.vocab_size)
    save_tokenizer(tok, root / "tokenizer")
    return root, tok


def example_config():
    return ExampleConfig(vision=TINY.vision, max_length=512)


def test_rows_become_examples_whose_masks_match_their_tokens(shapes):
    root, tok = shapes
    build = ExampleBuilder(tok, example_config())
    shard = sorted((root / "data" / "train").glob("*.parquet"))[0]
    rows = list(iter_rows(str(shard)))
    examples = [build(r) for r in rows]
    assert all(e["error"] == "" for e in examples)
    batch = {k: [e[k] for e in examples[:8]] for k in examples[0]}
    out = collate(batch)
    assert out.images.shape == (8, 3, 128, 128)
    for b in range(8):
        n_mask = int((out.input_ids[b] == TINY.mask_token_id).sum())
        assert out.masks[b].shape[0] == n_mask
    model = osprey.build_model(TINY, seed=0)
    loss = model(out.input_ids, out.attention_mask, out.images, out.masks, out.labels).loss
    assert torch.isfinite(loss)


def test_bad_rows_are_skipped_with_a_reason(shapes):
    root, tok = shapes
    build = ExampleBuilder(tok, example_config())
    shard = sorted((root / "data" / "train").glob("*.parquet"))[0]
    good = next(r for r in iter_rows(str(shard)) if r["task"] == "category")
    bad_image = dict(good, sample_id="bad-image", image=b"not an image")
    outside = dict(good, sample_id="outside")
    outside["regions"] = [dict(r, size=[999, 999]) for r in good["regions"]]
    empty = dict(good, sample_id="empty")
    empty["regions"] = [dict(good["regions"][0], area=0.0), *good["regions"][1:]]
    mismatch = dict(good, sample_id="mismatch", regions=good["regions"][:1])
    rows = [good, bad_image, outside, empty, mismatch]
    batch = {}
    for e in (build(r) for r in rows):
        for k, v in e.items():
            batch.setdefault(k, []).append(v)
    out = collate(batch)
    assert out.sample_ids == [good["sample_id"]]
    reasons = dict(out.skipped)
    assert set(reasons) == {"bad-image", "outside", "empty", "mismatch"}
    assert "cannot decode image" in reasons["bad-image"]
    assert "size [999, 999]" in reasons["outside"]
    assert "empty mask" in reasons["empty"]
    assert reasons["mismatch"] == "conversation refers to <region2> but the row has 1"


def test_unreadable_or_wrong_shard_names_the_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"garbage")
    with pytest.raises(ShardSchemaError, match="broken.parquet"):
        list_shards(str(tmp_path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"sample_id": ["a"]}), other / "x.parquet")
    with pytest.raises(ShardSchemaError, match="x.parquet: missing column 'source'"):
        list_shards(str(other))


def collect(ds, batch_size=8):
    ids = []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out = collate(batch)
        ids += out.sample_ids
        assert not out.skipped
    return ids


@pytest.mark.slow
def test_ray_pipeline_reads_local_and_s3_alike(shapes, local_ray, moto_s3):
    root, _ = shapes
    train = root / "data" / "train"
    local = build_dataset([str(train)], str(root / "tokenizer"), example_config())
    local_ids = collect(local)
    n_rows = sum(1 for f in train.glob("*.parquet") for _ in iter_rows(str(f)))
    assert sorted(local_ids) == sorted(set(local_ids)) and len(local_ids) == n_rows

    fs, options = moto_s3
    fs.create_dir("shards")
    for f in train.glob("*.parquet"):
        fs.open_output_stream(f"shards/train/{f.name}").write(f.read_bytes())
    remote = build_dataset(
        ["s3://shards/train"], str(root / "tokenizer"), example_config(), s3=options
    )
    assert sorted(collect(remote)) == sorted(local_ids)
