"""The Osprey model: architecture, presets and weights. Knows nothing of Ray or DeepSpeed."""

from osprey.model.build import build_model, load_model
from osprey.model.config import (
    PRESETS,
    LLMConfig,
    MaskExtractorConfig,
    OspreyConfig,
    VisionConfig,
    get_config,
)
from osprey.model.modeling import OspreyForCausalLM

__all__ = [
    "PRESETS",
    "LLMConfig",
    "MaskExtractorConfig",
    "OspreyConfig",
    "OspreyForCausalLM",
    "VisionConfig",
    "build_model",
    "get_config",
    "load_model",
]
