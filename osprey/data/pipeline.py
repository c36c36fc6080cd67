"""The Ray Data pipeline into training: shards (local or S3) -> examples -> padded batches.

Reading, decoding and tokenising run as streaming Ray Data operators, so memory stays bounded
whatever the data set's size; each Ray Train worker iterates its own split of the stream
(`ray.train.get_dataset_shard`) and collates batches with `collate`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from osprey.constants import IGNORE_INDEX
from osprey.data.examples import ExampleBuilder, ExampleConfig
from osprey.data.masks import decode_region
from osprey.data.mix import (
    SourcePlan,
    block_items,
    cut_blocks,
    epoch_order,
    plan_source,
    read_blocks,
)
from osprey.data.shards import ROW_GROUP_ROWS, ShardSchemaError, validate_schema
from osprey.io.storage import Location, S3Options, resolve


def list_shards(path: str, s3: S3Options | None = None) -> tuple[Location, list[str]]:
    """All `.parquet` files under a folder (or the one file) on local disk or S3, checked."""
    where = resolve(path, s3)
    info = where.fs.get_file_info(where.path)
    if info.type.name == "NotFound":
        raise FileNotFoundError(f"{path}: no such shard file or folder")
    if info.type.name == "File":
        files = [where.path]
    else:
        files = [f"{where.path}/{name}" for name in where.list_files() if name.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{path}: no .parquet shards")
    for file in files:
        try:
            schema = pq.read_schema(file, filesystem=where.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardSchemaError(f"{file}: not a readable parquet shard ({exc})") from exc
        validate_schema(schema, file)
    return where, files


def _columns(build: ExampleBuilder, batch: pa.Table) -> dict[str, Any]:
    examples = [build(row) for row in batch.to_pylist()]
    out: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key == "pixel_values":
            out[key] = np.stack(values)
        elif key in ("input_ids", "labels", "mask_counts"):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[key] = column
        else:
            out[key] = np.asarray(values)
    return out


class ExampleMapper:
    """Ray Data actor: loads the tokenizer once, then maps batches of rows to examples."""

    def __init__(self, tokenizer_dir: str, config: ExampleConfig) -> None:
        from osprey.prompts import load_tokenizer

        self.build = ExampleBuilder(load_tokenizer(tokenizer_dir), config)

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        return _columns(self.build, batch)


def _fingerprint(directory: str) -> tuple:
    """Names, sizes and mtimes of a directory's files: a rewritten tokenizer is reloaded."""
    with os.scandir(directory) as entries:
        return tuple(
            sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
        )


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_dir: str, fingerprint: tuple) -> Any:
    from osprey.prompts import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def map_examples(batch: pa.Table, tokenizer_dir: str, config: ExampleConfig) -> dict[str, Any]:
    """Ray Data task: ExampleMapper's mapping, with the tokenizer cached in the worker process."""
    tokenizer = _cached_tokenizer(tokenizer_dir, _fingerprint(tokenizer_dir))
    return _columns(ExampleBuilder(tokenizer, config), batch)


@dataclass(kw_only=True)
class PipelineConfig:
    """How rows are ordered and how the preprocessing stage runs (apart from the training
    workers).

    Defaults measured with bench/ingest.py (2 cores, 128x128 shapes, batch 8). Rows are mapped by
    Ray tasks: Ray keeps their worker processes, with their imports and cached tokenizer, from
    one epoch to the next, whereas every epoch (every execution of the dataset) starts a new actor
    pool whose processes import torch and transformers again (the first batch of each epoch came
    after ~10 s instead of ~1 s). One block of about `block_rows` rows is read, shuffled and mapped
    by one task, and its output is held until the whole block is done; each block costs a task's
    overhead: against the DataLoader's samples/s, 16-row blocks ran at ~0.5x, 64-row ones ~1.1x,
    128-row ones ~1.2x (first batch after ~0.9 s), 256-row ones ~1.2x (first batch after ~1.9 s).
    """

    map_batch_size: int = 16
    # None: map with Ray tasks, as many at a time as free CPUs allow. N: a pool of N actors.
    mappers: int | None = None
    cpus_per_mapper: float = 1.0
    # Rows per block fed to the mappers (osprey.data.mix.cut_blocks).
    block_rows: int = 128
    # Rows per unit of the epoch's mix: consecutive rows of one row group that stay together
    # (osprey.data.mix); at most the shards' row groups (shards.ROW_GROUP_ROWS) to read each once.
    unit_rows: int = ROW_GROUP_ROWS
    # Mix every source as a global shuffle would, re-drawn per (seed, epoch). False: sources
    # one after another, rows in file order (to compare with an unshuffled loader).
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.mappers is not None and self.mappers < 1:
            raise ValueError(f"mappers must be None (Ray tasks) or >= 1, got {self.mappers}")
        if self.map_batch_size < 1:
            raise ValueError(f"map_batch_size must be >= 1, got {self.map_batch_size}")
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        if self.unit_rows < 1:
            raise ValueError(f"unit_rows must be >= 1, got {self.unit_rows}")


