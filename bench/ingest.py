"""Ingest throughput: our shard pipeline against a plain DataLoader over the original COCO files.

    python bench/ingest.py [--samples 1000] [--batch-size 8] [--workers 2] [--repeats 3]

The same synthetic shapes images are written once as a COCO instances file (polygon
segmentations) plus a PNG folder, and converted once into shards with the `coco` converter. Then,
side by side in one run, on the same cores (Ray gets `--workers` CPUs, the DataLoader `--workers`
worker processes), with the same tokenizer and ExampleConfig:

1. ours: shards -> Ray Data `build_dataset` -> `train_batches` (`iter_batches` + `collate`);
2. the reference: a torch DataLoader whose Dataset does per item what Osprey's stage-2 COCO dataset
   does (the JSON indexed once with pycocotools; the image read from disk and decoded by PIL; every
   polygon decoded at the image's size; regions sampled, conversation templated and tokenised, image
   preprocessed). Both must give identical samples, checked on a few of them (the check's real
   result is printed);
3. the share of a training step (tiny model, forward + backward + AdamW) spent waiting for data.

Both read in a random order by default, as training does: ours mixes its shards per epoch
(osprey.data.mix), the DataLoader shuffles with a seeded RandomSampler; `--no-shuffle` reads both
in file order. Each loader runs one untimed warm-up pass, then `--repeats` timed full passes,
interleaved; the table shows medians. Absolute figures depend on the machine and its load: compare the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ray stays on loopback; the forked DataLoader workers must not warn about tokenizer threads.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Each region's polygons are the outer contours of its exact mask: they decode back to it.
CONTOUR_OFFSET = 0.5  # skimage puts pixel centres at integers, COCO at integer + 0.5
WAIT_TARGET = 0.05  # data wait under 5% of the step time
CHECKED_SAMPLES = 8  # samples compared between the two loaders
# The pipeline's defaults before bench/ingest.py measured them, timed with --actor-baseline.
ACTOR_BASELINE = {"mappers": 1, "block_rows": 1000}  # then: one block per 1000-row shard


# --------------------------------------------------------------------------------------------
# Data: shapes images -> COCO instances JSON + PNG folder -> shards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    annotations: Path
    images: Path
    shards: Path
    tokenizer: Path
    samples: int
    regions: int
    image_size: int


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons [x1, y1, x2, y2, ...] of a mask's outer contours (holes are left out)."""
    from skimage import measure

    polygons = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.uint8), 0.5):
        x = contour[:, 1] - 1 + CONTOUR_OFFSET
        y = contour[:, 0] - 1 + CONTOUR_OFFSET
        # find_contours keeps the inside on one side: outer contours have positive area here.
        if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) <= 0 or len(x) < 3:
            continue
        polygons.append(np.stack([x, y], axis=1).ravel().round(2).tolist())
    return polygons


def write_coco(root: Path, n: int, seed: int, image_size: int) -> tuple[Path, Path, int]:
    """n shapes images as `root/images/*.png` + `root/instances.json`; returns the region count."""
    from osprey.data.shapes import COLOURS, SHAPES, ShapesConfig, encode_png, render_sample

    cfg = ShapesConfig(image_size=image_size, seed=seed)
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    categories = [
        {"id": k + 1, "name": name, "supercategory": name.split()[1]}
        for k, name in enumerate(names)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        scene = render_sample(np.random.default_rng([seed, i]), cfg)
        file_name = f"{i:06d}.png"
        (image_dir / file_name).write_bytes(encode_png(scene.image))
        h, w = scene.masks.shape[1:]
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for mask, label in zip(scene.masks, scene.labels, strict=True):
            polygons = mask_polygons(mask)
            if not polygons:
                continue
            ys, xs = np.nonzero(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category_id[label.category],
                    "segmentation": polygons,
                    "area": float(mask.sum()),
                    "bbox": [
                        float(xs.min()),
                        float(ys.min()),
                        float(xs.max() - xs.min() + 1),
                        float(ys.max() - ys.min() + 1),
                    ],
                    "iscrowd": 0,
                }
            )
    path = root / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path, image_dir, len(annotations)


