"""Osprey platform: model, prompts, data, training and inference for the Osprey region-level MLLM."""

from osprey.model import build_model, get_config, load_model

__all__ = ["build_model", "get_config", "load_model"]
__version__ = "0.1.0"
