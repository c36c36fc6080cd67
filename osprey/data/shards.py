"""Writing and reading parquet shards of SHARD_SCHEMA rows."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from osprey.data.schema import SHARD_SCHEMA

# Rows per shard file. Images dominate the size; 1,000 COCO-sized JPEGs is ~150-250 MB.
DEFAULT_ROWS_PER_SHARD = 1000
# Rows per parquet row group: the smallest piece a training epoch's mix reads at once
# (osprey.data.mix), so a shuffled epoch reads each row group once instead of a whole file per
# handful of rows. 16 COCO-sized images are ~3 MB.
ROW_GROUP_ROWS = 16


class ShardSchemaError(ValueError):
    """A shard whose columns do not match SHARD_SCHEMA; the message names the column."""


def validate_schema(schema: pa.Schema, where: str) -> None:
    for field in SHARD_SCHEMA:
        if field.name not in schema.names:
            raise ShardSchemaError(f"{where}: missing column {field.name!r}")
        got = schema.field(field.name).type
        if not got.equals(field.type):
            raise ShardSchemaError(
                f"{where}: column {field.name!r} has type {got}, expected {field.type}"
            )


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def write_shards(
    rows: Iterable[dict[str, Any]],
    out_dir: str,
    prefix: str = "shard",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    filesystem: Any = None,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> list[str]:
    """Write rows to `out_dir/prefix-00000.parquet`, ... and return the paths written."""
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    if filesystem is None:
        os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        path = f"{out_dir.rstrip('/')}/{prefix}-{len(paths):05d}.parquet"
        pq.write_table(
            rows_to_table(batch), path, filesystem=filesystem, row_group_size=row_group_rows
        )
        paths.append(path)
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= rows_per_shard:
            flush()
    if batch:
        flush()
    return paths


def read_shard(path: str, filesystem: Any = None) -> pa.Table:
    """Read one shard, raising a clear error for an unreadable file or a wrong column."""
    try:
        table = pq.read_table(path, filesystem=filesystem)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardSchemaError(f"{path}: not a readable parquet shard ({exc})") from exc
    validate_schema(table.schema, path)
    return table


def iter_rows(path: str, filesystem: Any = None) -> Iterator[dict[str, Any]]:
    yield from read_shard(path, filesystem).to_pylist()
