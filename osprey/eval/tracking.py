"""Evaluation results in MLflow, next to the run that trained the model.

The model's run is `--model-run` when given; else, for a model exported by the training stages
(`<output>/<stage>/model`, tracked in `<output>/mlflow.db`), the newest run of that stage. The
evaluation gets its own run, a child of the model's run tagged with the benchmark (found again
when the same model is evaluated again, so reruns add to it rather than multiply), holding the
metrics, the configuration and metrics.json; the model's run also gets each metric as
`<benchmark>/<metric>` (e.g. `lvis/semantic_iou`, in percent; the quickstart's own
`shapes_accuracy` is a fraction), so a table of runs shows the scores beside the losses.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from osprey.train.tracking import (
    EXPERIMENT,
    PARENT_TAG,
    PIPELINE_TAG,
    STAGE_TAG,
    Tracker,
    default_tracking_uri,
)

BENCHMARK_TAG = "osprey.benchmark"
MODEL_TAG = "osprey.eval_model"


def find_tracking_uri(model_dir: str, fallback_dir: str | None) -> str:
    """MLFLOW_TRACKING_URI, else the training output's database above the model, else one in
    `fallback_dir`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" not in model_dir:
        model = Path(model_dir).resolve()
        for parent in list(model.parents)[:3]:
            if (parent / "mlflow.db").exists():
                return default_tracking_uri(parent)
    if fallback_dir is None or "://" in fallback_dir:
        raise ValueError("no MLflow database found beside the model: give --tracking-uri")
    Path(fallback_dir).mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(fallback_dir)


def find_model_run(tracker: Tracker, model_dir: str, model_run: str | None = None):
    """The MLflow run that produced `model_dir`, or None."""
    if model_run:
        return tracker.client.get_run(model_run)
    if "://" in model_dir:
        return None
    stage = Path(model_dir).resolve().parent.name
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def log_evaluation(
    tracking_uri: str,
    benchmark: str,
    model_dir: str,
    metrics: dict[str, float],
    config: dict[str, Any],
    *,
    model_run: str | None = None,
    experiment: str = EXPERIMENT,
) -> tuple[str, str | None]:
    """Log one evaluation; returns (evaluation run id, model run id or None)."""
    from mlflow.entities import Metric

    artifacts = None
    if tracking_uri.startswith("sqlite:///"):
        artifacts = (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    tracker = Tracker(tracking_uri, experiment=experiment, artifact_location=artifacts)
    parent = find_model_run(tracker, model_dir, model_run)
    model = model_dir if "://" in model_dir else str(Path(model_dir).resolve())
    tags = {BENCHMARK_TAG: benchmark, MODEL_TAG: model, STAGE_TAG: f"eval-{benchmark}"}
    if parent is not None:
        tags[PARENT_TAG] = parent.info.run_id
        tags[PIPELINE_TAG] = parent.data.tags.get(PIPELINE_TAG, "")
    run_id = _find_run(tracker, tags)
    if run_id is None:
        run_id = tracker.client.create_run(
            tracker.experiment_id, tags=tags, run_name=f"eval-{benchmark}"
        ).info.run_id
    else:
        tracker.client.update_run(run_id, status="RUNNING")
    now = int(time.time() * 1000)
    step = len(tracker.client.get_metric_history(run_id, next(iter(metrics)))) if metrics else 0
    tracker.client.log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
    )
    tracker.log_config(run_id, config)
    tracker.client.log_text(run_id, json.dumps(metrics, indent=2), "metrics.json")
    tracker.finish(run_id)
    if parent is not None:
        tracker.client.log_batch(
            parent.info.run_id,
            metrics=[Metric(f"{benchmark}/{k}", float(v), now, step) for k, v in metrics.items()],
        )
    return run_id, None if parent is None else parent.info.run_id


def _find_run(tracker: Tracker, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None
