"""The chat batcher: requests that arrive while a batch decodes all decode together next, a
caller that leaves is dropped at the next step, and a failing batch fails its own callers."""

import asyncio
import time

import pytest

from osprey.serve.step_batcher import StepBatcher


class FakeEngine:
    """Each request is (name, steps): one event per step, the last one final; a step takes
    `step_s`, holding the event loop as a real decode step does."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.batches: list[list[str]] = []
        self.dropped: list[str] = []

    def run(self, requests, cancelled):
        self.batches.append([name for name, _ in requests])
        alive = set(range(len(requests)))
        for step in range(max(n for _, n in requests)):
            time.sleep(self.step_s)
            events = [None] * len(requests)
            for i in sorted(alive):
                if cancelled(i):
                    alive.discard(i)
                    self.dropped.append(requests[i][0])
                    continue
                name, steps = requests[i]
                events[i] = {"name": name, "step": step, "final": step == steps - 1}
                if step == steps - 1:
                    alive.discard(i)
            yield events


async def collect(batcher, request, events=None):
    got = []
    async for event in batcher.submit(request):
        got.append(event)
        if events is not None:
            events.append(event)
    return got


def test_requests_arriving_during_a_batch_decode_together_next():
    async def main():
        engine = FakeEngine(step_s=0.005)
        batcher = StepBatcher(engine.run, max_batch_size=16, batch_wait_timeout_s=0.01)
        first = asyncio.create_task(collect(batcher, ("a", 60)))
        await asyncio.sleep(0.05)
        # While "a" decodes (300 ms), six requests arrive over about 40 ms, longer than the
        # batch wait: a batch formed as soon as "a" started would take only the first ones.
        later = []
        for k in range(6):
            later.append(asyncio.create_task(collect(batcher, (f"b{k}", 3))))
            await asyncio.sleep(0.007)
        results = await asyncio.gather(first, *later)
        return engine, batcher, results

    engine, batcher, results = asyncio.run(main())
    assert engine.batches == [["a"], [f"b{k}" for k in range(6)]]
    assert batcher.batches == [1, 6]
    assert [len(r) for r in results] == [60] + [3] * 6
    assert all(r[-1]["final"] for r in results)


def test_batches_hold_at_most_max_batch_size():
    async def main():
        engine = FakeEngine()
        batcher = StepBatcher(engine.run, max_batch_size=4, batch_wait_timeout_s=0.05)
        await asyncio.gather(*(collect(batcher, (f"r{k}", 2)) for k in range(10)))
        return batcher

    assert asyncio.run(main()).batches == [4, 4, 2]


def test_a_caller_that_leaves_is_dropped_and_the_others_finish():
    async def main():
        engine = FakeEngine()
        batcher = StepBatcher(engine.run, max_batch_size=8, batch_wait_timeout_s=0.01)

        async def leave_after_two():
            got = 0
            async for _ in batcher.submit(("quitter", 50)):
                got += 1
                if got == 2:
                    break
            return got

        stays = asyncio.create_task(collect(batcher, ("stays", 10)))
        quits = asyncio.create_task(leave_after_two())
        return engine, await stays, await quits

    engine, stays, quits = asyncio.run(main())
    assert engine.dropped == ["quitter"]
    assert len(stays) == 10 and quits == 2


def test_a_failing_batch_raises_in_each_caller_and_the_next_batch_runs():
    calls = []

    def run(requests, cancelled):
        calls.append(list(requests))
        if "bad" in requests:
            yield [{"ok": True}] * len(requests)
            raise RuntimeError("decode failed")
        yield [{"ok": True, "final": True}] * len(requests)

    async def main():
        batcher = StepBatcher(run, max_batch_size=8, batch_wait_timeout_s=0.01)
        bad = await asyncio.gather(
            collect(batcher, "bad"), collect(batcher, "x"), return_exceptions=True
        )
        good = await collect(batcher, "y")
        return bad, good

    bad, good = asyncio.run(main())
    assert [type(r) for r in bad] == [RuntimeError, RuntimeError]
    assert good == [{"ok": True, "final": True}]
    assert calls == [["bad", "x"], ["y"]]


def test_max_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        StepBatcher(lambda r, c: iter(()), max_batch_size=0, batch_wait_timeout_s=0.01)
