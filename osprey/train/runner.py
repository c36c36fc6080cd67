"""Driver side of a stage: data, MLflow runs, the Ray TorchTrainer, export and registration."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osprey.cluster import init_ray
from osprey.tracking import Tracker, default_tracking_uri
from osprey.train.config import StageConfig

log = logging.getLogger("osprey.train")


@dataclass(kw_only=True)
class RunOptions:
    """Where a pipeline's runs go and how many workers train."""

    output_dir: str = "outputs/run"
    pipeline: str = "osprey"  # names the Ray run, the MLflow runs and the registered model
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    tracking_uri: str | None = None  # default: sqlite under output_dir
    data_mappers: int = 1
    # How Ray places the workers: PACK (fewest nodes), SPREAD, STRICT_PACK, STRICT_SPREAD (one
    # worker per node).
    placement_strategy: str = "PACK"
    # The registry name of the exported models (default "<pipeline>-model"), each stage's
    # version under the stage's name as alias.
    model_name: str | None = None

    @property
    def storage_path(self) -> str:
        return str(Path(self.output_dir, "ray").resolve())

    def export_dir(self, stage: str) -> str:
        return str(Path(self.output_dir, stage, "model").resolve())

    def adapter_dir(self, stage: str) -> str:
        return str(Path(self.output_dir, stage, "adapter").resolve())

    @property
    def registered_name(self) -> str:
        return self.model_name or f"{self.pipeline}-model"

    def tracker(self) -> Tracker:
        uri = self.tracking_uri or default_tracking_uri(self.output_dir)
        # A tracking server keeps artifacts in its own store; a local database keeps them beside.
        artifacts = None
        if not uri.startswith(("http://", "https://", "databricks")):
            artifacts = Path(self.output_dir, "mlartifacts").resolve().as_uri()
        return Tracker(uri, artifact_location=artifacts)


@dataclass
class StageResult:
    stage: str
    run_id: str
    model_dir: str
    checkpoint: str | None
    steps: int
    model_version: str
    adapter: bool = False  # model_dir is an adapter folder (LoRA) for the stage's init model


def planned_steps(stage: StageConfig, rows: int, world: int) -> int:
    """Optimizer steps of the stage: epochs over each worker's equal share of the rows."""
    per_worker = rows // world
    micro_per_epoch = math.ceil(per_worker / stage.micro_batch_size)
    steps = (micro_per_epoch * stage.epochs) // stage.accumulation_steps(world)
    if stage.max_steps is not None:
        steps = min(steps, stage.max_steps)
    if steps < 1:
        raise ValueError(
            f"{stage.name}: {rows} rows give no full optimizer step at global batch "
            f"{stage.global_batch_size}; add data or lower global_batch_size"
        )
    return steps


def stage_cpus(options: RunOptions, pipeline: Any) -> float:
    """Logical CPUs a stage holds at once: its workers', the data mappers' and one for reading.

    Ray Train keeps the data pipeline off the workers' CPUs, so with fewer the reader never runs.
    """
    mappers = options.data_mappers or 1
    return options.num_workers * options.cpus_per_worker + mappers * pipeline.cpus_per_mapper + 1


