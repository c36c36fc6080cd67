"""`osprey prepare SOURCE ...`: convert one source data set into parquet shards (docs/data.md).

`run_prepare` converts in this process; `run_prepare_on_ray` (used by `jobs/prepare.py`) splits
the annotation entries into chunks and converts each chunk in a Ray task that writes its own
shards. Both print one summary line and return the shard paths.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from osprey.cluster import init_ray
from osprey.data import shards
from osprey.data.converters import (
    CocoInstances,
    ConversionStats,
    Converter,
    ImageFolder,
    LlavaCaptions,
    Location,
    Osprey724K,
    RefCoco,
    Vcr,
    VisualGenome,
    iter_rows,
    resolve,
)
from osprey.io.storage import add_s3_arguments, s3_options_from_args

SHAPES = "shapes"  # the synthetic data set; written by osprey.data.shapes, not by a converter


@dataclass(frozen=True)
class SourceSpec:
    # (annotation file, image root, data set name) -> converter
    build: Callable[[Location | None, Location, str], Converter]
    help: str
    needs_annotations: bool = True


def _coco(sep: str | None) -> Callable[[Location | None, Location, str], Converter]:
    return lambda ann, img, name: CocoInstances(ann, img, source=name, part_separator=sep)


def _osprey(kind: str) -> Callable[[Location | None, Location, str], Converter]:
    return lambda ann, img, name: Osprey724K(ann, img, kind, source=name)


def _refcoco(ann: Location | None, img: Location, name: str) -> Converter:
    return RefCoco(ann, img, source=name)


def _llava(ann: Location | None, img: Location, name: str) -> Converter:
    return LlavaCaptions(ann, img, source=name)


SOURCES: dict[str, SourceSpec] = {
    # stage 1
    "cc3m": SourceSpec(_llava, "LLaVA's filtered CC3M-595K chat.json (captions)"),
    "llava_pretrain": SourceSpec(_llava, "LLaVA's blip_laion_cc_sbu_558k.json (captions)"),
    # stage 2
    "coco": SourceSpec(_coco(None), "COCO instances JSON, e.g. instances_train2017.json"),
    "refcoco": SourceSpec(_refcoco, "finetune_refcoco_train_with_mask.json"),
    "refcoco+": SourceSpec(_refcoco, "finetune_refcoco+_train_with_mask.json"),
    "refcocog": SourceSpec(_refcoco, "finetune_refcocog_train_with_mask.json"),
    "pascal_part": SourceSpec(_coco(":"), "PascalPart train.json (COCO form), object:part"),
    "partimagenet": SourceSpec(_coco(" "), "PartImageNet train_format.json, object part"),
    # stage 3
    "osprey_conversation": SourceSpec(_osprey("conversation"), "osprey_conversation.json"),
    "osprey_detailed": SourceSpec(_osprey("detailed"), "osprey_detail_description.json"),
    "osprey_short": SourceSpec(_osprey("short"), "osprey_short_form.json"),
    "osprey_part": SourceSpec(_osprey("part"), "osprey_part_level.json"),
    "osprey_posneg": SourceSpec(_osprey("posneg"), "osprey_lvis_positive_negative.json"),
    "vg": SourceSpec(
        lambda ann, img, name: VisualGenome(ann, img, source=name), "vg_train_with_mask.json"
    ),
    "vcr": SourceSpec(lambda ann, img, name: Vcr(ann, img, source=name), "VCR train.jsonl"),
    # captioning input
    "images": SourceSpec(
        lambda ann, img, name: ImageFolder(img, source=name),
        "a folder or s3:// prefix of images (no annotations)",
        needs_annotations=False,
    ),
}


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    sources = "; ".join(f"{name}: {spec.help}" for name, spec in SOURCES.items())
    parser.add_argument(
        "source",
        choices=[*SOURCES, SHAPES],
        metavar="SOURCE",
        help=f"{sources}; {SHAPES}: the synthetic shapes data set",
    )
    parser.add_argument("--annotations", help="the source's annotation file (local or s3://)")
    parser.add_argument(
        "--images", help="folder the annotation's image names are relative to (local or s3://)"
    )
    parser.add_argument("--out", required=True, help="output folder for the shards (or s3://)")
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=shards.DEFAULT_ROWS_PER_SHARD,
        help="rows per parquet file (default %(default)s)",
    )
    parser.add_argument(
        "--source-name", help="the rows' `source` column (default: SOURCE), e.g. lvis for coco"
    )
    parser.add_argument("--limit", type=int, help="convert only the first N annotation entries")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the .parquet files already in --out"
    )
    add_s3_arguments(parser.add_argument_group("S3 (credentials from the usual AWS_* variables)"))
    shapes = parser.add_argument_group(f"{SHAPES} only (defaults: osprey.data.shapes')")
    shapes.add_argument("--n", type=int, help="number of images")
    shapes.add_argument("--seed", type=int)
    shapes.add_argument("--val-fraction", type=float)
    shapes.add_argument("--image-size", type=int)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--entries-per-task",
        type=int,
        default=2000,
        help="annotation entries converted by one Ray task (default %(default)s)",
    )
    parser.add_argument(
        "--ray-address", help="cluster to join (default: RAY_ADDRESS, else a new local one)"
    )


def build_converter(args: argparse.Namespace) -> Converter:
    spec = SOURCES.get(args.source)
    if spec is None:
        raise ValueError(f"unknown source {args.source!r}; choose one of {sorted(SOURCES)}")
    if not args.images:
        raise ValueError(f"prepare {args.source} needs --images (the image folder)")
    if spec.needs_annotations and not args.annotations:
        raise ValueError(f"prepare {args.source} needs --annotations ({spec.help})")
    s3 = s3_options_from_args(args)
    annotations = resolve(args.annotations, s3) if spec.needs_annotations else None
    return spec.build(annotations, resolve(args.images, s3), args.source_name or args.source)


def _limited(entries: list[Any], limit: int | None) -> list[Any]:
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    return entries if limit is None else entries[:limit]


def _prepare_out_dir(out: Location, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones, whose chunking and sample ids may differ."""
    if out.fs.get_file_info(out.path).type != pafs.FileType.Directory:
        return
    old = [
        f.path
        for f in out.fs.get_file_info(pafs.FileSelector(out.path))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    ]
    if old and not overwrite:
        raise ValueError(f"{out.uri} already holds {len(old)} .parquet files; pass --overwrite")
    for path in old:
        out.fs.delete_file(path)


