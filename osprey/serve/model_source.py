"""Where the served model comes from: a local model directory, an MLflow registered model
(`models:/name@alias` or `models:/name/version`, as training registers them per stage), or
`tiny` (random weights, for smoke tests and the web page's demo without a trained model)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TINY = "tiny"


def resolve_model(model: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> str:
    """A local model directory (what `load_model` and `load_tokenizer` read) for `model`."""
    from osprey.model.checkpoint import read_config

    if model == TINY:
        from osprey.infer.tiny import write_tiny_model

        return str(write_tiny_model(tempfile.mkdtemp(prefix="osprey-tiny-")))
    if model.startswith("models:/"):
        import mlflow

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                f"model {model!r}: give tracking_uri (or MLFLOW_TRACKING_URI) to resolve it"
            )
        version = _model_version(model, uri)
        out = cache_dir or tempfile.mkdtemp(prefix="osprey-model-")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=out, tracking_uri=uri
        )
        model_dir = _find_dir(Path(local), "config.json")
    else:
        model_dir = Path(model)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model {model!r}: no such directory")
    read_config(model_dir)  # fails naming the folder when it is not a model directory
    return str(model_dir)


def _model_version(model: str, uri: str):
    """The registry's ModelVersion for `models:/name@alias` or `models:/name/version`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    ref = model[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, number = ref.rpartition("/")
    if not name or not number.isdigit():
        raise ValueError(f"model {model!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, number)


def resolve_adapter(
    adapter: str, tracking_uri: str | None = None, cache_dir: str | None = None
) -> str:
    """A local LoRA adapter folder (osprey.model.adapter's) for a folder or `models:/...`."""
    from osprey.model.adapter import ADAPTER_CONFIG, read_adapter_meta

    if adapter.startswith("models:/"):
        import mlflow

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                f"adapter {adapter!r}: give tracking_uri (or MLFLOW_TRACKING_URI) to resolve it"
            )
        version = _model_version(adapter, uri)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source,
            dst_path=cache_dir or tempfile.mkdtemp(prefix="osprey-adapter-"),
            tracking_uri=uri,
        )
        path = _find_dir(Path(local), ADAPTER_CONFIG)
    else:
        path = Path(adapter)
        if not path.is_dir():
            raise FileNotFoundError(f"adapter {adapter!r}: no such directory")
    read_adapter_meta(path)  # fails naming the folder when it is not an adapter folder
    return str(path)


def _find_dir(root: Path, marker: str) -> Path:
    """The folder holding `marker`: the artifact root, or its one child that does."""
    if (root / marker).exists():
        return root
    found = [p.parent for p in root.rglob(marker)]
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected one folder with {marker}, found {len(found)}")
    return found[0]
