"""Region captioning as a step of one's own Ray Data pipeline, in the style of
`ray.data.llm.build_processor`:

    from osprey.infer import CaptionProcessorConfig, build_caption_processor

    processor = build_caption_processor(
        CaptionProcessorConfig(model="/models/osprey", tasks=("category", "short"), concurrency=2)
    )
    ds = processor(ray.data.read_parquet("s3://bucket/my-table"))
    ds.write_parquet("s3://bucket/my-captions")

Each input row is one image: `image` (encoded bytes, or an (H, W, 3) uint8 array as
`ray.data.read_images` gives) or else `path` (a local path or s3:// URI, read here); optional
`masks` (a list of COCO RLE {"size": [h, w], "counts": text}, or its JSON; absent or null:
segment everything) and `question` (a free question naming the region once as <region>, asked
of every region of that image). Every other column passes through unchanged.

Added columns: `masks` (the given or found regions as RLE, largest first), one list of answers
per task aligned with `masks` (`category`, `short_caption`, `detailed_caption`, and `answer`
when rows carry questions), `width`, `height` and `error`. A bad input is not an exception:
its row gets `error` naming the input and the reason, and null answers. Columns named `data`,
`regions` or `captions` are the stages' own; a user's columns of those names are set aside
and put back; the added columns replace a user's of the same names.

The segment and caption steps are the caption job's stages (osprey.infer.stages) run as two
actor pools; `osprey caption` runs its Ray path through `CaptionProcessor.stages`. With
`serve_app` the answers come from a running Osprey Serve application (osprey.infer.remote).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from osprey.data.images import DEFAULT_MAX_PIXELS
from osprey.infer.config import ANSWER_TOKENS, EngineConfig, Task
from osprey.infer.regions import Region
from osprey.infer.segment import SamConfig, SegmenterConfig
from osprey.infer.stages import STAGE_SCHEMA, read_file
from osprey.io.output import TASK_COLUMNS
from osprey.io.storage import S3Options, resolve

if TYPE_CHECKING:
    import ray.data

Row = dict[str, Any]

# A user's column named as one of the stages' (path, question, data, ...) travels under this
# prefix and is put back at the end, so the stages' values never overwrite the user's.
_ASIDE = "__user_"
_OUTPUTS = ("masks", "width", "height", "error")  # with one column per task

MASK_TYPE = pa.list_(pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())]))


@dataclass(kw_only=True)
class CaptionProcessorConfig:
    """What to ask of every region, of which model, and how the two actor pools scale."""

    # A model directory or any name osprey.io.models resolves; unused with `serve_app`.
    model: str | None = None
    # Standard task names ("category", "short", "detailed") or Task objects.
    tasks: Sequence[Task | str] = ("category", "short")
    answer_tokens: int = ANSWER_TOKENS  # new tokens of the answer to a row's own question
    engine: EngineConfig = field(default_factory=EngineConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    adapter: str | None = None
    tracking_uri: str | None = None
    dtype: str | None = None  # float32, bfloat16, float16; None keeps the checkpoint's
    s3: S3Options | None = None  # for s3:// paths (and models)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_regions: int | None = None  # of found regions, the largest N (given masks are all kept)
    max_file_bytes: int = 512 * 2**20
    # Captioner actors, and each one's resources; images per captioner call.
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8
    # Mask-generator actors, likewise.
    segment_concurrency: int = 1
    segment_num_cpus: float = 1.0
    segment_num_gpus: float = 0.0
    segment_batch_size: int = 4
    io_cpus: float = 0.25  # each preparing and finishing task (reads paths)
    # A running Osprey Serve application to send regions to instead of loading the model.
    serve_app: str | None = None
    serve_deployment: str = "Captioner"
    serve_retry_timeout_s: float = 3600.0  # how long shed requests are retried
    preprocess: Callable[[Row], Row] | None = None  # the user's row -> the processor's input
    postprocess: Callable[[Row], Row] | None = None  # the processor's output -> the user's row
    keep_data: bool = False  # keep encoded images in the stage rows (the job's overlays)

    def __post_init__(self) -> None:
        if self.model is None and self.serve_app is None:
            raise ValueError("give a model, or serve_app: the Serve application to ask")
        for name in ("concurrency", "batch_size", "segment_concurrency", "segment_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_cpus", "num_gpus", "segment_num_cpus", "segment_num_gpus", "io_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.serve_app is not None and self.engine.temperature != 0:
            # The app samples in its decoding modes only (greedy or reference).
            raise ValueError(
                "a Serve application samples in its decoding modes only: "
                "set engine.decoding, not temperature"
            )
        self.tasks = tuple(self._task(t) for t in self.tasks)
        if not self.tasks:
            raise ValueError("give at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ, got {names}")

    @staticmethod
    def _task(task: Task | str) -> Task:
        if isinstance(task, Task):
            return task
        from osprey.infer.engine import STANDARD_TASKS

        if task not in STANDARD_TASKS:
            raise ValueError(f"task {task!r}: choose {sorted(STANDARD_TASKS)} or give a Task")
        return STANDARD_TASKS[task]

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


# --------------------------------------------------------------------------------------------
# The stages, as constructed for both the Ray pools and the caption job's local runner
# --------------------------------------------------------------------------------------------


def segment_args(config: CaptionProcessorConfig) -> dict:
    seg = config.segmenter
    if seg.sam is not None and config.segment_num_gpus > 0:
        seg = SegmenterConfig(sam=SamConfig(**{**asdict(seg.sam), "device": "cuda"}))
    return {"config": seg, "max_pixels": config.max_pixels, "max_regions": config.max_regions}


def caption_stage(config: CaptionProcessorConfig) -> tuple[type, dict]:
    """The captioning stage's class and constructor arguments: the engine, or the Serve app."""
    common = {
        "tasks": list(config.tasks),
        "max_pixels": config.max_pixels,
        "keep_data": config.keep_data,
        "answer_tokens": config.answer_tokens,
    }
    if config.serve_app is not None:
        from osprey.infer.remote import ServeCaptionStage

        return ServeCaptionStage, common | {
            "app": config.serve_app,
            "deployment": config.serve_deployment,
            "decoding": config.engine.decoding,
            "retry_timeout_s": config.serve_retry_timeout_s,
        }
    from osprey.infer.stages import CaptionStage

    return CaptionStage, common | {
        "model_dir": config.model,
        "tracking_uri": config.tracking_uri,
        "s3": config.s3,
        "adapter": config.adapter,
        "engine": config.engine,
        "device": config.device,
        "dtype": config.dtype,
    }


