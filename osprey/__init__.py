"""Osprey platform: model, prompts, data, training and inference for the Osprey region-level MLLM."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["build_model", "get_config", "load_model"]

if TYPE_CHECKING:
    from osprey.model import build_model, get_config, load_model


def __getattr__(name: str):
    # Lazy, so `import osprey.data...` in Ray workers and CLIs does not pay for torch+transformers.
    if name in __all__ or name == "model":
        import osprey.model

        return osprey.model if name == "model" else getattr(osprey.model, name)
    raise AttributeError(f"module 'osprey' has no attribute {name!r}")
