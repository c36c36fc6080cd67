"""The training loop that runs on every Ray Train worker: DeepSpeed, checkpoints, metrics.

Knows the stage config, the Ray Train context and DeepSpeed; the model itself knows none of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from osprey.constants import IMAGE_TOKEN_INDEX
from osprey.data.pipeline import epoch_dataset_name
from osprey.train.checkpoints import STATE_FILE
from osprey.train.config import StageConfig

log = logging.getLogger("osprey.train")
DS_TAG = "ds"


@dataclass
class TrainState:
    """Where a stage is; saved with every checkpoint so a restart resumes exactly here."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches done by this worker, all epochs
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    samples: int = 0  # samples seen across all workers


def init_model(stage: StageConfig, tracking_uri: str | None = None):
    """The stage's starting model: `init` (the previous stage's export, or any model name,
    fetched once per node), or a preset plus base weights (local paths or names too)."""
    import osprey
    from osprey.io.models import resolve_model_dir
    from osprey.model.config import get_config

    if stage.init:
        return osprey.load_model(resolve_model_dir(stage.init, tracking_uri=tracking_uri))
    config = get_config(stage.preset)
    config.vision.weights = stage.vision_weights
    config.llm.weights = stage.llm_weights
    config.projector_weights = stage.projector_weights
    return osprey.build_model(config, seed=stage.seed)


