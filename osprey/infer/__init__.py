"""Offline inference: the region-captioning engine, segment-everything, and the batch job.

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
}
__all__ = [
    "CATEGORY",
    "CaptionJobConfig",
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
    "question_task",
    "run_caption_job",
]

if TYPE_CHECKING:
    from osprey.infer.config import EngineConfig, Task, question_task
    from osprey.infer.engine import (
        CATEGORY,
        DETAILED,
        SHORT,
        STANDARD_TASKS,
        EngineStats,
        RegionCaptioner,
    )
    from osprey.infer.job import CaptionJobConfig, CaptionSummary, ResourceConfig, run_caption_job
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
