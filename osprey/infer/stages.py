"""The captioning job's stages: read -> segment -> caption -> write, one image per row.

Each stage maps a list of rows (dicts of `STAGE_SCHEMA`) to rows, and as a Ray Data
`map_batches` callable a pyarrow table to a table (`read_batch` and `write_batch` are the task
forms of the I/O stages); the local runner chains the same objects in one process. A failure never leaves a stage: the image's row gets an `error` naming the file
and its stage, and the job carries on. Between stages an image travels as its encoded bytes and
its regions as RLE (JSON text), so a queue of images costs what the files cost.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from osprey.data.converters.images import IMAGE_EXTENSIONS
from osprey.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from osprey.infer.regions import Region, RleMasks
from osprey.io.output import OUTPUT_SCHEMA, TASK_COLUMNS, OutputDir, render_name
from osprey.io.storage import Location

if TYPE_CHECKING:
    # The model-side modules import torch: only the segment and caption actors load them, so
    # read and write tasks run in light workers.
    from osprey.infer.engine import EngineConfig, Task
    from osprey.infer.segment import SegmenterConfig

log = logging.getLogger(__name__)

STAGE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # the image's URI
        pa.field("data", pa.binary()),  # encoded bytes as stored
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("regions", pa.string()),  # JSON list of Region.to_dict()
        pa.field("captions", pa.string()),  # JSON list (per region) of {task: text}
        pa.field("error", pa.string()),
        # A free question (one <region>) asked of this image's regions besides the tasks.
        pa.field("question", pa.string()),
    ]
)

Row = dict[str, Any]


def to_table(rows: list[Row]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def new_row(path: str) -> Row:
    return {name: None for name in STAGE_SCHEMA.names} | {"path": path}


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


@dataclass
class Listing:
    images: list[str]  # URIs, sorted
    not_images: int  # files skipped for their extension


def list_images(
    source: Location,
    extensions: Sequence[str] | None = IMAGE_EXTENSIONS,
    exclude: str | None = None,
) -> Listing:
    """Image files under a folder (recursively) or the one file; hidden files are left out.

    `extensions` None takes every file (a non-image then gets an error row). `exclude` is a
    folder URI whose files are never inputs (the job's own output inside SRC).
    """
    info = source.fs.get_file_info(source.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source.uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        names = [posixpath.basename(source.path)]
        root = Location(source.fs, posixpath.dirname(source.path), source.scheme)
    else:
        names, root = source.list_files(), source
    keep, skipped = [], 0
    prefix = exclude.rstrip("/") + "/" if exclude else None
    for name in names:
        if any(part.startswith(".") for part in name.split("/")):
            continue
        uri = root.child(name).uri
        if prefix and uri.startswith(prefix):
            continue
        if extensions is not None and posixpath.splitext(name)[1].lower() not in extensions:
            skipped += 1
            continue
        keep.append(uri)
    return Listing(sorted(keep), skipped)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class _Stage:
    """Rows in, rows out, one for one; `__call__` adapts it to Ray Data's pyarrow batches."""

    def process(self, rows: list[Row]) -> list[Row]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Columns that are not the stage's (a user's, in osprey.infer.processor) pass through
        # untouched, as Arrow, so they keep their types whatever they are.
        own = [n for n in STAGE_SCHEMA.names if n in batch.column_names]
        rows = batch.select(own).to_pylist()
        for row in rows:
            for name in STAGE_SCHEMA.names:
                row.setdefault(name, None)
        out = to_table(self.process(rows))
        for name in batch.column_names:
            if name not in STAGE_SCHEMA.names:
                out = out.append_column(batch.schema.field(name), batch.column(name))
        return out


