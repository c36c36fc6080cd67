"""The Serve deployments: a mask generator, a captioner and the HTTP ingress.

Their options (replicas, autoscaling, CPUs/GPUs, max_ongoing_requests, max_queued_requests) are
set by serve/config.yaml; the defaults here fit one small machine. The captioner batches
describe requests across clients with `@serve.batch` and captions each batch with the
shared-prefix engine, so the regions of many requests decode as one batch; chat requests
(`/v1/chat`, `/v1/chat/completions`) are batched into the engine's request decode, each with
its own sampling, and stream their tokens back as they decode (osprey.serve.step_batcher forms
a chat batch when the engine is free, where `@serve.batch` would split it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from osprey.serve.auth import BearerAuth
from osprey.serve.config import ServeArgs
from osprey.serve.errors import APIError, RequestError
from osprey.serve.step_batcher import StepBatcher

log = logging.getLogger("ray.serve")

# Requests asking the same tasks, each (name, question, max new tokens), in the same decoding
# mode caption together.
_TaskKey = tuple[tuple[tuple[str, str, int], ...], str]


@serve.deployment(name="MaskGenerator", max_ongoing_requests=4)
class MaskGenerator:
    """Masks from points, boxes or the whole image (SAM with `sam_weights`, else classical)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from osprey.infer.segment import SamConfig, SegmenterConfig

        config = ServeArgs.model_validate(args)
        sam = None
        if config.sam_weights:
            sam = SamConfig(weights=config.sam_weights, device=_device(config.device))
        self.config = SegmenterConfig(sam=sam)
        self.segmenter = self.config.build()
        self.lock = threading.Lock()

    def segment(
        self, image: np.ndarray, mode: str, prompts: list[tuple[float, ...]], limit: int
    ) -> list[dict]:
        with self.lock:
            if mode == "points":
                regions = self.segmenter.from_points(image, prompts)
            elif mode == "boxes":
                regions = self.segmenter.from_boxes(image, prompts)
            elif mode == "everything":
                regions = self.segmenter.segment(image)[:limit]
            else:
                raise RequestError("mode", f"unknown segmentation mode {mode!r}")
        return [r.to_dict() for r in regions]

    def backend(self) -> str:
        return self.config.backend

    def ready(self) -> str:
        return "ok"