class CaptionProcessor:
    """`processor(ds)`: the dataset with masks and answers added; see the module."""

    def __init__(self, config: CaptionProcessorConfig) -> None:
        self.config = config

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        config = self.config
        if config.preprocess is not None:
            ds = ds.map(config.preprocess)
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs={"s3": config.s3, "max_bytes": config.max_file_bytes},
            batch_size=config.segment_batch_size,
            batch_format="pyarrow",
            num_cpus=config.io_cpus,
        )
        ds = self.stages(ds)
        ds = ds.map_batches(
            finish_batch,
            fn_kwargs={"tasks": [t.name for t in config.tasks]},
            batch_size=config.batch_size,
            batch_format="pyarrow",
            num_cpus=config.io_cpus,
        )
        if config.postprocess is not None:
            ds = ds.map(config.postprocess)
        return ds

    def stages(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """Segment then caption rows of the stages' schema (osprey.infer.stages), other
        columns passing through: the part the caption job shares."""
        import ray

        from osprey.infer.stages import SegmentStage

        config = self.config
        ds = ds.map_batches(
            SegmentStage,
            fn_constructor_kwargs=segment_args(config),
            batch_size=config.segment_batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.segment_concurrency),
            num_cpus=config.segment_num_cpus,
            num_gpus=config.segment_num_gpus,
        )
        stage, kwargs = caption_stage(config)
        return ds.map_batches(
            stage,
            fn_constructor_kwargs=kwargs,
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_cpus=config.num_cpus,
            # The Serve app holds the model: its requests need no accelerator here.
            num_gpus=0 if config.serve_app is not None else config.num_gpus,
        )


def build_caption_processor(config: CaptionProcessorConfig) -> CaptionProcessor:
    return CaptionProcessor(config)


# --------------------------------------------------------------------------------------------
# The user's rows <-> the stages' rows
# --------------------------------------------------------------------------------------------


