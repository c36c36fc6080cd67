"""Inference: the engine, segment-everything, and the batch captioning job.

The engine, `RegionCaptioner` (osprey.infer.engine), is the one inference API: nothing outside
this package calls the model's `generate`. Its public calls:

    engine = RegionCaptioner.from_pretrained(model_dir, EngineConfig(...))
    engine.caption(images, masks, tasks)      # per image, per region: {task: answer}; the
                                              # standard CATEGORY / SHORT / DETAILED tasks or
                                              # question_task("... <region> ..."); shared-prefix
                                              # batched decode (one vision and prefix pass per image)
    engine.generate_ids(images, masks, tasks) # the same as token ids
    engine.answer(images, masks, question)    # per image, per region: a free question's answer
    engine.ask(images, questions, params)     # image-level questions ("<image>\n" + question)
    engine.chat([ChatRequest(image, turns, masks, SamplingParams(...)), ...]) -> [Completion]
                                              # conversations with history, batched across
                                              # requests, each with its own sampling
    engine.stream(requests, cancelled=...)    # chat as it decodes: per step one StreamEvent
                                              # (text delta; the Completion on the last) per request
    engine.check(request)                     # ValueError for a request that cannot be prompted
    engine.stats                              # EngineStats: where the time went

In one's own Ray Data pipeline (osprey.infer.processor), the caption job's stages as a step:

    processor = build_caption_processor(CaptionProcessorConfig(model=..., concurrency=2))
    ds = processor(ds)                        # rows with `image` or `path` (optional `masks`,
                                              # `question`) get `masks`, answers and `error`

`SamplingParams` (temperature, top_p, top_k, seed, max_new_tokens, stop) is one request's
decoding, applied with transformers' own logits warpers; `DecodingConfig(mode="greedy" |
"reference", seed)` names the two decoding modes (`reference`: the released code's sampled
decoding, temperature 0.2, top_p/top_k from the checkpoint's generation_config.json, 1024 new
tokens) and gives their `SamplingParams`.

Names resolve lazily, so that the job's read and write tasks (osprey.infer.stages) run in Ray
workers that never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "CATEGORY": "engine",
    "DETAILED": "engine",
    "SHORT": "engine",
    "STANDARD_TASKS": "engine",
    "EngineConfig": "config",
    "SamplingParams": "config",
    "DecodingConfig": "config",
    "ChatRequest": "chat",
    "Completion": "chat",
    "StreamEvent": "chat",
    "EngineStats": "engine",
    "RegionCaptioner": "engine",
    "Task": "config",
    "question_task": "config",
    "Region": "regions",
    "RleMasks": "regions",
    "ClassicalConfig": "segment",
    "ClassicalSegmenter": "segment",
    "SamConfig": "segment",
    "SamSegmenter": "segment",
    "SegmenterConfig": "segment",
    "CaptionJobConfig": "job",
    "CaptionSummary": "job",
    "ResourceConfig": "job",
    "run_caption_job": "job",
    "CaptionProcessor": "processor",
    "CaptionProcessorConfig": "processor",
    "build_caption_processor": "processor",
}
__all__ = [
    "CATEGORY",
    "CaptionJobConfig",
    "CaptionProcessor",
    "CaptionProcessorConfig",
    "ChatRequest",
    "Completion",
    "DecodingConfig",
    "SamplingParams",
    "StreamEvent",
    "CaptionSummary",
    "ClassicalConfig",
    "ClassicalSegmenter",
    "DETAILED",
    "EngineConfig",
    "EngineStats",
    "Region",
    "RegionCaptioner",
    "ResourceConfig",
    "RleMasks",
    "SHORT",
    "STANDARD_TASKS",
    "SamConfig",
    "SamSegmenter",
    "SegmenterConfig",
    "Task",
    "build_caption_processor",
    "question_task",
    "run_caption_job",
]

if TYPE_CHECKING:
    from osprey.infer.chat import ChatRequest, Completion, StreamEvent
    from osprey.infer.config import (
        DecodingConfig,
        EngineConfig,
        SamplingParams,
        Task,
        question_task,
    )
    from osprey.infer.engine import (
        CATEGORY,
        DETAILED,
        SHORT,
        STANDARD_TASKS,
        EngineStats,
        RegionCaptioner,
    )
    from osprey.infer.job import CaptionJobConfig, CaptionSummary, ResourceConfig, run_caption_job
    from osprey.infer.processor import (
        CaptionProcessor,
        CaptionProcessorConfig,
        build_caption_processor,
    )
    from osprey.infer.regions import Region, RleMasks
    from osprey.infer.segment import (
        ClassicalConfig,
        ClassicalSegmenter,
        SamConfig,
        SamSegmenter,
        SegmenterConfig,
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"osprey.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'osprey.infer' has no attribute {name!r}")
