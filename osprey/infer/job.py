"""`osprey caption SRC --out DST --model DIR`: segment everything and caption every region of a
folder (or s3:// prefix) of images into parquet.

The work runs as Ray Data stages (osprey.infer.stages): reading and writing as tasks, and
between them the caption processor's (osprey.infer.processor) mask generator and captioner as
two actor pools sized and resourced separately (CPU/GPU fractions), streaming so memory stays
bounded whatever the collection's size. `--local` runs the same stages in this process. With
`--serve-app NAME` the regions go to a running Osprey Serve application's captioner instead of
model copies of the job's own. Output and resumption: osprey.io.output. At the end one summary
line: images, masks, errors, regions per second.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from osprey.cluster import init_ray
from osprey.data.images import DEFAULT_MAX_PIXELS
from osprey.infer.config import (
    ANSWER_TOKENS,
    CATEGORY_TOKENS,
    DETAILED_TOKENS,
    SHORT_TOKENS,
    EngineConfig,
    Task,
    question_task,
)
from osprey.infer.generation_args import add_generation_arguments, generation_from_args
from osprey.infer.processor import (
    CaptionProcessorConfig,
    build_caption_processor,
    caption_stage,
    segment_args,
)
from osprey.infer.remote import CAPTIONER
from osprey.infer.segment import ClassicalConfig, SamConfig, SegmenterConfig
from osprey.infer.stages import (
    IMAGE_EXTENSIONS,
    ReadStage,
    SegmentStage,
    WriteStage,
    list_images,
    new_row,
    read_batch,
    write_batch,
)
from osprey.io.output import OutputDir
from osprey.io.storage import (
    S3Options,
    add_s3_arguments,
    resolve,
    s3_options_from_args,
)


@dataclass(kw_only=True)
class ResourceConfig:
    """How the stages scale: actor-pool sizes, resources per actor, batch sizes."""

    segmenters: int = 1
    segmenter_cpus: float = 1.0
    segmenter_gpus: float = 0.0
    captioners: int = 1
    captioner_cpus: float = 1.0
    captioner_gpus: float = 0.0
    # CPUs reserved by each read or write task (they mostly wait on storage).
    io_cpus: float = 0.25
    segment_batch: int = 4  # images per segmenter call
    caption_batch: int = 8  # images per captioner call (their regions decode together)

    def __post_init__(self) -> None:
        if self.segmenters < 1 or self.captioners < 1:
            raise ValueError("--segmenters and --captioners must be >= 1")
        if self.segment_batch < 1 or self.caption_batch < 1:
            raise ValueError("--segment-batch and --caption-batch must be >= 1")
        for name in (
            "segmenter_cpus",
            "segmenter_gpus",
            "captioner_cpus",
            "captioner_gpus",
            "io_cpus",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")

    @property
    def logical_cpus(self) -> float:
        """CPUs the pools hold, plus room for reading and writing."""
        return (
            self.segmenters * self.segmenter_cpus
            + self.captioners * self.captioner_cpus
            + 4 * self.io_cpus
        )


@dataclass(kw_only=True)
class CaptionJobConfig:
    source: str
    out: str
    # A model directory with its tokenizer (ours or a release's), or any name osprey.io.models
    # resolves: ORG/NAME[@REV] on the Hugging Face Hub, s3://..., models:/NAME@ALIAS. Not with
    # `serve_app`, whose model answers.
    model: str | None = None
    serve_app: str | None = None  # a running Osprey Serve application to send the regions to
    tracking_uri: str | None = None  # MLflow registry for models:/ (default MLFLOW_TRACKING_URI)
    adapter: str | None = None  # a LoRA adapter (folder or model name) for `model`, unmerged
    detailed: bool = False  # also the detailed description (long: slow)
    question: str | None = None  # a free question with one <region>
    category_tokens: int = CATEGORY_TOKENS
    short_tokens: int = SHORT_TOKENS
    detailed_tokens: int = DETAILED_TOKENS
    answer_tokens: int = ANSWER_TOKENS
    engine: EngineConfig = field(default_factory=EngineConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    # Model weights' dtype (float32, bfloat16, float16); None keeps the checkpoint's.
    dtype: str | None = None
    # File extensions taken as images; None takes every file (non-images get error rows).
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = 512 * 2**20
    max_regions: int | None = None  # caption at most this many regions per image (largest)
    images_per_file: int = 16
    render: bool = False
    gallery_page_size: int = 100
    limit: int | None = None  # only the first N images of the listing
    s3: S3Options | None = None

    def __post_init__(self) -> None:
        if self.images_per_file < 1:
            raise ValueError(f"--images-per-file must be >= 1, got {self.images_per_file}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        if self.max_regions is not None and self.max_regions < 1:
            raise ValueError(f"--max-regions must be >= 1, got {self.max_regions}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or float16")
        if (self.model is None) == (self.serve_app is None):
            raise ValueError("give --model, or --serve-app to use a running application's model")
        if self.serve_app is not None and (self.adapter or self.dtype):
            raise ValueError("--adapter and --dtype are the Serve application's, not the job's")
        if self.serve_app is not None and self.engine.temperature != 0:
            raise ValueError(
                "a Serve application samples in its decoding modes only: "
                "use --decoding, not --temperature"
            )
        self.tasks()  # checks the question

    def tasks(self) -> list[Task]:
        from osprey.infer.engine import CATEGORY, DETAILED, SHORT

        tasks = [
            Task(CATEGORY.name, CATEGORY.question, self.category_tokens),
            Task(SHORT.name, SHORT.question, self.short_tokens),
        ]
        if self.detailed:
            tasks.append(Task(DETAILED.name, DETAILED.question, self.detailed_tokens))
        if self.question:
            tasks.append(question_task(self.question, self.answer_tokens))
        return tasks

    def identity(self) -> dict:
        """What decides the rows: a rerun over the same DST must ask for the same."""
        sam = self.segmenter.sam
        return {
            "source": _normalise(self.source),
            **(
                {"serve_app": self.serve_app}
                if self.serve_app is not None
                else {"model": _normalise(self.model)}
            ),
            **({"adapter": _normalise(self.adapter)} if self.adapter else {}),
            "tasks": [asdict(t) for t in self.tasks()],
            "template": self.engine.template,
            "sampling": [
                self.engine.decoding,
                self.engine.temperature,
                self.engine.top_p,
                self.engine.top_k,
                self.engine.seed,
            ],
            "segmenter": (
                {
                    "sam": {
                        k: v
                        for k, v in asdict(sam).items()
                        if k not in ("device", "upscale_budget_bytes")
                    }
                }
                if sam is not None
                else {"classical": asdict(self.segmenter.classical)}
            ),
            "extensions": list(self.extensions) if self.extensions is not None else None,
            "max_pixels": self.max_pixels,
            "max_regions": self.max_regions,
            "dtype": self.dtype,
        }

    @property
    def captioner_device(self) -> str:
        return "cuda" if self.resources.captioner_gpus > 0 else "cpu"


@dataclass
class CaptionSummary:
    listed: int = 0
    already_done: int = 0
    not_images: int = 0
    images: int = 0
    masks: int = 0
    errors: int = 0
    parts: int = 0
    duplicates_removed: int = 0
    seconds: float = 0.0
    out: str = ""
    gallery: str | None = None

    @property
    def regions_per_second(self) -> float:
        return self.masks / self.seconds if self.seconds > 0 else 0.0

    def add(self, row: dict) -> None:
        self.images += row["images"]
        self.masks += row["masks"]
        self.errors += row["errors"]
        self.parts += row["part"] is not None

    def __str__(self) -> str:
        text = (
            f"caption: {self.images} images captioned ({self.already_done} already done, "
            f"{self.not_images} files not images), {self.masks} masks, {self.errors} errors, "
            f"{self.parts} parts in {self.out}; {self.regions_per_second:.1f} regions/s "
            f"over {self.seconds:.1f} s"
        )
        if self.duplicates_removed:
            text += f"; removed {self.duplicates_removed} duplicate rows"
        if self.gallery:
            text += f"; gallery {self.gallery}"
        return text


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def check_model(model: str, tracking_uri: str | None = None, *, adapter: bool = False) -> str:
    """The model (or with `adapter`, the LoRA adapter) name pinned (a hub revision as its
    commit, a registry alias as its version), so every actor loads the same one; a local folder
    must be a model (adapter) folder. Fails before any work."""
    from osprey.io.models import pin_model

    pinned, _ = pin_model(model, tracking_uri=tracking_uri)
    if os.path.isdir(pinned):
        if adapter:
            from osprey.model.adapter import read_adapter_meta

            read_adapter_meta(pinned)
        else:
            from osprey.model.checkpoint import read_config

            read_config(pinned)
    return pinned


def run_caption_job(
    config: CaptionJobConfig, *, local: bool = False, ray_address: str | None = None
) -> CaptionSummary:
    """List SRC, skip images DST already holds, segment and caption the rest; see the module."""
    if config.model is not None:
        config.model = check_model(config.model, config.tracking_uri)
    if config.adapter:
        config.adapter = check_model(config.adapter, config.tracking_uri, adapter=True)
    source = resolve(config.source, config.s3)
    out = OutputDir(resolve(config.out, config.s3))
    listing = list_images(source, config.extensions, exclude=out.where.uri)
    out.ensure()
    out.check_job(config.identity())
    out.clean_temporary()
    images = listing.images[: config.limit] if config.limit is not None else listing.images
    done = out.done_images()
    todo = [p for p in images if p not in done]
    summary = CaptionSummary(
        listed=len(images),
        already_done=len(images) - len(todo),
        not_images=listing.not_images,
        out=out.where.uri,
    )
    began = time.perf_counter()
    if todo:
        rows = (
            _run_local(todo, config, source, out, ray_address)
            if local
            else _run_ray(todo, config, source, out, ray_address)
        )
        for row in rows:
            summary.add(row)
    summary.seconds = time.perf_counter() - began
    summary.duplicates_removed = out.repair_duplicates()
    if config.render:
        from osprey.infer.render import write_gallery

        summary.gallery = write_gallery(out, config.gallery_page_size)
    return summary


def processor_config(config: CaptionJobConfig) -> CaptionProcessorConfig:
    """The segment and caption part of the job, as the caption processor runs it."""
    res = config.resources
    return CaptionProcessorConfig(
        model=config.model,
        tasks=config.tasks(),
        answer_tokens=config.answer_tokens,
        engine=config.engine,
        segmenter=config.segmenter,
        adapter=config.adapter,
        tracking_uri=config.tracking_uri,
        dtype=config.dtype,
        s3=config.s3,
        max_pixels=config.max_pixels,
        max_regions=config.max_regions,
        max_file_bytes=config.max_file_bytes,
        concurrency=res.captioners,
        num_cpus=res.captioner_cpus,
        num_gpus=res.captioner_gpus,
        batch_size=res.caption_batch,
        segment_concurrency=res.segmenters,
        segment_num_cpus=res.segmenter_cpus,
        segment_num_gpus=res.segmenter_gpus,
        segment_batch_size=res.segment_batch,
        io_cpus=res.io_cpus,
        serve_app=config.serve_app,
        keep_data=config.render,
    )


def _io_args(config: CaptionJobConfig, source, out: OutputDir) -> tuple[dict, dict]:
    """Constructor arguments of the read and write stages (the same for both runners)."""
    return (
        {"source": source, "max_bytes": config.max_file_bytes},
        {"out": out, "render": config.render, "max_pixels": config.max_pixels},
    )


def _run_local(
    todo: list[str], config: CaptionJobConfig, source, out: OutputDir, address: str | None
) -> Iterator[dict]:
    read_args, write_args = _io_args(config, source, out)
    processing = processor_config(config)
    # Only a Serve application's handles need Ray; the local run is otherwise Ray-free.
    started = init_ray(address, num_cpus=1) if config.serve_app is not None else False
    try:
        if config.serve_app is not None:
            check_serve_app(config.serve_app)
        read = ReadStage(**read_args)
        segment = SegmentStage(**segment_args(processing))
        stage, caption_args = caption_stage(processing)
        caption = stage(**caption_args)
        write = WriteStage(**write_args)
        step = config.images_per_file
        with tqdm(total=len(todo), desc="caption", unit="img") as bar:
            for start in range(0, len(todo), step):
                rows = read.process([new_row(p) for p in todo[start : start + step]])
                rows = caption.process(segment.process(rows))
                yield from write.process(rows)
                bar.update(len(rows))
    finally:
        if started:
            import ray

            ray.shutdown()


def _run_ray(
    todo: list[str], config: CaptionJobConfig, source, out: OutputDir, address: str | None
) -> Iterator[dict]:
    import ray

    res = config.resources
    # Enough logical CPUs for both pools and the I/O tasks that feed them.
    started = init_ray(address, num_cpus=max(_cpu_count(), res.logical_cpus))
    try:
        if config.serve_app is not None:
            check_serve_app(config.serve_app)
        read_args, write_args = _io_args(config, source, out)
        blocks = max(1, math.ceil(len(todo) / res.segment_batch))
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
        ds = ds.map_batches(
            read_batch,
            fn_kwargs=read_args,
            batch_size=res.segment_batch,
            batch_format="pyarrow",
            num_cpus=res.io_cpus,
        )
        ds = build_caption_processor(processor_config(config)).stages(ds)
        ds = ds.map_batches(
            write_batch,
            fn_kwargs=write_args,
            batch_size=config.images_per_file,
            batch_format="pyarrow",
            num_cpus=res.io_cpus,
        )
        yield from ds.iter_rows()
    finally:
        if started:
            ray.shutdown()


def check_serve_app(name: str, deployment: str = CAPTIONER) -> None:
    """Fails, naming the application, unless it runs with its captioner."""
    from ray import serve

    try:
        serve.get_deployment_handle(deployment, app_name=name)
    except Exception as exc:
        raise ValueError(
            f"--serve-app {name}: no running Serve application of that name with a "
            f"{deployment} deployment ({type(exc).__name__}: {exc})"
        ) from exc


def _normalise(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _cpu_count() -> int:
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="SRC", help="folder or s3:// prefix of images (or one image)"
    )
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix (DST)")
    parser.add_argument(
        "--model",
        help="a model directory (ours or a release's), ORG/NAME[@REV] on the Hugging Face Hub, "
        "s3://BUCKET/PREFIX or models:/NAME@ALIAS (or --serve-app)",
    )
    parser.add_argument(
        "--serve-app",
        metavar="NAME",
        help="caption through this running Osprey Serve application (`osprey serve` names it "
        "osprey) instead of loading the model: batch and online traffic share its replicas",
    )
    parser.add_argument("--tracking-uri", help="MLflow registry for models:/ (default: env)")
    parser.add_argument(
        "--adapter", help="a LoRA adapter folder (osprey finetune's) applied to --model, unmerged"
    )
    tasks = parser.add_argument_group("what to ask of every region (category and short always)")
    tasks.add_argument("--detailed", action="store_true", help="also a detailed description")
    tasks.add_argument("--question", help="also a free question naming the region as <region>")
    for name, default in (
        ("category", CATEGORY_TOKENS), ("short", SHORT_TOKENS),
        ("detailed", DETAILED_TOKENS), ("answer", ANSWER_TOKENS),
    ):  # fmt: skip
        tasks.add_argument(
            f"--{name}-tokens", type=int,
            help=f"new tokens per {name} answer (default {default}; --decoding reference: 1024)",
        )  # fmt: skip
    add_generation_arguments(parser, template_help="prompt template (default osprey_v1)")

    seg = parser.add_argument_group(
        "segmentation (SAM with --sam-weights, else the classical segmenter)"
    )
    seg.add_argument("--sam-weights", help="local transformers SamModel directory")
    seg.add_argument("--points-per-side", type=int, default=32)
    seg.add_argument("--points-per-batch", type=int, default=64)
    seg.add_argument("--pred-iou-thresh", type=float, default=0.88)
    seg.add_argument("--stability-score-thresh", type=float, default=0.95)
    seg.add_argument("--box-nms-thresh", type=float, default=0.7)
    seg.add_argument(
        "--crop-n-layers", type=int, default=0, help="SAM's zoomed-in crop layers (0: none)"
    )
    seg.add_argument("--min-mask-region-area", type=int, default=0, help="pixels (SAM)")
    seg.add_argument("--classical-scale", type=float, default=ClassicalConfig.scale)
    seg.add_argument("--classical-sigma", type=float, default=ClassicalConfig.sigma)
    seg.add_argument(
        "--min-area-fraction",
        type=float,
        default=ClassicalConfig.min_area_fraction,
        help="classical: smallest region as a fraction of the image",
    )
    seg.add_argument("--max-regions", type=int, help="caption only the N largest regions")

    res = parser.add_argument_group("scaling")
    res.add_argument("--segmenters", type=int, default=1, help="mask-generator actors")
    res.add_argument("--segmenter-cpus", type=float, default=1.0)
    res.add_argument("--segmenter-gpus", type=float, default=0.0)
    res.add_argument("--captioners", type=int, default=1, help="captioner actors")
    res.add_argument("--captioner-cpus", type=float, default=1.0)
    res.add_argument("--captioner-gpus", type=float, default=0.0)
    res.add_argument("--segment-batch", type=int, default=4)
    res.add_argument("--caption-batch", type=int, default=8)
    res.add_argument("--images-per-file", type=int, default=16)
    res.add_argument("--local", action="store_true", help="run in this process, without Ray")
    res.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS, else local)")

    inp = parser.add_argument_group("input and output")
    inp.add_argument(
        "--all-files", action="store_true", help="take every file, not only image extensions"
    )
    inp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    inp.add_argument("--limit", type=int, help="only the first N images")
    inp.add_argument("--render", action="store_true", help="overlay PNGs and an HTML gallery")
    add_s3_arguments(inp)


def config_from_args(args: argparse.Namespace) -> CaptionJobConfig:
    sam = None
    if args.sam_weights:
        sam = SamConfig(
            weights=args.sam_weights,
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            box_nms_thresh=args.box_nms_thresh,
            crop_n_layers=args.crop_n_layers,
            min_mask_region_area=args.min_mask_region_area,
        )
    classical = ClassicalConfig(
        scale=args.classical_scale,
        sigma=args.classical_sigma,
        min_area_fraction=args.min_area_fraction,
    )
    s3 = s3_options_from_args(args)
    generation = generation_from_args(args)
    return CaptionJobConfig(
        source=args.source,
        out=args.out,
        model=args.model,
        serve_app=args.serve_app,
        tracking_uri=args.tracking_uri,
        adapter=args.adapter,
        detailed=args.detailed,
        question=args.question,
        category_tokens=args.category_tokens or generation.max_new_tokens(CATEGORY_TOKENS),
        short_tokens=args.short_tokens or generation.max_new_tokens(SHORT_TOKENS),
        detailed_tokens=args.detailed_tokens or generation.max_new_tokens(DETAILED_TOKENS),
        answer_tokens=args.answer_tokens or generation.max_new_tokens(ANSWER_TOKENS),
        engine=generation.engine(default_template="osprey_v1", max_batch_images=args.caption_batch),
        segmenter=SegmenterConfig(sam=sam, classical=classical),
        resources=ResourceConfig(
            segmenters=args.segmenters,
            segmenter_cpus=args.segmenter_cpus,
            segmenter_gpus=args.segmenter_gpus,
            captioners=args.captioners,
            captioner_cpus=args.captioner_cpus,
            captioner_gpus=args.captioner_gpus,
            segment_batch=args.segment_batch,
            caption_batch=args.caption_batch,
        ),
        dtype=generation.dtype,
        extensions=None if args.all_files else IMAGE_EXTENSIONS,
        max_pixels=args.max_pixels,
        max_regions=args.max_regions,
        images_per_file=args.images_per_file,
        render=args.render,
        limit=args.limit,
        s3=s3,
    )


def run_caption(args: argparse.Namespace) -> CaptionSummary:
    """The `osprey caption` command: run the job, print the summary line, return it."""
    summary = run_caption_job(
        config_from_args(args), local=args.local, ray_address=args.ray_address
    )
    print(summary)
    return summary
