"""Training progress on the driver's console, read from MLflow: about `lines` lines a stage.

Rank 0 logs its metrics to the stage's MLflow run every `log_every` steps. Following that run
from the driver gives the user those lines without Ray's worker output on the console, so a quiet
driver (`osprey demo` without --verbose) can send everything Ray prints to a log file; it works
the same whether the workers run here or on a remote cluster. A line covers the logged steps
since the one before (their mean loss), so a stage of any length prints about `lines` of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from osprey.tracking import Tracker


class MetricFollower:
    """Print each new `loss` point of `run_id` while the block runs (a daemon thread polling
    every `interval` seconds, and once more at exit)."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        *,
        stage: str,
        total_steps: int,
        interval: float = 2.0,
        lines: int = 10,
        write: Callable[[str], None] = print,
    ) -> None:
        self.tracker, self.run_id, self.stage = tracker, run_id, stage
        self.total_steps, self.interval, self.write = total_steps, interval, write
        self.every = max(1, -(-total_steps // max(1, lines)))  # steps a line covers
        self._pending: dict[int, float] = {}  # logged losses not printed yet
        self._last_step = -1
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="metric-follower", daemon=True)

    def __enter__(self) -> MetricFollower:
        # A resumed stage has its earlier points already: print only what is new.
        self._last_step = max((m.step for m in self._history("loss")), default=-1)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def poll(self) -> None:
        losses = {m.step: m.value for m in self._history("loss") if m.step > self._last_step}
        if not losses:
            return
        rates = {m.step: m.value for m in self._history("tokens_per_s")}
        for step in sorted(losses):
            self._pending[step] = losses[step]
            if step % self.every and step < self.total_steps:
                continue
            elapsed = time.monotonic() - self._started
            rate = f", {rates[step]:,.0f} tokens/s" if step in rates else ""
            mean = sum(self._pending.values()) / len(self._pending)
            first = min(self._pending)
            steps = f"step {step}" if first == step else f"steps {first}-{step}"
            self.write(
                f"  {self.stage} {steps}/{self.total_steps} loss {mean:.4f}{rate} ({elapsed:.0f} s)"
            )
            self._pending.clear()
        self._last_step = max(losses)

    def _history(self, key: str):
        try:
            return self.tracker.client.get_metric_history(self.run_id, key)
        except Exception:  # a busy sqlite file; the next poll reads it
            return []

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