@serve.deployment(name="Captioner", max_ongoing_requests=32)
class Captioner:
    """Region answers from the Osprey model: describe and chat requests batched across clients
    (chat with each request's own sampling, streamed as it decodes)."""

    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        from osprey.infer.config import EngineConfig
        from osprey.infer.engine import RegionCaptioner
        from osprey.serve.model_source import resolve_adapter, resolve_model

        self.args = ServeArgs.model_validate(args)
        model_dir = resolve_model(self.args.model, self.args.tracking_uri)
        adapter = self.args.adapter
        if adapter:
            adapter = resolve_adapter(adapter, self.args.tracking_uri)
        engine = EngineConfig(
            template=self.args.template,
            decoding=self.args.decoding,
            max_batch_regions=self.args.max_batch_regions,
            max_batch_images=self.args.max_batch_size,
        )
        dtype = getattr(torch, self.args.dtype) if self.args.dtype else None
        self.engine = RegionCaptioner.from_pretrained(
            model_dir, engine, device=_device(self.args.device), dtype=dtype, adapter=adapter
        )
        self.model_dir = model_dir
        # Engine work is serialised per replica: concurrent requests share the CPU or GPU
        # anyway, and batching (not threads) is what gives them throughput.
        self.lock = threading.Lock()
        self.batches: list[int] = []  # sizes of the batches run (bench/serve.py reads them)
        self.cancelled_rows: list[int] = []  # tokens decoded before each cancelled chat left
        self._describe_batch.set_max_batch_size(self.args.max_batch_size)
        self._describe_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.chat_batcher = StepBatcher(
            self._chat_steps, self.args.max_batch_size, self.args.batch_wait_timeout_s
        )

    # ---- describe: batched across requests ---------------------------------------------------

    async def describe(
        self,
        image: np.ndarray,
        regions: list[dict],
        tasks: list[str],
        question: str | None,
        max_new_tokens: int,
        decoding: str | None = None,
    ) -> list[dict[str, str]]:
        from osprey.infer.config import question_task
        from osprey.infer.engine import STANDARD_TASKS

        mode = decoding or self.args.decoding

        def tokens(task) -> int:
            # The reference decodes up to 1024 new tokens: here up to the deployment's cap.
            return (
                max_new_tokens if mode == "reference" else min(task.max_new_tokens, max_new_tokens)
            )

        key = [(n, STANDARD_TASKS[n].question, tokens(STANDARD_TASKS[n])) for n in tasks]
        if question is not None:
            try:
                task = question_task(question, max_new_tokens)
            except ValueError as exc:
                raise RequestError("question", str(exc)) from exc
            key.append((task.name, task.question, task.max_new_tokens))
        return await self.caption(image, regions, key, mode)

    async def caption(
        self,
        image: np.ndarray,
        regions: list[dict],
        tasks: list[tuple[str, str, int]],
        decoding: str | None = None,
    ) -> list[dict[str, str]]:
        """Per region {task name: answer} for tasks given whole, (name, question, max new
        tokens): what batch jobs send (osprey.infer.remote), batched with describe requests."""
        specs = tuple((str(n), str(q), int(m)) for n, q, m in tasks)
        key = (specs, decoding or self.args.decoding)
        result = await self._describe_batch((image, regions, key))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _describe_batch(self, jobs: list[tuple]) -> list[Any]:
        # Run in the replica's event loop, not a thread: requests that arrive meanwhile wait
        # unread and all join the next batch. In a thread, the decode loop holds the GIL and
        # requests trickle in one or two per batch.
        return self._run_batch(jobs)

    def _run_batch(self, jobs: list[tuple]) -> list[Any]:
        """Jobs asking the same tasks caption together; a failing group retries job by job,
        so one bad request fails alone."""
        from osprey.infer.regions import Region, RleMasks

        results: list[Any] = [None] * len(jobs)
        groups: dict[_TaskKey, list[int]] = {}
        for i, (_, _, key) in enumerate(jobs):
            groups.setdefault(key, []).append(i)
        with self.lock:
            self.batches.append(len(jobs))
            for key, members in groups.items():
                try:
                    tasks = self._tasks(key)
                except ValueError as exc:
                    for i in members:
                        results[i] = RequestError("question", str(exc))
                    continue

                def run(indices: list[int], tasks=tasks) -> list[list[dict[str, str]]]:
                    images = [jobs[i][0] for i in indices]
                    masks = [RleMasks([Region.from_dict(d) for d in jobs[i][1]]) for i in indices]
                    return self.engine.caption(images, masks, tasks)

                with self.engine.decoding(self._engine_config(key[1])):
                    try:
                        for i, answers in zip(members, run(members), strict=True):
                            results[i] = answers
                    except Exception:
                        for i in members:
                            try:
                                results[i] = run([i])[0]
                            except Exception as exc:
                                log.exception("describe failed")
                                results[i] = exc
        return results

    def _tasks(self, key: _TaskKey) -> list:
        from osprey.infer.config import Task

        tasks = [Task(*spec) for spec in key[0]]
        for task in tasks:
            self.engine.prompt_ids(task.question)  # a question the tokenizer refuses fails here
        return tasks

    # ---- chat: conversations batched across clients, streamed as they decode --------------

    async def chat(
        self, image: np.ndarray, regions: list[dict], turns: list[dict], params: dict[str, Any]
    ) -> dict[str, Any]:
        """The whole answer: {"text", "finish_reason", "prompt_tokens", "completion_tokens"}."""
        last: dict[str, Any] = {}
        async for event in self.chat_stream(image, regions, turns, params):
            last = event
        return last

    async def chat_stream(
        self, image: np.ndarray, regions: list[dict], turns: list[dict], params: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """{"delta": text} events as tokens decode; the last also holds "text",
        "finish_reason", "prompt_tokens" and "completion_tokens". A caller that goes away
        (the HTTP client disconnected) is dropped from its decode batch at the next step."""
        request = self._chat_request(image, regions, turns, params)
        # aclosing: a caller that leaves mid-answer closes the batcher's side at once.
        async with contextlib.aclosing(self.chat_batcher.submit(request)) as events:
            async for event in events:
                yield event
                if "finish_reason" in event:
                    return

    def _engine_config(self, mode: str):
        """The engine's config decoding in `mode` (its own when the mode is the deployment's)."""
        from dataclasses import replace

        if mode == self.engine.config.decoding:
            return self.engine.config
        return replace(self.engine.config, decoding=mode).for_model(self.model_dir)

    def _chat_request(self, image, regions, turns, params):
        from dataclasses import replace

        from osprey.infer.config import DecodingConfig, SamplingParams
        from osprey.infer.engine import ChatRequest
        from osprey.infer.regions import Region

        params = dict(params)
        mode = params.pop("decoding", None) or self.args.decoding
        try:
            if mode == "reference":
                reference = DecodingConfig(mode="reference", seed=params.get("seed") or 0)
                sampling = reference.params(self.model_dir, params["max_new_tokens"])
                sampling = replace(sampling, stop=tuple(params.get("stop", ())))
            else:
                sampling = SamplingParams(**params)
        except (TypeError, ValueError) as exc:
            raise RequestError("sampling", str(exc)) from exc
        masks = [Region.from_dict(r).mask() for r in regions]
        request = ChatRequest(image, turns, masks, sampling)
        try:
            self.engine.check(request)
        except ValueError as exc:
            raise RequestError("messages", str(exc)) from exc
        return request

    def _chat_steps(self, requests: list, cancelled) -> Iterator[list[Any]]:
        """Per decode step, each request's event: {"delta"}, the final one with the whole
        answer, or None (nothing new)."""
        for events in self.engine.stream(requests, cancelled=cancelled):
            out: list[Any] = []
            for event in events:
                if event is None or (event.completion is None and not event.delta):
                    out.append(None)
                elif event.completion is None:
                    out.append({"delta": event.delta})
                else:
                    c = event.completion
                    if c.finish_reason == "cancelled":
                        self.cancelled_rows.append(len(c.token_ids))
                    out.append(
                        {
                            "delta": event.delta,
                            "text": c.text,
                            "finish_reason": c.finish_reason,
                            "prompt_tokens": c.prompt_tokens,
                            "completion_tokens": c.completion_tokens,
                        }
                    )
            yield out

    # ---- service -----------------------------------------------------------------------------

    def ready(self) -> str:
        return "ok"

    def stats(self) -> dict[str, Any]:
        """Batch sizes run so far, and the engine's time split."""
        from dataclasses import asdict

        return {
            "batches": list(self.batches),
            "chat_batches": list(self.chat_batcher.batches),
            "cancelled_rows": list(self.cancelled_rows),
            "engine": asdict(self.engine.stats),
        }


@serve.deployment(name="OspreyIngress", max_ongoing_requests=64)
@serve.ingress()
class OspreyIngress:
    """The HTTP API and the web page (osprey.serve.api) over the two deployments."""

    def __init__(
        self, mask_generator: DeploymentHandle, captioner: DeploymentHandle, args: dict[str, Any]
    ) -> None:
        self.args = ServeArgs.model_validate(args)
        self.auth = BearerAuth.from_env(self.args.auth_token_env)
        self.mask_generator = mask_generator
        self.captioner = captioner
        self.model_name = self.args.model
        self.segmenter_name = "sam" if self.args.sam_weights else "classical"

    def __serve_build_asgi_app__(self):
        from osprey.serve.api import create_api

        return create_api(self, self.args, self.auth)

    async def _call(self, response: Awaitable) -> Any:
        try:
            return await asyncio.wait_for(_wait(response), self.args.request_timeout_s)
        except BackPressureError as exc:
            raise APIError(
                503, None, "overloaded: too many requests queued, retry later", "overloaded",
                {"Retry-After": "1"},
            ) from exc  # fmt: skip
        except asyncio.TimeoutError as exc:
            raise APIError(504, None, "the model did not answer in time", "timeout") from exc
        except Exception as exc:
            cause = _request_error(exc)
            if cause is not None:
                raise APIError(422, cause.field, cause.message, "invalid_request") from exc
            raise

    async def segment(self, image, mode, prompts, limit) -> list[dict]:
        return await self._call(self.mask_generator.segment.remote(image, mode, prompts, limit))

    async def describe(self, image, regions, tasks, question, max_new_tokens, decoding=None):
        return await self._call(
            self.captioner.describe.remote(
                image, regions, tasks, question, max_new_tokens, decoding
            )
        )

    async def chat(self, image, regions, turns, params) -> dict[str, Any]:
        return await self._call(self.captioner.chat.remote(image, regions, turns, params))

    async def chat_stream(self, image, regions, turns, params) -> AsyncIterator[dict[str, Any]]:
        """The captioner's events; errors before the first event are raised as APIError, so
        a refused request gets its 4xx before any streamed byte."""
        stream = self.captioner.options(stream=True).chat_stream.remote(
            image, regions, turns, params
        )
        first = await self._call(stream.__anext__())
        return _chain(first, stream)

    async def ready(self) -> dict[str, str]:
        states = {}
        for name, handle in (("MaskGenerator", self.mask_generator), ("Captioner", self.captioner)):
            began = time.monotonic()
            try:
                states[name] = await asyncio.wait_for(_wait(handle.ready.remote()), 5.0)
            except Exception as exc:
                states[name] = (
                    f"not ready ({type(exc).__name__} after {time.monotonic() - began:.1f} s)"
                )
        return states


async def _wait(response: Awaitable) -> Any:
    return await response


async def _chain(first: dict[str, Any], rest) -> AsyncIterator[dict[str, Any]]:
    finished = "finish_reason" in first
    try:
        yield first
        if finished:
            return
        async for event in rest:
            finished = "finish_reason" in event
            yield event
    finally:
        if not finished:
            # The HTTP client went away mid-stream: cancel the captioner's side too, which
            # drops the request from its decode batch.
            rest.cancel()


def _request_error(exc: BaseException) -> RequestError | None:
    """The RequestError a deployment raised, however Ray wrapped it."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, RequestError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
