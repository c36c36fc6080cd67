"""A stage never restarts behind its newest complete checkpoint: on a
resubmitted job, on S3; a partial checkpoint is passed over and named; MLflow gets each step once.
A killed worker's resume is pinned by tests/test_train_e2e.py (stage 3); bench/kill_resume.py repeats
it 10 times at kill delays of 0-10 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from osprey.train.checkpoints import MARKER, STATE_FILE, resume_point, scan, write_marker

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "kill_resume.py"


def fake_checkpoint(root: Path, name: str, step: int, ranks: int = 2, marker: bool = True) -> Path:
    """A checkpoint as the loop stores one: each rank's shard, rank 0's state, the marker."""
    path = root / name
    (path / "ds").mkdir(parents=True)
    files = {}
    for rank in range(ranks):
        shard = path / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.write_bytes(b"x" * (100 + rank))
        files[f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = 100 + rank
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    files[STATE_FILE] = (path / STATE_FILE).stat().st_size
    if marker:
        write_marker(pafs.LocalFileSystem(), str(path), step, ranks, files)
    return path


def test_the_newest_complete_checkpoint_wins_over_partial_and_over_rays_older_offer(tmp_path):
    fs = pafs.LocalFileSystem()
    older = fake_checkpoint(tmp_path, "checkpoint_step00000010_a", 10)
    newer = fake_checkpoint(tmp_path, "checkpoint_step00000020_b", 20)
    broken = fake_checkpoint(tmp_path, "checkpoint_step00000030_c", 30)
    (broken / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    fake_checkpoint(tmp_path, "checkpoint_step00000040_d", 40, marker=False)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # not a checkpoint

    # Ray Train's controller registered only step 10 (it had not registered 20 when a worker
    # died): the stage resumes from 20; 30 lacks a rank's shard, 40 its marker.
    chosen, notes = resume_point(fs, str(tmp_path), str(older))
    assert (chosen.name, chosen.step) == (newer.name, 20)
    assert any(broken.name in n and "zero_pp_rank_1" in n for n in notes), notes
    assert any("checkpoint_step00000040_d" in n and "no completion marker" in n for n in notes)
    assert any(f"Ray Train offered {older.name}" in n for n in notes)

    # Registered by Ray (every rank reported it after its upload) but rank 0 died before the
    # marker: complete, and the newest.
    chosen, _ = resume_point(fs, str(tmp_path), str(tmp_path / "checkpoint_step00000040_d"))
    assert chosen.step == 40
    # Offered but with a listed file missing: never.
    chosen, _ = resume_point(fs, str(tmp_path), str(broken))
    assert chosen.step == 20

    complete, partial = scan(fs, str(tmp_path))
    assert [c.step for c in complete] == [20, 10]
    assert sorted(p.name for p in partial) == [broken.name, "checkpoint_step00000040_d"]
    (newer / MARKER).write_text("{not json")
    assert [c.step for c in scan(fs, str(tmp_path))[0]] == [10]
    assert resume_point(fs, str(tmp_path / "nothing-yet"), None) == (None, [])


def test_throughput_counts_every_ranks_tokens_over_the_slowest_ranks_time():
    from osprey.train.loop import group_rates

    # Rank 0 did 100 tokens in 2 s, rank 1 did 300 in 4 s: the group did 400 in 4 s (not
    # rank 0's 100 times two ranks over 2 s).
    rates = group_rates(tokens=100 + 300, samples=2 + 6, elapsed=max(2.0, 4.0))
    assert rates == {"tokens_per_s": 100.0, "samples_per_s": 2.0}


def test_a_pipeline_run_ends_finished_or_failed(tmp_path):
    from osprey.tracking import Tracker, default_tracking_uri

    tracker = Tracker(default_tracking_uri(tmp_path), artifact_location=tmp_path.as_uri())
    parent = tracker.pipeline_run("p", running=True)
    with tracker.ending(parent):
        assert tracker.client.get_run(parent).info.status == "RUNNING"
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    # Run again (a resumed pipeline) and fail in a stage.
    assert tracker.pipeline_run("p", running=True) == parent
    assert tracker.client.get_run(parent).info.status == "RUNNING"
    with pytest.raises(RuntimeError), tracker.ending(parent):
        raise RuntimeError("stage2 failed")
    assert tracker.client.get_run(parent).info.status == "FAILED"


# --------------------------------------------------------------------------------------------
# Through Ray Train: each job starts a Ray of its own (the session cluster holds Serve replicas).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kill_resume", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def inputs(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    bench.write_inputs(root, images=16)
    return root


def loss_steps(run_dir: Path, pipeline: str, stage: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    from osprey.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(run_dir))
    experiment = client.get_experiment_by_name("osprey")
    [run] = client.search_runs(
        [experiment.experiment_id],
        f"tags.`osprey.stage` = '{stage}' and tags.`osprey.pipeline` = '{pipeline}'",
    )
    assert run.info.status == "FINISHED"
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))


def run_stage_job(config: Path, out: Path, *extra: str) -> str:
    """The stage as `osprey train` runs it alone (a local Ray on loopback)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train_stage1", "--config", str(config), "--output-dir",
         str(out), "--pipeline", "s3", "--workers", "2", "--max-failures", "0", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_partial_newest_checkpoint_on_s3_is_passed_over(bench, inputs, moto_s3):
    """A resubmitted job whose newest checkpoint lost a rank's shard resumes from the one before,
    with the checkpoints on S3 (moto)."""
    fs, options = moto_s3
    fs.create_dir("checkpoints")
    config = bench.write_stage(inputs, "partial", max_steps=4, checkpoint_every=2)
    s3 = ["--storage", "s3://checkpoints/runs", "--s3-endpoint", options.endpoint,
          "--s3-scheme", "http", "--s3-region", "us-east-1"]  # fmt: skip
    out = inputs / "s3-run"
    run_stage_job(config, out, *s3)
    run_path = "checkpoints/runs/s3-partial"
    complete, partial = scan(fs, run_path)
    assert [c.step for c in complete] == [4, 2] and not partial
    newest, previous = complete
    [shard] = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(newest.path, recursive=True))
        if "zero_pp_rank_1_" in f.path
    ]
    fs.delete_file(shard)

    output = run_stage_job(config, out, *s3, "--set", "max_steps=6")
    assert f"not resuming from partial checkpoint {newest.name}" in output, output[-3000:]
    assert f"resumed partial at step 2 (epoch 0) from {previous.name}" in output, output[-3000:]
    assert scan(fs, run_path)[0][0].step == 6
    assert loss_steps(out, "s3", "partial") == list(range(1, 7))
