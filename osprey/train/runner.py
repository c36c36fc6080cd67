"""Driver side of a stage: data, MLflow runs, the Ray TorchTrainer, export and registration."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osprey.cluster import init_ray
from osprey.io.storage import Location, S3Options, resolve
from osprey.model.checkpoint import read_config
from osprey.tracking import Tracker, default_tracking_uri
from osprey.train.config import StageConfig
from osprey.train.log_config import configure_logging  # noqa: F401  (entry and quickstart use it)
from osprey.train.progress import MetricFollower

log = logging.getLogger("osprey.train")
# Files of a model directory that are not its tokenizer's.
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".index.json", ".pt", ".pth")


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
    # Print a line per log interval on this console, followed from MLflow (osprey.train.progress),
    # for a driver that keeps Ray's worker output off the console.
    progress: bool = False
    progress_writer: Any = print  # where those lines go (a quiet console's terminal writer)
    # Where Ray Train keeps the checkpoints: a path every node sees, or s3://bucket/prefix
    # (reached with `s3`). Default: <output_dir>/ray.
    storage: str | None = None
    s3: S3Options | None = None
    # The registry name of the exported models (default "<pipeline>-model"), each stage's
    # version under the stage's name as alias.
    model_name: str | None = None

    @property
    def storage_path(self) -> str:
        return self.storage or str(Path(self.output_dir, "ray").resolve())

    def storage_location(self) -> Location:
        return resolve(self.storage_path, self.s3)

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


def micro_batches_per_epoch(stage: StageConfig, rows: int, world: int) -> int:
    """Micro-batches each worker reads per epoch: its equal share of the rows (the split drops
    the remainder), the last batch possibly short."""
    return math.ceil((rows // world) / stage.micro_batch_size)


def planned_steps(stage: StageConfig, rows: int, world: int) -> int:
    """Optimizer steps of the stage: epochs over each worker's equal share of the rows."""
    micro_per_epoch = micro_batches_per_epoch(stage, rows, world)
    steps = (micro_per_epoch * stage.epochs) // stage.accumulation_steps(world)
    if stage.max_steps is not None:
        steps = min(steps, stage.max_steps)
    if steps < 1:
        raise ValueError(
            f"{stage.name}: {rows} rows give no full optimizer step at global batch "
            f"{stage.global_batch_size}; add data or lower global_batch_size"
        )
    return steps


def epochs_to_read(stage: StageConfig, rows: int, world: int, total_steps: int) -> int:
    """Epochs the loop enters before it reaches `total_steps` (a step may span two epochs):
    one dataset is built for each."""
    micro_per_epoch = micro_batches_per_epoch(stage, rows, world)
    accumulation = stage.accumulation_steps(world)
    for epochs in range(1, stage.epochs + 1):
        if (epochs * micro_per_epoch) // accumulation >= total_steps:
            return epochs
    return stage.epochs


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


@dataclass(kw_only=True)
class InitModel:
    """`init` as the driver pinned and fetched it."""

    written: str  # as the config or --set init= gave it
    pinned: str  # the name workers resolve (a hub commit, a registry version)
    revision: str | None
    local: str  # this node's copy

    def tags(self) -> dict[str, str]:
        tags = {"osprey.init": self.written, "osprey.init_pinned": self.pinned}
        if self.revision:
            tags["osprey.init_revision"] = self.revision
        return tags


def resolve_init(stage: StageConfig, tracking_uri: str | None) -> InitModel | None:
    """Pin `init` (any model name: osprey.io.models) and fetch it on this node, where the driver
    reads its config and tokenizer; `stage.init` becomes the pinned name, which every worker
    resolves to the same model (fetched once per node)."""
    if not stage.init:
        return None
    from osprey.io.models import pin_model, resolve_model_dir

    written = stage.init
    pinned, revision = pin_model(written, tracking_uri=tracking_uri)
    local = resolve_model_dir(pinned, tracking_uri=tracking_uri)
    stage.init = pinned
    return InitModel(written=written, pinned=pinned, revision=revision, local=local)