def prepare_data(root: Path, n: int, seed: int, image_size: int, rows_per_shard: int) -> BenchData:
    """The COCO-form files, their shards (the `coco` converter) and a tokenizer, under root."""
    import osprey
    from osprey.data.converters import CocoInstances, ConversionStats, iter_rows
    from osprey.data.shapes import shapes_corpus
    from osprey.data.shards import write_shards
    from osprey.prompts import save_tokenizer, train_tokenizer

    annotations, images, regions = write_coco(root / "coco", n, seed, image_size)
    stats = ConversionStats()
    rows = iter_rows(CocoInstances(str(annotations), str(images)), stats, progress=False)
    write_shards(rows, str(root / "shards"), "shard", rows_per_shard)
    if stats.rows != n or stats.skipped_annotations or stats.skipped_entries:
        raise RuntimeError(f"the coco converter did not keep every sample: {stats.summary()}")
    vocab = osprey.get_config("tiny").llm.vocab_size
    save_tokenizer(train_tokenizer(shapes_corpus(), vocab_size=vocab), root / "tokenizer")
    return BenchData(
        annotations, images, root / "shards", root / "tokenizer", n, regions, image_size
    )


# --------------------------------------------------------------------------------------------
# The reference loader: a map-style Dataset over the COCO JSON + image folder
# --------------------------------------------------------------------------------------------


class CocoStage2Dataset(torch.utils.data.Dataset):
    """Per item, what Osprey's stage-2 COCO dataset does, ending in our ExampleBuilder's output.

    Like Osprey's `CustomDataset`: the JSON is indexed once by pycocotools; each item reads its
    image from disk, decodes *every* annotation's polygons with pycocotools at the image's size and
    keeps the masks (dense, as Osprey's loader hands them to the model). The row built in memory
    then goes through `ExampleBuilder` (regions sampled, conversation templated and tokenised,
    image decoded by PIL and preprocessed) exactly as a shard row does in our pipeline.
    """

    def __init__(self, annotations: Path, images: Path, tokenizer_dir: Path, config: Any) -> None:
        from pycocotools.coco import COCO

        from osprey.data.examples import ExampleBuilder
        from osprey.prompts import load_tokenizer

        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            self.coco = COCO(str(annotations))
        # Osprey trains only on images that have annotations.
        self.image_ids = [i for i in self.coco.getImgIds() if self.coco.getAnnIds(imgIds=[i])]
        self.images = Path(images)
        self.build = ExampleBuilder(load_tokenizer(tokenizer_dir), config)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from pycocotools import mask as mask_utils

        from osprey.data.masks import annotation_to_rle

        info = self.coco.loadImgs([self.image_ids[index]])[0]
        height, width = int(info["height"]), int(info["width"])
        regions, masks = [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[info["id"]])):
            mask = mask_utils.decode(annotation_to_rle(ann["segmentation"], height, width))
            area = float(mask.sum())
            if not area:  # the converter drops empty masks too, so region numbers agree
                continue
            regions.append(
                {
                    # ExampleBuilder passes counts through: an index back into `masks` here.
                    "counts": str(len(masks)).encode(),
                    "size": [height, width],
                    "bbox": ann["bbox"],
                    "area": area,
                    "category": self.coco.loadCats(ann["category_id"])[0]["name"],
                }
            )
            masks.append(mask)
        path = self.images / info["file_name"]
        row = {
            "sample_id": f"coco:{info['id']}",
            "source": "coco",
            "task": "category",
            "image_path": str(path),
            "image": path.read_bytes(),
            "width": width,
            "height": height,
            "regions": regions,
            "conversations": [],
        }
        example = self.build(row)
        chosen = [masks[int(counts)] for counts in example.pop("mask_counts")]
        example["masks"] = (
            torch.from_numpy(np.stack(chosen))
            if chosen
            else torch.zeros(0, height, width, dtype=torch.uint8)
        )
        return example


def collate_dense(examples: list[dict[str, Any]], pad_token_id: int = 0) -> Any:
    """DataLoader collate_fn: the pipeline's own `collate` padding, with masks already decoded."""
    from osprey.data.pipeline import collate

    batch = {key: [e[key] for e in examples] for key in examples[0] if key != "masks"}
    batch["mask_counts"] = [[] for _ in examples]
    out = collate(batch, pad_token_id)
    out.masks = [e["masks"] for e in examples if not e["error"]]
    return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class PassTiming:
    seconds: float
    first_batch: float  # seconds until the first batch (workers or actors starting)
    samples: int

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


@dataclass
class Loader:
    name: str
    batches: Callable[[], Iterable[Any]]  # a fresh pass over the data each call
    passes: list[PassTiming] = field(default_factory=list)
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample_id, reason)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(p, attr) for p in self.passes)


def sample_of(batch: Any, j: int) -> dict[str, torch.Tensor]:
    n = int(batch.attention_mask[j].sum())
    return {
        "input_ids": batch.input_ids[j, :n].clone(),
        "labels": batch.labels[j, :n].clone(),
        "images": batch.images[j].clone(),
        "masks": batch.masks[j].clone(),
    }


