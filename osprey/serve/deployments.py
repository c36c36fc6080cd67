"""The Serve deployments: a mask generator, a captioner and the HTTP ingress.

Their options (replicas, autoscaling, CPUs/GPUs, max_ongoing_requests, max_queued_requests) are
set by serve/config.yaml; the defaults here fit one small machine. The captioner batches
describe requests across clients with `@serve.batch` and captions each batch with the
shared-prefix engine, so the regions of many requests decode as one batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable
from typing import Any

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from osprey.serve.auth import BearerAuth
from osprey.serve.config import ServeArgs
from osprey.serve.errors import APIError, RequestError

log = logging.getLogger("ray.serve")

# Describe requests asking the same (task names, free question, token cap) caption together.
_TaskKey = tuple[tuple[str, ...], str | None, int]


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
    """Region answers from the Osprey model: describe requests batched across clients."""

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
        self._describe_batch.set_max_batch_size(self.args.max_batch_size)
        self._describe_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    # ---- describe: batched across requests ---------------------------------------------------

    async def describe(
        self,
        image: np.ndarray,
        regions: list[dict],
        tasks: list[str],
        question: str | None,
        max_new_tokens: int,
    ) -> list[dict[str, str]]:
        result = await self._describe_batch(
            (image, regions, (tuple(tasks), question, max_new_tokens))
        )
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
        from osprey.infer.config import Task, question_task
        from osprey.infer.engine import STANDARD_TASKS

        names, question, cap = key
        tasks = [
            Task(n, STANDARD_TASKS[n].question, min(STANDARD_TASKS[n].max_new_tokens, cap))
            for n in names
        ]
        if question is not None:
            task = question_task(question, cap)
            self.engine.prompt_ids(task.question)  # a question the tokenizer refuses fails here
            tasks.append(task)
        return tasks

    # ---- chat: one conversation per call -----------------------------------------------------

    async def chat(
        self, image: np.ndarray, regions: list[dict], turns: list[dict], max_new_tokens: int
    ) -> str:
        return await asyncio.to_thread(self._chat, image, regions, turns, max_new_tokens)

    def _chat(
        self, image: np.ndarray, regions: list[dict], turns: list[dict], max_new_tokens: int
    ) -> str:
        import torch

        from osprey.infer.regions import Region
        from osprey.model.image_processing import preprocess_image
        from osprey.prompts import TEMPLATES, build_generation_ids, regions_overview

        model, tokenizer = self.engine.model, self.engine.tokenizer
        turns = [dict(t) for t in turns]
        if regions:
            # As Osprey-724K's conversations open: the regions listed as region1<mask><pos>, ...
            turns[0]["value"] = regions_overview(len(regions)) + turns[0]["value"]
        try:
            sample = build_generation_ids(
                tokenizer,
                turns[-1]["value"],
                template=TEMPLATES[self.args.template],
                history=turns[:-1],
                num_regions=len(regions),
            )
        except ValueError as exc:
            raise RequestError("messages", str(exc)) from exc
        ids = sample.input_ids
        cfg = model.config
        length = len(ids) - 1 + cfg.vision.num_image_tokens + max_new_tokens
        if length > cfg.llm.max_position_embeddings:
            raise RequestError(
                "messages",
                f"the conversation needs {length} positions with max_new_tokens; the model "
                f"has {cfg.llm.max_position_embeddings}",
            )
        with self.lock, torch.no_grad():
            pixels = preprocess_image(image, cfg.vision)[None].to(model.device)
            masks = None
            if sample.region_indices:
                # The i-th <mask> takes the mask it names (a region may be mentioned twice).
                stacked = np.stack(
                    [Region.from_dict(regions[i]).mask() for i in sample.region_indices]
                )
                masks = [torch.from_numpy(stacked).to(model.device)]
            out = model.generate(
                [ids], pixels, masks, max_new_tokens=max_new_tokens, eos_token_id=self.engine.eos
            )[0]
        return self.engine.decode_text(out)

    # ---- service -----------------------------------------------------------------------------

    def ready(self) -> str:
        return "ok"

    def stats(self) -> dict[str, Any]:
        """Batch sizes run so far, and the engine's time split."""
        from dataclasses import asdict

        return {"batches": list(self.batches), "engine": asdict(self.engine.stats)}


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

    async def describe(self, image, regions, tasks, question, max_new_tokens):
        return await self._call(
            self.captioner.describe.remote(image, regions, tasks, question, max_new_tokens)
        )

    async def chat(self, image, regions, turns, max_new_tokens) -> str:
        return await self._call(self.captioner.chat.remote(image, regions, turns, max_new_tokens))

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
