"""A stage job run alone (no cluster, no RAY_ADDRESS) starts a local Ray it can finish on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from osprey.data.pipeline import PipelineConfig
from osprey.train.runner import RunOptions, stage_cpus

REPO = Path(__file__).resolve().parents[1]


def test_a_stage_holds_its_workers_cpus_plus_the_data_pipelines():
    pipeline = PipelineConfig(mappers=1)
    assert stage_cpus(RunOptions(num_workers=2), pipeline) == 4  # + mapper + reader
    assert stage_cpus(RunOptions(num_workers=8, cpus_per_worker=4, data_mappers=3), pipeline) == 36


def test_workers_put_their_interpreters_tools_first_on_path():
    from osprey.train.loop import tools_first

    assert tools_first("/usr/bin:/venv/bin:/bin", "/venv/bin") == "/venv/bin:/usr/bin:/bin"
    assert tools_first("", "/venv/bin") == "/venv/bin"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stage_job_alone_when_its_workers_hold_every_core(tmp_path):
    """Workers asking for every core of the machine: a local Ray sized to the cores alone left
    the data pipeline no CPU, and the job waited forever for its first batch."""
    from osprey.data.shapes import write_shapes_dataset
    from osprey.train.bases import BasesConfig, prepare_bases

    write_shapes_dataset(tmp_path / "shapes", n=12, seed=3, progress=False)
    prepare_bases(
        tmp_path / "bases",
        tmp_path / "shapes",
        BasesConfig(vision_steps=2, llm_steps=2, llm_reading_steps=2, parallel=False),
    )
    cores = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable, "-m", "jobs.train_stage1", "--output-dir", str(tmp_path),
        "--pipeline", "alone", "--workers", "2", "--cpus-per-worker", str(cores / 2),
        "--max-failures", "0", "--set", "max_steps=2", "--set", "global_batch_size=4",
        "--set", "micro_batch_size=2", "--set", "checkpoint_every=2",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"stage1: model and DeepSpeed engine ready in [\d.]+ s", done.stderr)
    result = json.loads(done.stdout[done.stdout.rindex('{\n  "stage"') :])
    assert result["steps"] == 2
    assert list((tmp_path / "stage1" / "model").glob("*.safetensors"))