def epoch_dataset_name(epoch: int) -> str:
    """The Ray Train dataset name of one epoch's stream (`get_dataset_shard(name)`)."""
    return f"train_epoch{epoch}"


@dataclass(frozen=True)
class StagePlan:
    """A stage's shard folders planned once (osprey.data.mix); epochs are drawn from it."""

    paths: tuple[str, ...]
    sources: tuple[SourcePlan, ...]
    tasks: tuple[str, ...]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)

    @property
    def source_names(self) -> tuple[str, ...]:
        """Every `source` value of the rows, sorted: the per-source counts' names."""
        return tuple(sorted({n for s in self.sources for n in s.names}))


def plan_stage(
    paths: Sequence[str],
    tasks: Sequence[str] = (),
    s3: S3Options | None = None,
    unit_rows: int = ROW_GROUP_ROWS,
) -> StagePlan:
    """Every folder's shards listed, checked and cut into units (rows of `tasks` only)."""
    sources = []
    for index, path in enumerate(paths):
        where, files = list_shards(path, s3)
        sources.append(plan_source(index, where.fs, files, unit_rows, tasks))
    plan = StagePlan(tuple(paths), tuple(sources), tuple(tasks))
    if plan.rows == 0:
        raise ValueError(f"{list(paths)}: no rows" + (f" of tasks {list(tasks)}" if tasks else ""))
    return plan


def epoch_rows(plan: StagePlan, seed: int, epoch: int, pipeline: PipelineConfig | None = None):
    """A Ray Dataset of one epoch's shard rows, in the order osprey.data.mix plans for (seed,
    epoch): the stream that `build_dataset` maps to examples, row for row."""
    import ray

    pipeline = pipeline or PipelineConfig()
    order = epoch_order([s.units for s in plan.sources], seed, epoch, pipeline.shuffle)
    items = block_items(cut_blocks(order, pipeline.block_rows), epoch)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The order is planned: blocks must come out in it, whoever iterates (Ray Train's split
    # sets the same option, runner.ingest_options).
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        read_blocks,
        fn_kwargs={
            "filesystems": [s.fs for s in plan.sources],
            "tasks": plan.tasks,
            "seed": seed,
            "shuffle": pipeline.shuffle,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=pipeline.cpus_per_mapper,
    )


def build_dataset(
    paths: Sequence[str] | StagePlan,
    tokenizer_dir: str,
    example_config: ExampleConfig,
    pipeline: PipelineConfig | None = None,
    s3: S3Options | None = None,
    tasks: Sequence[str] = (),
    epoch: int = 0,
):
    """A streaming Ray Dataset of one epoch's examples: every shard folder in `paths` (or an
    already planned stage) mixed as osprey.data.mix orders them for (example_config.seed,
    epoch), keeping only rows of the given `tasks` (all when empty). Regions and question
    templates are drawn per (seed, sample, epoch)."""
    import ray

    pipeline = pipeline or PipelineConfig()
    plan = (
        paths
        if isinstance(paths, StagePlan)
        else plan_stage(paths, tasks, s3, unit_rows=pipeline.unit_rows)
    )
    ds = epoch_rows(plan, example_config.seed, epoch, pipeline)
    args = {
        "tokenizer_dir": tokenizer_dir,
        "config": dataclasses.replace(example_config, epoch=epoch),
    }
    if pipeline.mappers is None:
        return ds.map_batches(
            map_examples,
            fn_kwargs=args,
            batch_size=pipeline.map_batch_size,
            batch_format="pyarrow",
            num_cpus=pipeline.cpus_per_mapper,
        )
    return ds.map_batches(
        ExampleMapper,
        fn_constructor_kwargs=args,
        batch_size=pipeline.map_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pipeline.mappers),
        num_cpus=pipeline.cpus_per_mapper,
    )


