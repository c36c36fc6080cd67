"""The order in which a stage reads its rows: every source folder mixed as a global shuffle
would, re-drawn for each (seed, epoch), read in small contiguous units.

Osprey's reference concatenates all of a stage's data sets and samples uniformly at random over
the concatenation every epoch (a `ConcatDataset` read by the Trainer's random sampler). Rows here
live in parquet shards whose images are inline, so reading rows one at a time from random places
would re-read whole row groups. The order is therefore planned over *units*, slices of at most
`unit_rows` consecutive rows of one row group (shards are written with small row groups):

1. each source's units are shuffled, seeded by (seed, epoch);
2. each unit gets a key, its (jittered) position in its own source's shuffled stream as a
   fraction of that source's rows, and all sources' units are merged by key, so every stretch of
   the epoch holds each source at its overall share, as a uniform shuffle does on average;
3. the merged sequence is cut into blocks of about `block_rows` rows, one Ray task each, whose
   rows are shuffled within the block, seeded by (seed, epoch, block).

Every unit is in the plan exactly once, so every row is read exactly once per epoch, and the
plan is a pure function of the files' metadata, the seed and the epoch: a restarted run reads
the very same stream.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from osprey.data.schema import SHARD_SCHEMA

# Random streams of one epoch: the source shuffles and the per-block shuffles never share draws.
_ORDER_STREAM = 0
_BLOCK_STREAM = 1


@dataclass(frozen=True, slots=True)
class Unit:
    """A slice of one row group of one shard file: the smallest piece the plan moves."""

    source: int  # index of the shard folder in the stage's `data`
    file: str
    row_group: int
    start: int  # first row of the slice in the row group
    stop: int  # one past its last row
    rows: int  # rows of the wanted tasks in the slice

    def to_list(self) -> list[Any]:
        return [self.source, self.file, self.row_group, self.start, self.stop]


@dataclass(frozen=True)
class SourcePlan:
    """One shard folder: its filesystem, units and the `source` names its rows carry."""

    fs: Any
    units: tuple[Unit, ...]
    names: tuple[str, ...]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)


def plan_source(
    index: int, fs: Any, files: Sequence[str], unit_rows: int, tasks: Sequence[str] = ()
) -> SourcePlan:
    """The units of one folder's files (rows of other tasks left out), from parquet metadata and
    the `task` and `source` columns."""
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    wanted = pa.array(list(tasks), pa.string()) if tasks else None
    units: list[Unit] = []
    names: set[str] = set()
    for file in files:
        with fs.open_input_file(file) as handle:
            parquet = pq.ParquetFile(handle)
            columns = parquet.read(columns=["task", "source"])
            keep = (
                np.asarray(pc.is_in(columns["task"], value_set=wanted), dtype=bool)
                if wanted is not None
                else np.ones(columns.num_rows, dtype=bool)
            )
            sources = columns["source"].to_numpy(zero_copy_only=False)
            names.update(str(s) for s in sources[keep])
            offset = 0
            for group in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(group).num_rows
                for start in range(0, n, unit_rows):
                    stop = min(n, start + unit_rows)
                    rows = int(keep[offset + start : offset + stop].sum())
                    if rows:
                        units.append(Unit(index, file, group, start, stop, rows))
                offset += n
    return SourcePlan(fs, tuple(units), tuple(sorted(names)))


def epoch_order(
    sources: Sequence[Sequence[Unit]], seed: int, epoch: int, shuffle: bool = True
) -> list[Unit]:
    """Every unit of every source once: merged by position in its source's shuffled stream
    (module docstring), or, without `shuffle`, source after source in file order."""
    if not shuffle:
        return [u for units in sources for u in units]
    rng = np.random.default_rng([seed, epoch, _ORDER_STREAM])
    keys: list[float] = []
    merged: list[Unit] = []
    for units in sources:
        total = sum(u.rows for u in units)
        permutation = rng.permutation(len(units))
        jitter = rng.random(len(units))
        done = 0
        for k, j in enumerate(permutation):
            unit = units[j]
            keys.append((done + jitter[k] * unit.rows) / total)
            merged.append(unit)
            done += unit.rows
    return [merged[i] for i in np.argsort(np.asarray(keys), kind="stable")]


def cut_blocks(order: Sequence[Unit], block_rows: int) -> list[list[Unit]]:
    """Consecutive units grouped into blocks of at least `block_rows` rows (the last may be
    smaller): each block is read, shuffled and mapped by one Ray task."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    blocks: list[list[Unit]] = []
    current: list[Unit] = []
    rows = 0
    for unit in order:
        current.append(unit)
        rows += unit.rows
        if rows >= block_rows:
            blocks.append(current)
            current, rows = [], 0
    if current:
        blocks.append(current)
    return blocks


def block_items(blocks: Sequence[Sequence[Unit]], epoch: int) -> list[dict[str, Any]]:
    """Blocks as small picklable items for `ray.data.from_items`."""
    return [
        {"epoch": epoch, "block": i, "units": json.dumps([u.to_list() for u in block])}
        for i, block in enumerate(blocks)
    ]


def read_blocks(
    items: pa.Table,
    filesystems: Sequence[Any],
    tasks: Sequence[str],
    seed: int,
    shuffle: bool,
) -> pa.Table:
    """Ray Data task: the rows of each planned block, in the block's seeded random order."""
    names = SHARD_SCHEMA.names
    wanted = pa.array(list(tasks), pa.string()) if tasks else None
    tables = []
    for epoch, block, spec in zip(
        items["epoch"].to_pylist(), items["block"].to_pylist(), items["units"].to_pylist(),
        strict=True,
    ):  # fmt: skip
        parts = []
        with contextlib.ExitStack() as stack:
            opened: dict[tuple[int, str], pq.ParquetFile] = {}  # a file's footer read once
            for source, file, group, start, stop in json.loads(spec):
                if (source, file) not in opened:
                    handle = stack.enter_context(filesystems[source].open_input_file(file))
                    opened[source, file] = pq.ParquetFile(handle)
                rows = opened[source, file].read_row_group(group, columns=names)
                parts.append(rows.slice(start, stop - start).select(names).cast(SHARD_SCHEMA))
        table = pa.concat_tables(parts)
        if wanted is not None:
            table = table.filter(pc.is_in(table["task"], value_set=wanted))
        if shuffle:
            rng = np.random.default_rng([seed, epoch, _BLOCK_STREAM, block])
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        tables.append(table)
    return pa.concat_tables(tables)