class ReadStage(_Stage):
    """Reads each file's bytes; files over `max_bytes` are refused unread."""

    def __init__(self, source: Location, max_bytes: int) -> None:
        self.fs = source.fs
        self.scheme = source.scheme
        self.max_bytes = max_bytes

    def process(self, rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            row = new_row(row["path"])
            path = row["path"][len(self.scheme) + 3 :] if self.scheme else row["path"]
            try:
                row["data"] = read_file(self.fs, path, self.max_bytes)
            except Exception as exc:  # any storage error is this image's, not the job's
                row["error"] = f"{row['path']}: read failed: {exc}"
            out.append(row)
        return out


def read_file(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    """A file's bytes; a file over `max_bytes` is refused unread."""
    size = fs.get_file_info(path).size
    if size is not None and size > max_bytes:
        raise ValueError(f"file of {size:,} bytes is over the limit of {max_bytes:,}")
    with fs.open_input_stream(path) as stream:
        return stream.readall()


# PIL names the in-memory buffer it failed on ("<_io.BytesIO object at 0x7f...>"): a different
# text on every run, which would make reruns' rows differ.
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


def _reason(exc: Exception, path: str) -> str:
    return _BUFFER_REPR.sub(posixpath.basename(path), str(exc))


def decode(row: Row, max_pixels: int) -> np.ndarray:
    """The row's image as an upright RGB array (EXIF rotation applied)."""
    return np.asarray(decode_image(row["data"], max_pixels=max_pixels))


class SegmentStage(_Stage):
    """Decodes each image and finds its regions (largest first, at most `max_regions`). An image
    that comes with its regions keeps them (their size checked against the image's)."""

    def __init__(
        self,
        config: SegmenterConfig,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_regions: int | None = None,
    ) -> None:
        self.segmenter = config.build()
        self.max_pixels = max_pixels
        self.max_regions = max_regions

    def process(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            if row["error"]:
                continue
            try:
                image = decode(row, self.max_pixels)
            except ImageDecodeError as exc:
                row["error"] = f"{row['path']}: {_reason(exc, row['path'])}"
                continue
            row["height"], row["width"] = int(image.shape[0]), int(image.shape[1])
            if row["regions"] is not None:
                row["error"] = _check_given(row, image.shape[:2])
                continue
            try:
                regions = self.segmenter.segment(image)[: self.max_regions]
            except Exception as exc:
                row["error"] = f"{row['path']}: segmentation failed: {type(exc).__name__}: {exc}"
                continue
            row["regions"] = json.dumps([r.to_dict() for r in regions])
        return rows


def _check_given(row: Row, shape: tuple[int, ...]) -> str | None:
    """Why the regions a row came with cannot be the image's, or None."""
    for index, region in enumerate(json.loads(row["regions"])):
        if tuple(region["size"]) != tuple(shape):
            return (
                f"{row['path']}: mask {index} is {region['size'][0]}x{region['size'][1]} but the "
                f"image is {shape[0]}x{shape[1]}"
            )
    return None


class CaptionStage(_Stage):
    """Captions every region of a batch of images with the engine (regions batched across
    images). A failing batch is retried image by image, so one bad image fails alone. A row's
    own `question` replaces the `answer` task for that row."""

    def __init__(
        self,
        model_dir: str,
        tasks: Sequence[Task],
        engine: EngineConfig | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        keep_data: bool = False,
        tracking_uri: str | None = None,
        s3=None,
        adapter: str | None = None,
        answer_tokens: int | None = None,
    ) -> None:
        from osprey.infer.engine import RegionCaptioner

        # `model_dir` may be any model name: fetched once per node (osprey.io.models).
        self.engine = RegionCaptioner.from_pretrained(
            model_dir, engine, device=device, dtype=dtype, tracking_uri=tracking_uri, s3=s3,
            adapter=adapter,
        )  # fmt: skip
        self._setup(tasks, max_pixels, keep_data, answer_tokens)

    def _setup(
        self,
        tasks: Sequence[Task],
        max_pixels: int,
        keep_data: bool,
        answer_tokens: int | None,
    ) -> None:
        from osprey.infer.config import ANSWER_TOKENS

        self.tasks = list(tasks)
        self.max_pixels = max_pixels
        self.keep_data = keep_data
        self.answer_tokens = answer_tokens or ANSWER_TOKENS

    def process(self, rows: list[Row]) -> list[Row]:
        groups: dict[str | None, list[Row]] = {}
        for row in rows:
            if not row["error"] and row["regions"] is not None:
                groups.setdefault(row.get("question"), []).append(row)
        for question, members in groups.items():
            try:
                tasks = self.tasks_for(question)
            except ValueError as exc:
                for row in members:
                    row["error"] = f"{row['path']}: {exc}"
                continue
            # Images without regions have nothing to ask.
            self._caption_group([r for r in members if json.loads(r["regions"])], tasks)
        if not self.keep_data:
            for row in rows:
                row["data"] = None
        return rows

    def tasks_for(self, question: str | None) -> list[Task]:
        if question is None:
            return self.tasks
        from osprey.infer.config import question_task

        own = question_task(question, self.answer_tokens)
        return [t for t in self.tasks if t.name != own.name] + [own]

    def inputs(self, row: Row) -> tuple[np.ndarray, list[Region]]:
        image = decode(row, self.max_pixels)
        return image, [Region.from_dict(d) for d in json.loads(row["regions"])]

    def _caption_group(self, rows: list[Row], tasks: list[Task]) -> None:
        if not rows:
            return
        try:
            self._caption(rows, tasks)
        except Exception:
            for row in rows:
                try:
                    self._caption([row], tasks)
                except Exception as exc:
                    row["error"] = f"{row['path']}: captioning failed: {type(exc).__name__}: {exc}"

    def _caption(self, rows: list[Row], tasks: list[Task]) -> None:
        images, masks = [], []
        for row in rows:
            image, regions = self.inputs(row)
            images.append(image)
            masks.append(RleMasks(regions))
        answers = self.engine.caption(images, masks, tasks)
        for row, per_region in zip(rows, answers, strict=True):
            row["captions"] = json.dumps(per_region)


class WriteStage(_Stage):
    """Turns images into output rows (one per region) and commits them as one part; yields one
    summary row per part."""

    SUMMARY_SCHEMA = pa.schema(
        [
            pa.field("part", pa.string()),
            pa.field("images", pa.int64()),
            pa.field("masks", pa.int64()),
            pa.field("errors", pa.int64()),
        ]
    )

    def __init__(
        self, out: OutputDir, render: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.out = out
        self.render = render
        self.max_pixels = max_pixels

    def process(self, rows: list[Row]) -> list[Row]:
        output: list[Row] = []
        masks = errors = 0
        for row in rows:
            image_rows = output_rows(row)
            if self.render and not row["error"] and row["regions"]:
                rendered = self._render(row, image_rows)
                for r in image_rows:
                    r["render"] = rendered
            output += image_rows
            errors += row["error"] is not None
            masks += sum(r["mask_index"] is not None for r in image_rows)
        part = self.out.write_part(output) if output else None
        return [{"part": part, "images": len(rows), "masks": masks, "errors": errors}]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.process(batch.to_pylist()), schema=self.SUMMARY_SCHEMA)

    def _render(self, row: Row, image_rows: list[Row]) -> str | None:
        from osprey.infer.render import overlay_png

        try:
            image = decode(row, self.max_pixels)
            regions = [Region.from_dict(d) for d in json.loads(row["regions"])]
            labels = [r.get("category") or r.get("short_caption") or "" for r in image_rows]
            name = render_name(row["path"])
            self.out.write_bytes(name, overlay_png(image, regions, labels))
            return name
        except Exception as exc:  # an overlay is a convenience; its failure keeps the rows
            log.warning("%s: overlay failed: %s", row["path"], exc)
            return None


def output_rows(row: Row) -> list[Row]:
    """One output row per region; one row with a null mask for an image without regions or
    with an error."""
    base = {name: None for name in OUTPUT_SCHEMA.names} | {
        "image_path": row["path"],
        "width": row["width"],
        "height": row["height"],
        "error": row["error"],
    }
    if row["error"] or not row["regions"]:
        return [base]
    regions = json.loads(row["regions"])
    captions = json.loads(row["captions"]) if row["captions"] else [{} for _ in regions]
    if not regions:
        return [base]
    out = []
    for index, (region, answers) in enumerate(zip(regions, captions, strict=True)):
        r = Region.from_dict(region)
        item = dict(base)
        item.update(
            mask_index=index,
            mask={"counts": r.counts, "size": list(r.size)},
            bbox=list(r.bbox),
            area=r.area,
            predicted_iou=r.predicted_iou,
            stability_score=r.stability_score,
        )
        for task, text in answers.items():
            item[TASK_COLUMNS.get(task, task)] = text
        out.append(item)
    return out


def read_batch(batch: pa.Table, source: Location, max_bytes: int) -> pa.Table:
    return ReadStage(source, max_bytes)(batch)


def write_batch(batch: pa.Table, out: OutputDir, render: bool, max_pixels: int) -> pa.Table:
    return WriteStage(out, render, max_pixels)(batch)