def prepare_batch(batch: pa.Table, s3: S3Options | None, max_bytes: int) -> pa.Table:
    """The user's columns -> the stages' columns (images read and encoded, masks checked), the
    user's columns kept beside them."""
    names = batch.column_names

    def values(name: str) -> list:
        return batch.column(name).to_pylist() if name in names else [None] * len(batch)

    images = _images(batch.column("image")) if "image" in names else [None] * len(batch)
    inputs = zip(images, values("path"), values("masks"), values("question"), strict=True)
    rows = [_prepare(image, path, masks, q, s3, max_bytes) for image, path, masks, q in inputs]
    out = pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)
    for name in names:
        kept = _ASIDE + name if name in STAGE_SCHEMA.names else name
        out = out.append_column(pa.field(kept, batch.schema.field(name).type), batch.column(name))
    return out


def _prepare(image, path, masks, question, s3, max_bytes) -> Row:
    row = {name: None for name in STAGE_SCHEMA.names}
    row["question"] = question or None
    try:
        if image is None and path is None:
            row["path"] = "(row without image or path)"
            raise ValueError("give `image` (bytes or an array) or `path`")
        row["data"] = _encoded(image) if image is not None else None
        row["path"] = str(path) if path is not None else _name(row["data"])
        if row["data"] is None:
            where = resolve(str(path), s3)
            try:
                row["data"] = read_file(where.fs, where.path, max_bytes)
            except Exception as exc:  # the file's, not the pipeline's
                raise ValueError(f"read failed: {exc}") from None
        if masks is not None:
            given = json.loads(masks) if isinstance(masks, str | bytes) else masks
            if not isinstance(given, list):
                raise ValueError("masks: give a list of COCO RLE masks")
            regions = []
            for index, rle in enumerate(given):
                try:
                    regions.append(Region.from_rle(rle).to_dict())
                except ValueError as exc:
                    raise ValueError(f"masks[{index}]: {exc}") from None
            row["regions"] = json.dumps(regions)
    except (ValueError, TypeError) as exc:
        row["data"] = None
        row["error"] = f"{row['path']}: {exc}"
    return row


def _images(column: pa.ChunkedArray) -> list:
    """Encoded bytes, or arrays from a Ray tensor column (ray.data.read_images)."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.to_pylist()
    if isinstance(column.type, pa.ExtensionType):
        arrays: list = []
        for chunk in column.chunks:
            arrays.extend(chunk.to_numpy())
        return arrays
    return column.to_pylist()


def _encoded(image) -> bytes:
    """An image as encoded bytes: arrays become lossless PNG, so the stages decode it to the
    same pixels."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"image: an array of {array.dtype} {array.shape} is not an 8-bit image")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _name(data: bytes | None) -> str:
    """What an error calls an image given without a path."""
    return f"image sha1:{hashlib.sha1(data or b'').hexdigest()[:12]}"


def finish_batch(batch: pa.Table, tasks: list[str]) -> pa.Table:
    """The stages' columns -> the output's (masks and one answer list per task); the user's
    columns as they came, in their order."""
    asked = _ASIDE + "question" in batch.column_names  # the rows carry their own questions
    columns = list(tasks) + (["answer"] if asked and "answer" not in tasks else [])
    masks, answers = [], {name: [] for name in columns}
    for row in batch.select(["regions", "captions", "error"]).to_pylist():
        if row["error"] or row["regions"] is None:
            masks.append(None)
            for name in columns:
                answers[name].append(None)
            continue
        regions = json.loads(row["regions"])
        captions = json.loads(row["captions"]) if row["captions"] else [{} for _ in regions]
        masks.append([{"size": r["size"], "counts": r["counts"]} for r in regions])
        for name in columns:
            answers[name].append([c.get(name) for c in captions])
    outputs = {*_OUTPUTS, *(TASK_COLUMNS.get(c, c) for c in columns)}
    user = [n for n in batch.column_names if n not in STAGE_SCHEMA.names]
    user = [n for n in user if n.removeprefix(_ASIDE) not in outputs]
    out = batch.select(user).rename_columns([n.removeprefix(_ASIDE) for n in user])
    out = out.append_column(pa.field("masks", MASK_TYPE), pa.array(masks, MASK_TYPE))
    for name in columns:
        out = out.append_column(
            pa.field(TASK_COLUMNS.get(name, name), pa.list_(pa.string())),
            pa.array(answers[name], pa.list_(pa.string())),
        )
    for name in ("width", "height", "error"):
        out = out.append_column(batch.schema.field(name), batch.column(name))
    return out
