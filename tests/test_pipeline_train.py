"""Two Ray Train workers each get their split of the stream: every sample once per epoch."""

import json

import pytest

import osprey
from osprey.data.examples import ExampleConfig
from osprey.data.pipeline import build_dataset
from osprey.data.shapes import shapes_corpus, write_shapes_dataset
from osprey.data.shards import iter_rows
from osprey.prompts import save_tokenizer, train_tokenizer


def record_sample_ids(config):
    import ray.train

    from osprey.data.pipeline import train_batches

    ctx = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        seen = []
        for batch in train_batches(shard, batch_size=4):
            seen += batch.sample_ids
            assert batch.images.shape[1:] == (3, 128, 128)
        path = f"{config['out']}/rank{ctx.get_world_rank()}-epoch{epoch}.json"
        with open(path, "w") as f:
            json.dump(seen, f)


@pytest.mark.slow
def test_two_workers_see_every_sample_exactly_once_per_epoch(tmp_path, local_ray):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tiny = osprey.get_config("tiny")
    write_shapes_dataset(tmp_path / "data", n=12, seed=5, val_fraction=0.0, progress=False)
    save_tokenizer(train_tokenizer(shapes_corpus(), tiny.llm.vocab_size), tmp_path / "tok")
    train_dir = tmp_path / "data" / "train"
    all_ids = [r["sample_id"] for f in train_dir.glob("*.parquet") for r in iter_rows(str(f))]
    ds = build_dataset([str(train_dir)], str(tmp_path / "tok"), ExampleConfig(vision=tiny.vision))
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        record_sample_ids,
        train_loop_config={"epochs": 2, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="exactly-once", storage_path=str(tmp_path / "ray")),
        datasets={"train": ds},
    )
    trainer.fit()
    for epoch in range(2):
        per_rank = [json.loads((out / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(per_rank), "each worker gets part of the data"
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)), "no sample twice in an epoch"
        assert set(seen) == set(all_ids), "no sample missed"
