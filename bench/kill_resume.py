"""Stress: kill a training worker 0-10 s after a checkpoint, again and again; every restart must
resume from the newest checkpoint that was complete when the worker died.

    python bench/kill_resume.py [--kills 10] [--max-delay 10] [--checkpoint-every 10]

Runs a `tiny` stage as the `osprey train` job does (`python -m jobs.train_stage1 --config ...`,
starting a Ray of its own on 127.0.0.1), and watches the run's storage. Each round: wait for
a new complete checkpoint (its completion marker, `osprey.train.checkpoints`), sleep the round's
delay (spread evenly over 0..--max-delay), SIGKILL the job's newest Ray Train worker,
and read the step the restarted stage logs (`resumed <stage> at step N ... from <checkpoint>`).
Expected: the highest step among complete checkpoints that were started before the kill. Prints
one line per round and exits 1 if any round resumed elsewhere. Not part of `make test`;
tests/test_train_resume.py runs one round of it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESUMED = re.compile(r"resumed (\S+) at step (\d+) \(epoch \d+\) from (\S+)")


@dataclass
class Round:
    delay: float
    killed_pid: int
    kill_time: float
    expected: int
    resumed: int | None = None
    resumed_from: str | None = None

    @property
    def ok(self) -> bool:
        return self.resumed == self.expected


def started_at(name: str) -> float:
    """When rank 0 named the checkpoint (the UTC stamp in `checkpoint_dir_name`)."""
    stamp = name.rsplit("_", 1)[-1]
    return datetime.strptime(stamp, "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc).timestamp()


class Watcher(threading.Thread):
    """Every complete checkpoint the run's storage ever held (Ray deletes old ones)."""

    def __init__(self, fs, run_path: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.fs, self.run_path, self.interval = fs, run_path, interval
        self.complete: dict[str, tuple[int, float]] = {}  # name -> (step, first seen)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.poll()
            time.sleep(self.interval)

    def poll(self) -> None:
        from osprey.train.checkpoints import scan

        try:
            complete, _ = scan(self.fs, self.run_path)
        except (OSError, FileNotFoundError):
            return  # a directory deleted while listed: next time
        now = time.time()
        for c in complete:
            self.complete.setdefault(c.name, (c.step, now))

    def newest_started_before(self, when: float) -> int:
        steps = [step for name, (step, _) in self.complete.items() if started_at(name) < when]
        return max(steps, default=0)

    def wait_new(self, after: float, timeout: float, job: Job) -> str:
        """The first complete checkpoint seen after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if job.proc.poll() is not None:
                raise RuntimeError("the stage ended:\n" + "".join(job.lines[-60:]))
            for name, (_, seen) in sorted(self.complete.items(), key=lambda kv: kv[1][1]):
                if seen > after:
                    return name
            time.sleep(0.05)
        raise TimeoutError(f"no new complete checkpoint in {timeout} s")


@dataclass
class Job:
    """The stage's driver process; its output (with the workers' log lines) is kept."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def follow(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def resumes(self) -> list[tuple[int, str]]:
        return [(int(m[2]), m[3]) for m in map(RESUMED.search, list(self.lines)) if m]


def stop_job(job: Job) -> None:
    """The driver first (it shuts down the local Ray it started), then anything left in its
    session."""
    if job.proc.poll() is None:
        job.proc.terminate()
        try:
            job.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(job.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    job.proc.wait()


def kill_train_worker(root_pid: int) -> int:
    """SIGKILL the newest Ray Train worker among the descendants of `root_pid` (the job's driver,
    which started its Ray, or a Ray head): this run's, never another one's on the machine."""
    import psutil

    workers = [
        p
        for p in psutil.Process(root_pid).children(recursive=True)
        if p.is_running()
        and p.status() != psutil.STATUS_ZOMBIE
        and "RayTrainWorker" in " ".join(p.cmdline())
    ]
    if not workers:
        raise RuntimeError("no Ray Train worker of this cluster to kill")
    victim = max(workers, key=lambda p: p.create_time())
    victim.kill()
    return victim.pid


def write_inputs(root: Path, images: int) -> None:
    from osprey.data.shapes import shapes_corpus, write_shapes_dataset
    from osprey.model.config import get_config
    from osprey.prompts import save_tokenizer, train_tokenizer

    write_shapes_dataset(root / "shapes", n=images, seed=0, val_fraction=0.0, progress=False)
    vocab = get_config("tiny").llm.vocab_size
    save_tokenizer(train_tokenizer(shapes_corpus(), vocab), root / "tokenizer")


def write_stage(root: Path, name: str, max_steps: int, checkpoint_every: int) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\npreset: tiny\ntrains: [projector]\n"
        f"data: [{root / 'shapes' / 'train'}]\ntasks: [category]\n"
        f"tokenizer: {root / 'tokenizer'}\nlr: 1.0e-3\nglobal_batch_size: 4\n"
        f"micro_batch_size: 2\nepochs: 1000\nmax_steps: {max_steps}\nmax_length: 512\n"
        f"checkpoint_every: {checkpoint_every}\nlog_every: 1\n"
    )
    return path