def ingest_options():
    """Ray Data options for the workers' split of the stream: Train's defaults, in order.

    With `preserve_order` every worker gets the same micro-batches in the same order on every
    run (the split ignores block locality), so a restarted worker that skips what it trained on
    skips exactly those samples (loop.epoch_batches).
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def resolve_tokenizer(stage: StageConfig) -> str:
    if stage.tokenizer:
        return stage.tokenizer
    if stage.init and Path(stage.init, "tokenizer_config.json").exists():
        return stage.init
    raise ValueError(f"{stage.name}: set `tokenizer` (a tokenizer directory) or an `init` model")


def run_stage(stage: StageConfig, options: RunOptions) -> StageResult:
    """Train one stage to completion (resuming if it was started before) and export it."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from osprey.data.examples import ExampleConfig
    from osprey.data.pipeline import PipelineConfig, build_dataset, count_rows
    from osprey.model.config import get_config
    from osprey.train.loop import train_loop_per_worker

    if not stage.data:
        raise ValueError(f"{stage.name}: `data` lists no shard folders")
    if stage.lora is not None and stage.lora.quantize_4bit and not options.use_gpu:
        raise ValueError(
            f"{stage.name}: lora.quantize_4bit (QLoRA) needs CUDA GPUs (bitsandbytes' 4-bit "
            "layers do not run on the CPU): train with --gpu, or use plain LoRA"
        )
    stage.tokenizer = resolve_tokenizer(stage)
    model_config = _model_config(stage, get_config)
    examples = ExampleConfig(
        vision=model_config.vision,
        max_length=stage.max_length,
        seed=stage.seed,
        **({"region_caps": stage.region_caps} if stage.region_caps else {}),
    )
    rows = count_rows(list(stage.data), stage.tasks)
    total_steps = planned_steps(stage, rows, options.num_workers)

    tracker = options.tracker()
    parent = tracker.pipeline_run(options.pipeline)
    run_id, resumed = tracker.stage_run(options.pipeline, stage.name, parent)
    tracker.log_config(
        run_id,
        {"stage": stage.to_dict(), "rows": rows, "total_steps": total_steps,
         "num_workers": options.num_workers, "model": model_config.to_dict()},
    )  # fmt: skip
    log.info(
        "%s: %d rows, %d steps on %d workers (MLflow run %s%s)",
        stage.name, rows, total_steps, options.num_workers, run_id, ", resumed" if resumed else "",
    )  # fmt: skip

    pipeline = PipelineConfig(mappers=options.data_mappers)
    needed = stage_cpus(options, pipeline)
    init_ray(num_cpus=needed)
    have = ray.cluster_resources().get("CPU", 0)
    if have < needed:
        log.warning(
            "%s: the cluster has %g CPUs, the stage holds %g at once (%d workers x %g, the rest "
            "for the data pipeline); the data pipeline waits for a free CPU, forever unless the "
            "cluster grows. Give Ray more (`ray start --num-cpus N` may exceed the cores) or use "
            "fewer --workers.",
            stage.name, have, needed, options.num_workers, options.cpus_per_worker,
        )  # fmt: skip
    dataset = build_dataset(
        list(stage.data), stage.tokenizer, examples, pipeline, tasks=stage.tasks
    )
    adapter = stage.lora is not None
    export_dir = options.adapter_dir(stage.name) if adapter else options.export_dir(stage.name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "stage": stage.to_dict(),
            "total_steps": total_steps,
            "tracking_uri": tracker.tracking_uri,
            "run_id": run_id,
            "export_dir": export_dir,
        },
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
            placement_strategy=options.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"{options.pipeline}-{stage.name}",
            storage_path=options.storage_path,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest_options()),
    )
    try:
        result = trainer.fit()
    except Exception:
        tracker.finish(run_id, "FAILED")
        raise
    checkpoint = result.checkpoint.path if result.checkpoint else None
    steps = int((result.metrics or {}).get("step", total_steps))
    if checkpoint:
        tracker.log_checkpoint(run_id, checkpoint, steps)
    name = options.registered_name
    version = tracker.register_model(run_id, export_dir, name, stage.name)
    if adapter:
        tracker.client.set_model_version_tag(name, version, "osprey.kind", "adapter")
        tracker.client.set_model_version_tag(name, version, "osprey.base_model", stage.init or "")
    tracker.finish(run_id)
    return StageResult(stage.name, run_id, export_dir, checkpoint, steps, version, adapter)


def _model_config(stage: StageConfig, get_config) -> Any:
    from osprey.model.checkpoint import read_config

    return read_config(stage.init) if stage.init else get_config(stage.preset)


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("OSPREY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
