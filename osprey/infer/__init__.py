"""Offline inference: the region-captioning engine, segment-everything, and the batch job."""

from osprey.infer.engine import (
    CATEGORY,
    DETAILED,
    SHORT,
    STANDARD_TASKS,
    EngineConfig,
    EngineStats,
    RegionCaptioner,
    Task,
    question_task,
)
from osprey.infer.regions import Region, RleMasks
from osprey.infer.segment import (
    ClassicalConfig,
    ClassicalSegmenter,
    SamConfig,
    SamSegmenter,
    SegmenterConfig,
)

__all__ = [
    "CATEGORY",
    "DETAILED",
    "SHORT",
    "STANDARD_TASKS",
    "ClassicalConfig",
    "ClassicalSegmenter",
    "EngineConfig",
    "EngineStats",
    "Region",
    "RegionCaptioner",
    "RleMasks",
    "SamConfig",
    "SamSegmenter",
    "SegmenterConfig",
    "Task",
    "question_task",
]