def time_pass(loader: Loader, keep: set[str]) -> PassTiming:
    """One full pass; keeps the samples whose ids are in `keep` for the equality check."""
    start = time.perf_counter()
    first = None
    samples = 0
    for batch in loader.batches():
        if first is None:
            first = time.perf_counter() - start
        samples += len(batch)
        for j, sample_id in enumerate(batch.sample_ids):
            if sample_id in keep:
                loader.kept[sample_id] = sample_of(batch, j)
        loader.skipped += batch.skipped
    return PassTiming(time.perf_counter() - start, first or 0.0, samples)


def compare_samples(a: Loader, b: Loader, sample_ids: Sequence[str]) -> list[str]:
    """What differs between the two loaders' tensors for these samples (empty: identical)."""
    problems = []
    for sample_id in sample_ids:
        x, y = a.kept.get(sample_id), b.kept.get(sample_id)
        if x is None or y is None:
            missing = a.name if x is None else b.name
            problems.append(f"{sample_id}: not produced by {missing}")
            continue
        problems += [f"{sample_id}: {key} differs" for key in x if not torch.equal(x[key], y[key])]
    return problems


@dataclass
class StepTiming:
    name: str
    first_wait: float  # the first batch's wait (pipeline start), not in the fraction
    waits: list[float]
    computes: list[float]

    @property
    def wait_fraction(self) -> float:
        return sum(self.waits) / (sum(self.waits) + sum(self.computes))


