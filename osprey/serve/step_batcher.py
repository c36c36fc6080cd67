"""Streamed requests decoded in batches, the next batch formed when the engine is free.

Serve's `@serve.batch` takes its next batch off the queue as soon as the current one starts; for
a generator batch that yields between decode steps (to stream tokens out) that next batch holds
only the requests that arrived in the first `batch_wait_timeout_s` of the running one, and the
rest split into more small batches behind it. Here a batch is taken when the previous one has
finished: every request that arrived meanwhile (up to `max_batch_size`) decodes together.

All of it runs in the replica's event loop: a decode step holds the loop, and between steps the
callers' events go out and new requests and cancellations come in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ray.serve")

# run_batch(requests, cancelled) yields, per step, one event or None (nothing new) per request.
RunBatch = Callable[[Sequence[Any], Callable[[int], bool]], Iterator[Sequence[Any]]]

_END = object()


@dataclass
class _Job:
    request: Any
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    left: bool = False  # the caller stopped listening


class StepBatcher:
    def __init__(self, run_batch: RunBatch, max_batch_size: int, batch_wait_timeout_s: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.batches: list[int] = []  # sizes of the batches run
        self._queue: asyncio.Queue[_Job] | None = None
        self._loop_task: asyncio.Task | None = None

    async def submit(self, request: Any) -> AsyncIterator[Any]:
        """The request's events as they decode; an exception from its batch is raised here.
        Leaving the iteration early drops the request from its batch at the next step."""
        job = _Job(request)
        self._start()
        self._queue.put_nowait(job)
        try:
            while True:
                event = await job.events.get()
                if event is _END:
                    return
                if isinstance(event, Exception):
                    raise event
                yield event
        finally:
            job.left = True

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            if self._queue is None:
                self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _next_batch(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        deadline = loop.time() + self.batch_wait_timeout_s
        while len(jobs) < self.max_batch_size:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [job for job in jobs if not job.left]

    async def _run(self) -> None:
        while True:
            jobs = await self._next_batch()
            if jobs:
                await self._decode(jobs)

    async def _decode(self, jobs: list[_Job]) -> None:
        self.batches.append(len(jobs))
        try:
            steps = self.run_batch([j.request for j in jobs], lambda i: jobs[i].left)
            for events in steps:
                for job, event in zip(jobs, events, strict=True):
                    if event is not None:
                        job.events.put_nowait(event)
                await asyncio.sleep(0)
        except Exception as exc:
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                job.events.put_nowait(exc)
        finally:
            for job in jobs:
                job.events.put_nowait(_END)