def resolve_tokenizer(stage: StageConfig, init: InitModel | None = None, copy_to: str = "") -> str:
    """`tokenizer`, else init's. A fetched init's tokenizer files are copied to `copy_to` (under
    the run's output, which every node sees): the data pipeline's actors may run elsewhere."""
    if stage.tokenizer:
        return stage.tokenizer
    if init is None and stage.init and Path(stage.init, "tokenizer_config.json").exists():
        return stage.init  # a local init, not resolved by the caller
    if init is not None and Path(init.local, "tokenizer_config.json").exists():
        if init.local == init.pinned or not copy_to:
            return init.local
        import shutil

        Path(copy_to).mkdir(parents=True, exist_ok=True)
        for file in Path(init.local).iterdir():
            if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES):
                shutil.copyfile(file, Path(copy_to, file.name))
        return copy_to
    raise ValueError(f"{stage.name}: set `tokenizer` (a tokenizer directory) or an `init` model")


def run_stage(stage: StageConfig, options: RunOptions) -> StageResult:
    """Train one stage to completion (resuming if it was started before) and export it."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from osprey.data.examples import ExampleConfig
    from osprey.data.pipeline import PipelineConfig, epoch_datasets, plan_stage
    from osprey.model.config import get_config
    from osprey.train.loop import train_loop_per_worker

    if not stage.data:
        raise ValueError(f"{stage.name}: `data` lists no shard folders")
    if stage.lora is not None and stage.lora.quantize_4bit and not options.use_gpu:
        raise ValueError(
            f"{stage.name}: lora.quantize_4bit (QLoRA) needs CUDA GPUs (bitsandbytes' 4-bit "
            "layers do not run on the CPU): train with --gpu, or use plain LoRA"
        )
    tracker = options.tracker()
    model_tracking = os.environ.get("MLFLOW_TRACKING_URI") or tracker.tracking_uri
    init = resolve_init(stage, model_tracking)
    stage.tokenizer = resolve_tokenizer(
        stage, init, copy_to=str(Path(options.output_dir, stage.name, "init-tokenizer").resolve())
    )
    model_config = read_config(init.local) if init else get_config(stage.preset)
    examples = ExampleConfig(
        vision=model_config.vision,
        max_length=stage.max_length,
        template=stage.template,
        seed=stage.seed,
        **({"region_caps": stage.region_caps} if stage.region_caps else {}),
    )
    pipeline = PipelineConfig(mappers=options.data_mappers)
    plan = plan_stage(list(stage.data), stage.tasks, unit_rows=pipeline.unit_rows)
    rows = plan.rows
    total_steps = planned_steps(stage, rows, options.num_workers)

    parent = tracker.pipeline_run(options.pipeline)
    run_id, resumed = tracker.stage_run(options.pipeline, stage.name, parent)
    for key, value in (init.tags() if init else {}).items():
        tracker.client.set_tag(run_id, key, value)
    tracker.log_config(
        run_id,
        {"stage": stage.to_dict(), "rows": rows, "total_steps": total_steps,
         "num_workers": options.num_workers, "model": model_config.to_dict()},
    )  # fmt: skip
    log.info(
        "%s: %d rows, %d steps on %d workers (MLflow run %s%s)",
        stage.name, rows, total_steps, options.num_workers, run_id, ", resumed" if resumed else "",
    )  # fmt: skip

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
    epochs = epochs_to_read(stage, rows, options.num_workers, total_steps)
    datasets = epoch_datasets(plan, stage.tokenizer, examples, epochs, pipeline)
    adapter = stage.lora is not None
    export_dir = options.adapter_dir(stage.name) if adapter else options.export_dir(stage.name)
    storage = options.storage_location()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "stage": stage.to_dict(),
            "total_steps": total_steps,
            "tracking_uri": tracker.tracking_uri,
            "model_tracking_uri": model_tracking,
            "run_id": run_id,
            "export_dir": export_dir,
            "sources": list(plan.source_names),
            "micro_per_epoch": micro_batches_per_epoch(stage, rows, options.num_workers),
        },
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
            placement_strategy=options.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"{options.pipeline}-{stage.name}",
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest_options()),
    )
    follow = (
        MetricFollower(
            tracker,
            run_id,
            stage=stage.name,
            total_steps=total_steps,
            write=options.progress_writer,
        )  # fmt: skip
        if options.progress
        else contextlib.nullcontext()
    )
    try:
        with follow:
            result = trainer.fit()
    except Exception:
        tracker.finish(run_id, "FAILED")
        raise
    checkpoint = None
    if result.checkpoint:
        checkpoint = Location(storage.fs, result.checkpoint.path, storage.scheme).uri
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
