"""Two Ray Train workers each get their split of each epoch's stream: every sample once per
epoch, in an order (and with draws) that a restarted run reproduces, so resuming skips exactly
what was trained on."""

import json

import pytest

import osprey
from osprey.data.examples import ExampleConfig
from osprey.data.pipeline import epoch_dataset_name, epoch_datasets, plan_stage
from osprey.data.shapes import shapes_corpus, write_shapes_dataset
from osprey.data.shards import iter_rows
from osprey.prompts import save_tokenizer, train_tokenizer
from osprey.train.config import StageConfig

BATCH = 4
SKIP = 2  # micro-batches of the resumed epoch already trained on


def record_sample_ids(config):
    """The training loop's own batch stream (loop.epoch_batches), written down per epoch."""
    import ray.train

    from osprey.train.loop import epoch_batches

    stage = StageConfig.from_dict(config["stage"])
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(config["start_epoch"], stage.epochs):
        shard = ray.train.get_dataset_shard(epoch_dataset_name(epoch))
        skip = config["skip"] if epoch == config["start_epoch"] else 0
        seen = []
        for number, batch in epoch_batches(shard, stage, epoch, skip, pad_token_id=0):
            assert batch.images.shape[1:] == (3, 128, 128)
            # The tokens carry the epoch's draws: a resumed run must see the same ones.
            seen.append([number, batch.sample_ids, batch.input_ids.sum(dim=1).tolist()])
        path = f"{config['out']}/{config['run']}-rank{rank}-epoch{epoch}.json"
        with open(path, "w") as f:
            json.dump(seen, f)


def fit(tmp_path, run: str, stage: StageConfig, start_epoch: int, skip: int) -> None:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from osprey.train.runner import ingest_options

    tiny = osprey.get_config("tiny")
    plan = plan_stage(list(stage.data))
    config = ExampleConfig(vision=tiny.vision, seed=stage.seed)
    datasets = epoch_datasets(plan, str(tmp_path / "tok"), config, stage.epochs)
    TorchTrainer(
        record_sample_ids,
        train_loop_config={
            "stage": stage.to_dict(),
            "out": str(tmp_path / "seen"),
            "run": run,
            "start_epoch": start_epoch,
            "skip": skip,
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=run, storage_path=str(tmp_path / "ray")),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest_options()),
    ).fit()


def load(tmp_path, run: str, rank: int, epoch: int) -> list[tuple[int, list[str], list[int]]]:
    path = tmp_path / "seen" / f"{run}-rank{rank}-epoch{epoch}.json"
    return [(n, ids, tokens) for n, ids, tokens in json.loads(path.read_text())]


@pytest.mark.slow
def test_every_sample_once_per_epoch_and_a_resumed_epoch_skips_exactly_the_trained(
    tmp_path, local_ray
):
    tiny = osprey.get_config("tiny")
    write_shapes_dataset(tmp_path / "data", n=12, seed=5, val_fraction=0.0, progress=False)
    save_tokenizer(train_tokenizer(shapes_corpus(), tiny.llm.vocab_size), tmp_path / "tok")
    (tmp_path / "seen").mkdir()
    train_dir = tmp_path / "data" / "train"
    all_ids = [r["sample_id"] for f in train_dir.glob("*.parquet") for r in iter_rows(str(f))]
    stage = StageConfig(
        name="order",
        trains=["projector"],
        data=[str(train_dir)],
        micro_batch_size=BATCH,
        global_batch_size=BATCH * 2,
        epochs=2,
        shuffle_buffer=16,
    )
    fit(tmp_path, "first", stage, start_epoch=0, skip=0)
    for epoch in range(2):
        per_rank = [load(tmp_path, "first", r, epoch) for r in (0, 1)]
        assert all(per_rank), "each worker gets part of the data"
        seen = [i for batches in per_rank for _, ids, _ in batches for i in ids]
        assert len(seen) == len(set(seen)), "no sample twice in an epoch"
        assert set(seen) == set(all_ids), "no sample missed"
    orders = [[i for _, ids, _ in load(tmp_path, "first", 0, e) for i in ids] for e in (0, 1)]
    assert orders[0] != orders[1], "the shuffle is reseeded every epoch"

    # A new run, as after a restart in epoch 1 with SKIP micro-batches done: a fresh execution of
    # the dataset must hand each worker the rest of the very same stream.
    fit(tmp_path, "resumed", stage, start_epoch=1, skip=SKIP)
    for rank in (0, 1):
        first = load(tmp_path, "first", rank, 1)
        assert len(first) > SKIP
        assert load(tmp_path, "resumed", rank, 1) == first[SKIP:]