def stress(
    root: Path,
    delays: list[float],
    *,
    max_steps: int,
    checkpoint_every: int,
    finish: bool,
    verbose: bool = False,
) -> tuple[list[Round], Job, int | None]:
    """Run the stage, kill a worker once per delay; (rounds, the job, its exit code if it was
    let finish)."""
    import pyarrow.fs as pafs

    name = "stress"
    config = write_stage(root, name, max_steps, checkpoint_every)
    # No RAY_ADDRESS: the job starts a Ray of its own on loopback, as `osprey train` does alone.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    job = Job(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobs.train_stage1",
                "--config",
                str(config),
                "--output-dir",
                str(root / "run"),
                "--pipeline",
                "bench",
                "--workers",
                "2",
                "--max-failures",
                str(len(delays) + 1),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    )
    threading.Thread(target=job.follow, daemon=True).start()
    watcher = Watcher(pafs.LocalFileSystem(), str(root / "run" / "ray" / f"bench-{name}"))
    watcher.start()
    rounds: list[Round] = []
    since = 0.0
    try:
        for delay in delays:
            watcher.wait_new(since, timeout=1800, job=job)
            time.sleep(delay)
            kill_time = time.time()
            pid = kill_train_worker(job.proc.pid)
            done = Round(delay, pid, kill_time, expected=0)
            rounds.append(done)
            deadline = time.monotonic() + 1800
            while len(job.resumes()) < len(rounds):
                if time.monotonic() > deadline or job.proc.poll() is not None:
                    raise RuntimeError("the stage did not restart:\n" + "".join(job.lines[-40:]))
                time.sleep(0.2)
            done.resumed, done.resumed_from = job.resumes()[len(rounds) - 1]
            # Every checkpoint of the killed attempt has its final state by now.
            watcher.poll()
            done.expected = watcher.newest_started_before(kill_time)
            since = time.time()
            if verbose:
                print(describe(len(rounds), done), flush=True)
        code = None
        if finish:
            code = job.proc.wait(timeout=900)
    finally:
        watcher.stopped.set()
        stop_job(job)
    return rounds, job, code


def describe(i: int, r: Round) -> str:
    verdict = "ok" if r.ok else "WRONG"
    return (
        f"round {i:2d}: killed pid {r.killed_pid} {r.delay:4.1f} s after a checkpoint; newest "
        f"complete at the kill: step {r.expected}; resumed at step {r.resumed} "
        f"({r.resumed_from}) {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--max-delay", type=float, default=10.0)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--verbose", action="store_true", help="the job's whole output at the end")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="osprey-bench-kill-"))
    write_inputs(root, args.images)
    step = args.max_delay / max(args.kills - 1, 1)
    delays = [round(i * step, 1) for i in range(args.kills)]
    rounds, job, _ = stress(
        root, delays, max_steps=10**6, checkpoint_every=args.checkpoint_every, finish=False,
        verbose=True,
    )  # fmt: skip
    if args.verbose:
        print("".join(job.lines))
    right = sum(r.ok for r in rounds)
    print(f"{right}/{len(rounds)} rounds resumed from the newest complete checkpoint")
    print("resume steps:", [r.resumed for r in rounds])
    sys.exit(0 if right == len(rounds) else 1)


if __name__ == "__main__":
    main()