def build_engine(
    stage: StageConfig,
    world: int,
    total_steps: int,
    on_gpu: bool,
    tracking_uri: str | None = None,
):
    """(DeepSpeed engine, LR scheduler, trainable parameters) for the stage's starting model,
    with its adapters (LoRA stages) and only what the stage trains left trainable."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    from osprey.train.deepspeed_config import deepspeed_config
    from osprey.train.freeze import apply_trainable

    model = init_model(stage, tracking_uri)
    if stage.lora is not None:
        from osprey.model.adapter import add_lora

        add_lora(model, stage.lora)
    apply_trainable(model, stage.trains)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    warmup = math.ceil(total_steps * stage.warmup_ratio)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(stage, world, on_gpu),
        dist_init_required=False,
    )
    return engine, scheduler, params


def tools_first(path: str, bin_dir: str) -> str:
    """PATH with `bin_dir` first (and not again later)."""
    rest = [p for p in path.split(os.pathsep) if p and p != bin_dir]
    return os.pathsep.join([bin_dir, *rest])


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    # DeepSpeed JIT-builds its CPU communication op with the first `ninja` on PATH. The venv's
    # ninja (installed with deepspeed) and a system one do not read each other's build log, so
    # workers started from different shells rebuilt it each time they alternated (38-63 s on
    # 2 cores): always use the one beside this interpreter.
    os.environ["PATH"] = tools_first(
        os.environ.get("PATH", ""), os.path.dirname(os.path.abspath(sys.executable))
    )
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from osprey.tracking import MetricLogger
    from osprey.train.checkpoints import checkpoint_dir_name, local_files, write_marker
    from osprey.train.deepspeed_config import use_bf16
    from osprey.train.log_config import configure_logging

    configure_logging()
    stage = StageConfig.from_dict(cfg["stage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    total_steps: int = cfg["total_steps"]
    on_gpu = torch.cuda.is_available()
    torch.manual_seed(stage.seed)

    setup_started = time.perf_counter()
    engine, scheduler, params = build_engine(
        stage, world, total_steps, on_gpu, cfg.get("model_tracking_uri")
    )
    model = engine.module
    device = engine.device
    if rank == 0:
        log.info(
            "%s: model and DeepSpeed engine ready in %.1f s",
            stage.name,
            time.perf_counter() - setup_started,
        )
    dtype = torch.bfloat16 if use_bf16(stage, on_gpu) else torch.float32

    state = TrainState()
    resume = _resume_point(rank, stage.name)
    if resume is not None:
        storage = ctx.get_storage()
        checkpoint = Checkpoint(path=resume.path, filesystem=storage.storage_filesystem)
        with checkpoint.as_directory() as directory:
            # Frozen weights are not in checkpoints: they come from `init` as on the first start.
            engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False)
            state = TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))
        if rank == 0:
            log.info(
                "resumed %s at step %d (epoch %d) from %s",
                stage.name, state.step, state.epoch, resume.name,
            )  # fmt: skip

    metrics_out = MetricLogger(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else None
    accumulation = stage.accumulation_steps(world)
    num_image_tokens = model.config.vision.num_image_tokens
    tally = SourceTally(cfg.get("sources", []), cfg.get("micro_per_epoch", 0))
    window = _Window()
    losses: list[float] = []

    # Metrics reach MLflow just before the checkpoint covering their step is marked complete:
    # after a restart the steps past the checkpoint are trained again and logged once, with the
    # resumed values. A rank 0 lost between the two leaves steps logged past the checkpoint:
    # those are not logged again.
    unlogged: list[tuple[int, dict[str, float]]] = []
    logged_up_to = metrics_out.last_step("loss") if metrics_out else 0

    def save(metrics: dict[str, float]) -> None:
        storage = ctx.get_storage()
        name = _broadcast(checkpoint_dir_name(state.step) if rank == 0 else None)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(asdict(state)))
            dist.barrier()
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
            files = [None] * world
            # Each rank's report returns after its own upload: once all have, it is complete.
            dist.all_gather_object(files, local_files(tmp))
        if rank == 0:
            if metrics_out:
                metrics_out.log_steps(unlogged)
            unlogged.clear()
            path = storage.build_checkpoint_path_from_name(name)
            every = {k: v for rank_files in files for k, v in rank_files.items()}
            write_marker(storage.storage_filesystem, path, state.step, world, every)

    while state.step < total_steps and state.epoch < stage.epochs:
        # One dataset per epoch: its order and draws are seeded by (seed, epoch).
        shard = ray.train.get_dataset_shard(epoch_dataset_name(state.epoch))
        batches = epoch_batches(
            shard, stage, state.epoch, state.batches_in_epoch, model.config.llm.pad_token_id
        )
        while state.step < total_steps:
            waited = time.perf_counter()
            consumed, batch = next(batches, (None, None))
            if batch is None:
                break
            window.wait += time.perf_counter() - waited
            started = time.perf_counter()
            loss = _micro_step(engine, batch, device, dtype, params)
            state.micro += 1
            state.batches_in_epoch = consumed
            losses.append(loss)
            window.add(batch, num_image_tokens)
            window.compute += time.perf_counter() - started
            finished = tally.add(batch.sources, consumed)
            if finished is not None:
                counts = _all_sum_vector(tally.pop(), device)
                if metrics_out:
                    metrics_out.log(tally.metrics(counts), state.epoch * tally.parts + finished)
            if state.micro % accumulation:
                continue
            state.step += 1
            state.samples += _all_sum(window.samples_since_step, device)
            window.samples_since_step = 0
            metrics = {
                "loss": _all_mean(sum(losses) / len(losses), device),
                "lr": scheduler.get_last_lr()[0],
                "epoch": state.epoch,
                "peak_rss_mb": _peak_rss_mb(),
                **window.rates(device),
            }
            losses.clear()
            if metrics_out and state.step % stage.log_every == 0:
                if state.step > logged_up_to:
                    unlogged.append((state.step, metrics))
                log.info(
                    "%s step %d/%d loss %.4f lr %.2e tokens/s %.0f data-wait %.1f%%",
                    stage.name, state.step, total_steps, metrics["loss"], metrics["lr"],
                    metrics["tokens_per_s"], 100 * metrics["data_wait_fraction"],
                )  # fmt: skip
            window.reset()
            if state.step % stage.checkpoint_every == 0 or state.step == total_steps:
                save({**metrics, "step": state.step})
        if state.step >= total_steps:
            break
        state.epoch += 1
        state.batches_in_epoch = 0

    if state.step % stage.checkpoint_every and state.step != total_steps:
        save({"step": state.step, "epoch": state.epoch})
    if metrics_out:
        metrics_out.log_steps(unlogged)
    _export(engine, stage, cfg["export_dir"], rank)
    dist.barrier()


def epoch_batches(
    shard: Any, stage: StageConfig, epoch: int, skip: int, pad_token_id: int
) -> Iterator[tuple[int, Any]]:
    """(number in the epoch, batch) for this worker's micro-batches of `epoch` after the first
    `skip`, which it trained on before a restart.

    Skipping is exact because the stream is the same on every run: the dataset is split with
    `preserve_order` (runner.ingest_options), rows are preprocessed deterministically, and the
    local shuffle is seeded by the stage's seed and the epoch.
    """
    from osprey.data.pipeline import train_batches

    batches = train_batches(
        shard,
        stage.micro_batch_size,
        pad_token_id,
        shuffle_buffer=stage.shuffle_buffer or None,
        # One seed per (stage seed, epoch); the multiplier keeps seed s, epoch e+1 apart from
        # seed s+1, epoch e.
        seed=stage.seed * 1_000_003 + epoch if stage.shuffle_buffer else None,
        skip=skip,
    )
    yield from enumerate(batches, start=skip + 1)


def _micro_step(engine, batch, device, dtype, params) -> float:
    if len(batch) == 0:
        # Every rank must take part in each collective: an all-skipped batch contributes zeros.
        loss = sum((p * 0.0).sum() for p in params)
        engine.backward(loss)
        engine.step()
        return 0.0
    batch = batch.to(device)
    out = engine(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        images=batch.images.to(dtype),
        masks=batch.masks,
        labels=batch.labels,
    )
    engine.backward(out.loss)
    engine.step()
    return float(out.loss.detach())


def _export(engine, stage: StageConfig, export_dir: str, rank: int) -> None:
    """A consolidated HF-format directory (safetensors, config, tokenizer) for the next stage;
    with LoRA, the adapter folder instead (adapters plus the parts trained fully)."""
    import deepspeed

    from osprey.model.checkpoint import save_checkpoint
    from osprey.prompts import load_tokenizer

    model = engine.module
    gather = (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        if stage.zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0 and stage.lora is not None:
            from osprey.model.adapter import save_adapter

            save_adapter(model, export_dir, stage.lora, stage.trains, base_model=stage.init)
            log.info("exported %s's adapter to %s", stage.name, export_dir)
        elif rank == 0:
            tokenizer = load_tokenizer(stage.tokenizer) if stage.tokenizer else None
            save_checkpoint(model, export_dir, tokenizer=tokenizer)
            log.info("exported %s to %s", stage.name, export_dir)


class SourceTally:
    """Rows trained on per source in each tenth of an epoch, to show the mix in MLflow.

    Every worker reads the same number of micro-batches per epoch, so all reach the end of a
    tenth at the same batch and sum their counts there. A tenth that a restart cuts in two is
    logged with the rows read after the restart only.
    """

    parts = 10

    def __init__(self, sources: list[str], micro_per_epoch: int) -> None:
        self.sources = list(sources)
        self.micro_per_epoch = micro_per_epoch
        self.counts = [0] * len(self.sources)
        self._index = {name: i for i, name in enumerate(self.sources)}

    def part(self, number: int) -> int:
        """The tenth (0-9) that micro-batch `number` (1-based in its epoch) belongs to."""
        return min(self.parts - 1, (number - 1) * self.parts // self.micro_per_epoch)

    def add(self, sources: list[str], number: int) -> int | None:
        """Count a micro-batch's rows; the tenth it completes, if it is that tenth's last."""
        if not self.sources or self.micro_per_epoch < 1:
            return None
        for name in sources:
            if name in self._index:
                self.counts[self._index[name]] += 1
        last = number >= self.micro_per_epoch or self.part(number + 1) != self.part(number)
        return self.part(number) if last else None

    def pop(self) -> list[int]:
        counts, self.counts = self.counts, [0] * len(self.sources)
        return counts

    def metrics(self, counts: list[int]) -> dict[str, float]:
        return {f"source_rows/{name}": n for name, n in zip(self.sources, counts, strict=True)}


class _Window:
    """Throughput and data-wait bookkeeping between two logged steps."""

    def __init__(self) -> None:
        self.samples_since_step = 0
        self.reset()

    def reset(self) -> None:
        self.wait = self.compute = 0.0
        self.samples = self.tokens = 0

    def add(self, batch, num_image_tokens: int) -> None:
        n = len(batch)
        self.samples += n
        self.samples_since_step += n
        images = int((batch.input_ids == IMAGE_TOKEN_INDEX).sum())
        self.tokens += int(batch.attention_mask.sum()) + images * (num_image_tokens - 1)

    def rates(self, device) -> dict[str, float]:
        """Every rank's tokens and samples over the slowest rank's time: what the group did."""
        import torch.distributed as dist

        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        times = torch.tensor([self.wait + self.compute], dtype=torch.float64, device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        return {
            **group_rates(float(counts[0]), float(counts[1]), float(times[0])),
            # This rank's share of its own time spent waiting for data.
            "data_wait_fraction": self.wait / max(self.wait + self.compute, 1e-9),
        }


def group_rates(tokens: float, samples: float, elapsed: float) -> dict[str, float]:
    """Throughput of the whole group: every rank's tokens and samples over the slowest rank's
    time (the group steps together, so it waits for that one)."""
    elapsed = max(elapsed, 1e-9)
    return {"tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed}


def _resume_point(rank: int, stage_name: str):
    """Rank 0 picks the newest complete checkpoint in the run's storage; every rank loads it."""
    import ray.train

    from osprey.train.checkpoints import resume_point

    chosen = None
    if rank == 0:
        storage = ray.train.get_context().get_storage()
        offered = ray.train.get_checkpoint()
        chosen, notes = resume_point(
            storage.storage_filesystem,
            storage.experiment_fs_path,
            offered.path if offered else None,
        )
        for note in notes:
            log.warning("%s: %s", stage_name, note)
    return _broadcast(chosen)


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _all_mean(value: float, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _all_sum_vector(values: list[int], device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _all_sum(value: int, device) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
