"""MLflow tracking for training, evaluation and serving: one parent run per pipeline, one child
run per stage, found again on resume, and evaluation runs beside the run that trained the model.

Runs are looked up by tags rather than created blindly, so resubmitting a job (or Ray restarting
its workers) continues the same MLflow run instead of starting a duplicate.

An evaluation's run is `--model-run` when given; else, for a model exported by the training
stages (`<output>/<stage>/model`, tracked in `<output>/mlflow.db`), the newest run of that stage.
The evaluation gets its own run, a child of the model's run tagged with the benchmark (found again
when the same model is evaluated again, so reruns add to it rather than multiply), holding the
metrics, the configuration and metrics.json; the model's run also gets each metric as
`<benchmark>/<metric>` (e.g. `lvis/semantic_iou`), so a table of runs shows the scores beside the
losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINE_TAG = "osprey.pipeline"
STAGE_TAG = "osprey.stage"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT = "osprey"


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


@dataclass
class Tracker:
    """Driver-side handle on the tracking server (any MLflow tracking URI)."""

    tracking_uri: str
    experiment: str = EXPERIMENT
    artifact_location: str | None = None

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
        else:
            self.experiment_id = found.experiment_id

    def _find(self, tags: dict[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def pipeline_run(self, pipeline: str, running: bool = False) -> str:
        """The pipeline's parent run; `running`: its driver starts (again), so mark it RUNNING."""
        tags = {PIPELINE_TAG: pipeline, STAGE_TAG: "pipeline"}
        found = self._find(tags)
        if found:
            if running:
                self.client.update_run(found, status="RUNNING")
            return found
        return self.client.create_run(self.experiment_id, tags=tags, run_name=pipeline).info.run_id

    @contextlib.contextmanager
    def ending(self, run_id: str) -> Iterator[None]:
        """End the run FINISHED when the block completes, FAILED when it raises, KILLED when it
        is interrupted."""
        try:
            yield
        except KeyboardInterrupt:
            self.finish(run_id, "KILLED")
            raise
        except BaseException:
            self.finish(run_id, "FAILED")
            raise
        self.finish(run_id)

    def stage_run(self, pipeline: str, stage: str, parent_id: str) -> tuple[str, bool]:
        """(run id, resumed?) of the stage's run under the pipeline run."""
        tags = {PIPELINE_TAG: pipeline, STAGE_TAG: stage}
        found = self._find(tags)
        if found:
            self.client.update_run(found, status="RUNNING")
            return found, True
        run = self.client.create_run(
            self.experiment_id, tags={**tags, PARENT_TAG: parent_id}, run_name=stage
        )
        return run.info.run_id, False

    def log_config(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, _short(v)) for k, v in _flatten(config).items()]
        existing = self.client.get_run(run_id).data.params
        params = [p for p in params if p.key not in existing]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i : i + 100])
        self.client.log_text(run_id, json.dumps(config, indent=2, default=str), "config.json")

    def log_checkpoint(self, run_id: str, uri: str, step: int) -> None:
        self.client.set_tag(run_id, "osprey.checkpoint", uri)
        self.client.set_tag(run_id, "osprey.checkpoint_step", str(step))

    def register_model(self, run_id: str, model_dir: str, name: str, alias: str) -> str:
        """Log the exported model directory and register it, with `alias` on the new version."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(run_id, model_dir, "model")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered: add a version
        version = self.client.create_model_version(name, source=source, run_id=run_id)
        self.client.set_registered_model_alias(name, alias, version.version)
        return version.version

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


class MetricLogger:
    """Worker-side (rank 0) metric logging into an existing run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` in the run (0 if none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """Several steps' metrics in as few requests as MLflow allows (1000 values each)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for step, ms in steps for k, v in ms.items()]
        for i in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[i : i + 1000])


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 500 else text[:497] + "..."


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
    # A local directory by its absolute path; a hub id or registry name as pinned.
    model = str(Path(model_dir).resolve()) if os.path.exists(model_dir) else model_dir
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