def epoch_datasets(
    plan: StagePlan,
    tokenizer_dir: str,
    example_config: ExampleConfig,
    epochs: int,
    pipeline: PipelineConfig | None = None,
) -> dict[str, Any]:
    """One dataset per epoch of a planned stage, named by `epoch_dataset_name`, for Ray Train's
    `datasets=`: each epoch's order and draws are its own, and a restart that resumes in epoch e
    reads epoch e's stream from its start."""
    return {
        epoch_dataset_name(e): build_dataset(plan, tokenizer_dir, example_config, pipeline, epoch=e)
        for e in range(epochs)
    }


@dataclass
class TrainBatch:
    """A padded batch; rows whose preprocessing failed are left out and counted."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    images: torch.Tensor  # (B, 3, S, S)
    masks: list[torch.Tensor]  # B tensors (R_i, H_i, W_i), uint8
    sample_ids: list[str]
    skipped: list[tuple[str, str]]  # (sample_id, reason)
    sources: list[str] = dataclasses.field(default_factory=list)  # each kept row's `source`

    def __len__(self) -> int:
        return len(self.sample_ids)

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.images.to(device),
            [m.to(device) for m in self.masks],
            self.sample_ids,
            self.skipped,
            self.sources,
        )


def collate(batch: dict[str, np.ndarray], pad_token_id: int = 0) -> TrainBatch:
    """A numpy batch from the example stream -> TrainBatch (right padding, RLE masks decoded)."""
    errors = [str(e) for e in batch["error"]]
    keep = [i for i, e in enumerate(errors) if not e]
    skipped = [(str(batch["sample_id"][i]), errors[i]) for i, e in enumerate(errors) if e]
    width = max((len(batch["input_ids"][i]) for i in keep), default=0)
    ids = torch.full((len(keep), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(keep), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(keep), width), dtype=torch.long)
    masks = []
    for row, i in enumerate(keep):
        n = len(batch["input_ids"][i])
        ids[row, :n] = torch.as_tensor(np.asarray(batch["input_ids"][i]))
        labels[row, :n] = torch.as_tensor(np.asarray(batch["labels"][i]))
        attn[row, :n] = 1
        h, w = (int(v) for v in batch["mask_size"][i])
        decoded = [
            decode_region({"counts": c, "size": [h, w]}) for c in list(batch["mask_counts"][i])
        ]
        masks.append(
            torch.from_numpy(np.stack(decoded))
            if decoded
            else torch.zeros(0, h, w, dtype=torch.uint8)
        )
    images = torch.as_tensor(np.asarray(batch["pixel_values"])[keep])
    sources = [str(batch["source"][i]) for i in keep] if "source" in batch else []
    return TrainBatch(
        ids,
        attn,
        labels,
        images,
        masks,
        [str(batch["sample_id"][i]) for i in keep],
        skipped,
        sources,
    )


def train_batches(
    data_shard: Any,
    batch_size: int,
    pad_token_id: int = 0,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    prefetch_batches: int = 2,
    skip: int = 0,
):
    """Collated TrainBatches from a Ray Train worker's `get_dataset_shard(...)` (one epoch),
    after the first `skip` batches, which are dropped before collating (no masks decoded)."""
    batches = data_shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=seed,
    )
    for batch in itertools.islice(batches, skip, None):
        yield collate(batch, pad_token_id)


def count_rows(paths: Sequence[str], tasks: Sequence[str] = (), s3: S3Options | None = None) -> int:
    """Rows in the shard folders (of the given tasks), from parquet metadata and one column."""
    total = 0
    for path in paths:
        where, files = list_shards(path, s3)
        for file in files:
            if tasks:
                column = pq.read_table(file, columns=["task"], filesystem=where.fs)["task"]
                total += int(pc.sum(pc.is_in(column, value_set=pa.array(list(tasks)))).as_py() or 0)
            else:
                total += pq.read_metadata(file, filesystem=where.fs).num_rows
    return total
