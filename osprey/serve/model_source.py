"""Where the served model comes from: any name osprey.io.models resolves (a directory, a
Hugging Face id `ORG/NAME[@REV]`, an `s3://` prefix, an MLflow `models:/NAME@ALIAS` or
`models:/NAME/VERSION`), or `tiny` (random weights, for smoke tests and the web page's demo
without a trained model)."""

from __future__ import annotations

import tempfile

TINY = "tiny"


def resolve_model(model: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> str:
    """A local model directory (what `load_model` and `load_tokenizer` read) for `model`."""
    from osprey.io.models import resolve_model_dir
    from osprey.model.checkpoint import read_config

    if model == TINY:
        from osprey.infer.tiny import write_tiny_model

        return str(write_tiny_model(tempfile.mkdtemp(prefix="osprey-tiny-")))
    model_dir = resolve_model_dir(model, tracking_uri=tracking_uri, cache_dir=cache_dir)
    read_config(model_dir)  # fails naming the folder when it is not a model directory
    return model_dir


def resolve_adapter(
    adapter: str, tracking_uri: str | None = None, cache_dir: str | None = None
) -> str:
    """A local LoRA adapter folder (osprey.model.adapter's) for a folder or any model name."""
    from osprey.io.models import resolve_adapter_dir
    from osprey.model.adapter import read_adapter_meta

    path = resolve_adapter_dir(adapter, tracking_uri=tracking_uri, cache_dir=cache_dir)
    read_adapter_meta(path)  # fails naming the folder when it is not an adapter folder
    return path