def time_training(name: str, batches: Iterable[Any], model: Any, steps: int) -> StepTiming:
    """forward + backward + AdamW on each batch; next(batch) time is the data wait."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    waits, computes = [], []
    iterator: Iterator[Any] = iter(batches)
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            break
        got = time.perf_counter()
        out = model(batch.input_ids, batch.attention_mask, batch.images, batch.masks, batch.labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        waits.append(got - start)
        computes.append(time.perf_counter() - got)
    close = getattr(iterator, "close", None)
    if close:
        close()
    if len(waits) < 2:
        raise ValueError("too few samples for two training steps; raise --samples")
    return StepTiming(name, waits[0], waits[1:], computes[1:])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="images (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader workers and Ray CPUs: the cores both get (default %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes each (default 3)")
    parser.add_argument(
        "--train-steps", type=int, help="training steps per loader (default: one full pass)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of this (the training) process (default %(default)s: the loaders' "
        "workers use the cores; a second thread on 2 busy cores made steps 3x slower)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="shapes image side")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="(default 1000)")
    parser.add_argument(
        "--actor-baseline",
        action="store_true",
        help="also time the pipeline's former defaults (one mapper actor, one block per file)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shuffle", action="store_true", help="read both loaders in file order")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    for name in ("samples", "batch_size", "workers", "repeats", "rows_per_shard", "torch_threads"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    return args


def start_ray(cpus: int) -> bool:
    """Start a loopback Ray with `cpus` CPUs unless one is up; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.init(
        address="local",  # a cluster of our own, even if `ray start` runs one on this machine
        num_cpus=cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def run(args: argparse.Namespace, root: Path) -> str:
    import ray

    import osprey
    from osprey.data.examples import ExampleConfig
    from osprey.data.pipeline import PipelineConfig, build_dataset, train_batches

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    data = prepare_data(root, args.samples, args.seed, args.image_size, args.rows_per_shard)
    prepared = time.perf_counter() - t0
    tiny = osprey.get_config("tiny")
    example_config = ExampleConfig(vision=tiny.vision, seed=args.seed)
    pad = tiny.llm.pad_token_id
    pipeline_config = PipelineConfig(shuffle=not args.no_shuffle)

    dataset = CocoStage2Dataset(data.annotations, data.images, data.tokenizer, example_config)

    def dataloader() -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=not args.no_shuffle,
            generator=torch.Generator().manual_seed(args.seed),
            num_workers=args.workers,
            collate_fn=lambda examples: collate_dense(examples, pad),
        )

    ds = build_dataset([str(data.shards)], str(data.tokenizer), example_config, pipeline_config)
    ours = Loader("Ray Data pipeline (shards)", lambda: train_batches(ds, args.batch_size, pad))
    reference = Loader(
        f"DataLoader (COCO JSON + PNG), {args.workers} workers", lambda: dataloader()
    )
    loaders = [reference, ours]
    keep = {f"coco:{i}" for i in dataset.image_ids[:CHECKED_SAMPLES]}

    for loader in loaders:  # warm-up: imports, page cache, Ray worker processes
        time_pass(loader, set())
    for r in range(args.repeats):
        for loader in loaders if r % 2 == 0 else loaders[::-1]:
            loader.passes.append(time_pass(loader, keep if r == 0 else set()))
    problems = compare_samples(ours, reference, sorted(keep))
    for loader in loaders:
        if loader.passes[0].samples != args.samples:
            problems.append(f"{loader.name}: {loader.passes[0].samples} of {args.samples} samples")
        problems += [f"{loader.name}: skipped {i} ({why})" for i, why in loader.skipped[:3]]

    steps = args.train_steps or -(-args.samples // args.batch_size)
    torch.manual_seed(args.seed)
    training = []
    for name, batches in (
        ("Ray Data pipeline", lambda: train_batches(ds, args.batch_size, pad)),
        ("DataLoader", dataloader),
    ):
        model = osprey.build_model(tiny, seed=args.seed).train()
        training.append(time_training(name, batches(), model, steps))

    if args.actor_baseline:
        # Last: while its actor runs, Ray reaps the idle task workers (beyond one per CPU) that
        # hold our pipeline's imports, so passes of ours right after it start cold.
        old = build_dataset(
            [str(data.shards)],
            str(data.tokenizer),
            example_config,
            PipelineConfig(**ACTOR_BASELINE),
        )
        baseline = Loader(
            "  the same, 1 mapper actor, 1 block/file",
            lambda: train_batches(old, args.batch_size, pad),
        )
        time_pass(baseline, set())
        baseline.passes = [time_pass(baseline, set()) for _ in range(args.repeats)]
        loaders.append(baseline)

    ratio = ours.median("rate") / reference.median("rate")
    lines = [
        f"ingest: {data.samples} samples ({data.image_size}x{data.image_size} PNG, "
        f"{data.regions / data.samples:.1f} regions/image), batch {args.batch_size}, "
        f"{int(ray.cluster_resources().get('CPU', 0))} Ray CPUs / {args.workers} DataLoader "
        f"workers on {os.cpu_count()} cores; median of {args.repeats} timed passes after a warm-up",
        f"pipeline: {pipeline_config}",
        f"data written and converted in {prepared:.1f} s; load average (1 min) {load_start:.1f} "
        f"at the start, {os.getloadavg()[0]:.1f} at the end (other processes share the cores)",
        "",
        f"{'loader':<44}{'samples/s':>10}{'pass s':>9}{'1st batch s':>13}  samples/s per pass",
    ]
    for loader in (ours, *loaders[2:], reference):
        each = " ".join(f"{p.rate:.0f}" for p in loader.passes)
        lines.append(
            f"{loader.name:<44}{loader.median('rate'):>10.1f}{loader.median('seconds'):>9.2f}"
            f"{loader.median('first_batch'):>13.2f}  {each}"
        )
    lines += [
        f"{'ratio pipeline / DataLoader':<44}{ratio:>9.2f}x",
        f"order: {'file order' if args.no_shuffle else 'shuffled (ours: per-epoch mix)'}",
        identical_line(problems, len(keep)),
        "",
        f"training step, tiny model, forward + backward + AdamW, batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads (first batch's wait not counted)",
        f"{'loader':<24}{'steps':>6}{'step ms':>9}{'wait ms':>9}{'data wait':>11}{'1st wait s':>12}",
    ]
    for t in training:
        step_ms = 1e3 * (sum(t.waits) + sum(t.computes)) / len(t.waits)
        lines.append(
            f"{t.name:<24}{len(t.waits):>6}{step_ms:>9.1f}{1e3 * statistics.mean(t.waits):>9.1f}"
            f"{t.wait_fraction:>11.1%}{t.first_wait:>12.2f}"
        )
    faster = ratio >= 1.0
    waits_ok = training[0].wait_fraction < WAIT_TARGET
    lines.append(
        f"target: pipeline not slower than the DataLoader: {'met' if faster else 'NOT met'}; "
        f"pipeline data wait < {WAIT_TARGET:.0%} of step time: {'met' if waits_ok else 'NOT met'}"
    )
    return "\n".join(lines)


def identical_line(problems: Sequence[str], checked: int) -> str:
    """The equality check's verdict, with the first differences when there are any."""
    what = f"{checked} samples: input_ids, labels, images, masks; every sample once, none skipped"
    if not problems:
        return f"identical batches: yes ({what})"
    return f"identical batches: NO ({what}): " + "; ".join(problems[:5])


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    started = start_ray(args.workers)
    try:
        with contextlib.ExitStack() as stack:
            if args.workdir:
                root = Path(args.workdir)
                root.mkdir(parents=True, exist_ok=False)
            else:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-")))
            table = run(args, root)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(table)
    return table


if __name__ == "__main__":
    main()