def write_rows(
    rows: Iterable[dict[str, Any]], out: Location, prefix: str, rows_per_shard: int
) -> list[str]:
    if rows_per_shard <= 0:
        raise ValueError(f"--rows-per-shard must be positive, got {rows_per_shard}")
    # shards.write_shards creates local folders itself only when given no filesystem.
    fs = out.fs if out.scheme else None
    written = shards.write_shards(rows, out.path, prefix, rows_per_shard, filesystem=fs)
    return [f"{out.scheme}://{p}" if out.scheme else p for p in written]


def convert_chunk(
    converter: Converter, entries: list[Any], out: Location, prefix: str, rows_per_shard: int
) -> tuple[list[str], ConversionStats]:
    """Convert some entries and write their shards `out/prefix-NNNNN.parquet` (one Ray task)."""
    stats = ConversionStats()
    rows = iter_rows(converter, stats, entries, progress=False)
    return write_rows(rows, out, prefix, rows_per_shard), stats


def _summary(source: str, stats: ConversionStats, paths: list[str], out: Location) -> str:
    return f"prepare {source}: {stats.summary()}; {len(paths)} shards in {out.uri}"


def run_prepare(args: argparse.Namespace) -> list[str]:
    """Convert args.source into shards in this process; prints a summary, returns shard paths."""
    if args.source == SHAPES:
        return _run_shapes(args)
    converter = build_converter(args)
    out = resolve(args.out, s3_options_from_args(args))
    _prepare_out_dir(out, args.overwrite)
    stats = ConversionStats()
    entries = _limited(converter.entries(), args.limit)
    paths = write_rows(iter_rows(converter, stats, entries), out, "shard", args.rows_per_shard)
    print(_summary(converter.source, stats, paths, out))
    return paths


def run_prepare_on_ray(args: argparse.Namespace) -> list[str]:
    """Like run_prepare, with each chunk of entries converted by its own Ray task.

    Connects to the cluster at --ray-address or RAY_ADDRESS (set by `ray job submit`), else starts
    a local one. Chunk i writes `part{i:05d}-NNNNN.parquet`, so tasks never share a file.
    """
    if args.source == SHAPES:
        return _run_shapes(args)
    import ray

    if args.entries_per_task <= 0:
        raise ValueError(f"--entries-per-task must be positive, got {args.entries_per_task}")
    converter = build_converter(args)
    out = resolve(args.out, s3_options_from_args(args))
    _prepare_out_dir(out, args.overwrite)
    entries = _limited(converter.entries(), args.limit)
    init_ray(args.ray_address)
    task = ray.remote(convert_chunk)
    step = args.entries_per_task
    pending = [
        task.remote(
            converter, entries[i : i + step], out, f"part{i // step:05d}", args.rows_per_shard
        )
        for i in range(0, len(entries), step)
    ]
    paths: list[str] = []
    stats = ConversionStats()
    with tqdm(total=len(pending), desc=converter.source, unit="chunk") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            chunk_paths, chunk_stats = ray.get(done[0])
            paths += chunk_paths
            stats.merge(chunk_stats)
            bar.update(1)
    paths.sort()
    print(_summary(converter.source, stats, paths, out))
    return paths


def _run_shapes(args: argparse.Namespace) -> list[str]:
    # Imported here: the shapes generator pulls in drawing code the converters never need.
    from osprey.data.shapes import write_shapes_dataset

    options = {
        "n": args.n,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "image_size": args.image_size,
    }
    result = write_shapes_dataset(
        args.out,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
        **{k: v for k, v in options.items() if v is not None},
    )
    paths = _paths_from(result) or _local_parquet_files(args.out)
    rows = sum(pq.read_metadata(p).num_rows for p in paths)
    print(f"prepare {SHAPES}: {rows} rows; {len(paths)} shards in {args.out}")
    return paths


def _paths_from(result: Any) -> list[str]:
    """write_shapes_dataset's return value, whatever collection of paths it is, as a flat list."""
    if isinstance(result, (str, os.PathLike)):
        path = os.fspath(result)
        return [path] if path.endswith(".parquet") else []
    if isinstance(result, dict):
        # osprey.data.shapes returns its meta, whose "files" maps each split to its shards.
        result = result["files"] if "files" in result else list(result.values())
    if isinstance(result, (list, tuple)):
        return sorted(p for item in result for p in _paths_from(item))
    return []


def _local_parquet_files(root: str) -> list[str]:
    found = resolve(root)
    if found.fs.get_file_info(found.path).type != pafs.FileType.Directory:
        return []
    return [posixpath.join(found.path, p) for p in found.list_files() if p.endswith(".parquet")]
