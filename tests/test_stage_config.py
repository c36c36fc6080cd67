"""Every shipped stage config parses; bad values fail naming the option."""

import pytest

from osprey.train.config import StageConfig, load_stage_config, shipped_configs
from osprey.train.runner import planned_steps


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_stage_config_loads(name):
    stage = load_stage_config(name, output_dir="/run")
    assert stage.name == name.rsplit("/", 1)[1]
    assert "{output_dir}" not in str(stage.to_dict())
    # The global batch is reachable with the quickstart's 2 workers (and 4 GPUs, as the paper's).
    for workers in (1, 2) if stage.preset == "tiny" else (1, 2, 4):
        assert stage.accumulation_steps(workers) >= 1


def test_the_paper_stages_shuffle_and_the_tiny_ones_stream_in_order():
    assert all(load_stage_config(f"osprey-7b/stage{i}").shuffle_buffer > 0 for i in (1, 2, 3))
    assert all(load_stage_config(f"tiny/stage{i}").shuffle_buffer == 0 for i in (1, 2, 3))


@pytest.mark.parametrize(
    "override, option",
    [
        ("shuffle_buffer=-1", "shuffle_buffer"),
        ("zero_stage=4", "zero_stage"),
        ("trains=[vision]", "trains"),
        ("precision=fp16", "precision"),
        ("warmup_ratio=1.5", "warmup_ratio"),
    ],
)
def test_bad_values_name_the_option(override, option):
    with pytest.raises(ValueError, match=option):
        load_stage_config("tiny/stage1", [override])


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="shuffle"):
        StageConfig.from_dict({"name": "s", "trains": ["projector"], "shuffle": 5})


def test_planned_steps_cover_each_workers_share_of_the_epochs():
    stage = StageConfig(
        name="s", trains=["projector"], global_batch_size=16, micro_batch_size=8, epochs=2
    )
    # 540 rows on 2 workers: 270 each, 34 micro-batches an epoch, 1 per step per worker.
    assert planned_steps(stage, 540, 2) == 68
    with pytest.raises(ValueError, match="global_batch_size"):
        planned_steps(StageConfig(name="s", trains=["projector"], global_batch_size=64), 10, 2)
