"""`osprey eval --benchmark NAME --model DIR --data ROOT`: one benchmark as a Ray job.

The driver reads the benchmark's annotations (osprey.eval.readers) into items, one per image;
Ray Data streams them through a pool of answering actors (osprey.eval.answer, each holding the
model) sized and resourced like the captioning job's; the predictions, one row per region (or
POPE question), are committed as parquet parts under `OUT/predictions/` (a rerun over the same
OUT answers only the items no part holds yet, so a killed job resumes); the driver then scores them
with the paper's metric (osprey.eval.benchmarks), writes `OUT/metrics.json` and logs the metrics
to MLflow beside the model's training run (osprey.tracking). `--local` runs the same stage
in this process. Decoding is greedy by default (the reference scripts sample at temperature
0.2), so a rerun gives the same predictions and the same scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from osprey.cluster import init_ray
from osprey.eval.benchmarks import BENCHMARKS, BenchmarkData, get_benchmark
from osprey.eval.readers import ITEM_FIELDS
from osprey.infer.config import EngineConfig, GenerationOptions
from osprey.infer.generation_args import add_generation_arguments, generation_from_args
from osprey.io.output import OutputDir
from osprey.io.storage import (
    add_s3_arguments,
    resolve,
    s3_options_from_args,
)

ITEM_SCHEMA = pa.schema(
    [pa.field(name, pa.binary() if name == "image" else pa.string()) for name in ITEM_FIELDS]
)


@dataclass(kw_only=True)
class EvalResources:
    """The answering actors: how many, what each holds, items per call."""

    evaluators: int = 1
    evaluator_cpus: float = 1.0
    evaluator_gpus: float = 0.0
    batch: int = 8  # images per call (their regions decode together)

    def __post_init__(self) -> None:
        if self.evaluators < 1 or self.batch < 1:
            raise ValueError("--evaluators and --batch must be >= 1")
        if self.evaluator_cpus < 0 or self.evaluator_gpus < 0:
            raise ValueError("--evaluator-cpus and --evaluator-gpus must be >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    benchmark: str
    model: str  # a model directory, or any name osprey.io.models resolves
    adapter: str | None = None  # a LoRA adapter (folder or model name) for `model`, unmerged
    data: BenchmarkData = field(default_factory=BenchmarkData)
    out: str | None = None  # default: see default_out
    max_new_tokens: int | None = None  # None: the benchmark's (the reference mode's 1024)
    # Decoding (greedy by default), template (None: the benchmark's), batch rows, dtype.
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    limit: int | None = None  # only the first N items (images, or POPE questions)
    resources: EvalResources = field(default_factory=EvalResources)
    overwrite: bool = False  # drop OUT's predictions instead of resuming from them
    mlflow: bool = True
    tracking_uri: str | None = None  # default: beside the model, else OUT/mlflow.db
    model_run: str | None = None  # the model's MLflow run; default: found from the model path
    experiment: str = "osprey"

    def __post_init__(self) -> None:
        get_benchmark(self.benchmark)
        if self.out is None:
            self.out = default_out(self.evaluated, self.benchmark)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        self.engine()  # checks template and sampling

    @property
    def evaluated(self) -> str:
        """The folder training exported (its MLflow run is the model's): the adapter's, if any."""
        return self.adapter or self.model

    def engine(self) -> EngineConfig:
        return self.generation.engine(
            default_template=get_benchmark(self.benchmark).template,
            max_batch_images=self.resources.batch,
        )

    def tokens(self) -> int:
        bench = get_benchmark(self.benchmark)
        return self.max_new_tokens or self.generation.max_new_tokens(bench.max_new_tokens)

    def identity(self) -> dict[str, Any]:
        """What decides the predictions: a rerun over the same OUT must ask for the same."""
        data = asdict(self.data)
        data.pop("s3", None)
        for key in ("class_names", "scoring"):
            data.pop(key, None)  # used in scoring only
        return {
            "benchmark": self.benchmark,
            "model": _normalise(self.model),
            **({"adapter": _normalise(self.adapter)} if self.adapter else {}),
            "data": {
                k: _normalise(v) if isinstance(v, str) and k != "split" else v
                for k, v in data.items()
            },
            "question": get_benchmark(self.benchmark).question,
            "template": self.engine().template,
            "max_new_tokens": self.tokens(),
            "sampling": self.generation.sampling_record(),
            "dtype": self.generation.dtype,
        }


def default_out(model: str, benchmark: str) -> str:
    """<output>/eval/<stage>/<benchmark> for a model (or adapter) the training stages exported
    (<output>/<stage>/model or adapter), else outputs/eval/<benchmark>."""
    if "://" not in model:
        path = os.path.abspath(model)
        stage_dir = os.path.dirname(path)
        output = os.path.dirname(stage_dir)
        if os.path.basename(path) in ("model", "adapter") and os.path.exists(
            os.path.join(output, "mlflow.db")
        ):
            return os.path.join(output, "eval", os.path.basename(stage_dir), benchmark)
    return os.path.join("outputs", "eval", benchmark)


@dataclass
class EvalResult:
    benchmark: str
    metrics: dict[str, float]
    predictions: str  # folder URI
    items: int
    seconds: float
    already_done: int = 0  # items whose predictions an earlier run of OUT had committed
    run_id: str | None = None
    model_run_id: str | None = None

    def __str__(self) -> str:
        bench = get_benchmark(self.benchmark)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in self.metrics.items())
        text = f"eval {self.benchmark}: {shown} ({self.items} items in {self.seconds:.1f} s"
        text += f", {self.already_done} answered before)" if self.already_done else ")"
        if bench.paper:
            paper = ", ".join(f"{k} {v:.2f}" for k, v in bench.paper.items())
            text += f"\n  paper (Osprey-7B): {paper}"
        text += f"\n  predictions: {self.predictions}"
        if self.run_id:
            text += f"\n  MLflow run {self.run_id}"
            if self.model_run_id:
                text += f" (child of the model's run {self.model_run_id})"
        return text


def run_eval(
    config: EvalConfig, *, local: bool = False, ray_address: str | None = None
) -> EvalResult:
    from osprey.infer.job import check_model

    # A hub revision or registry alias pinned, so every evaluator loads (and MLflow records)
    # the same model.
    config.model = check_model(config.model, config.tracking_uri)
    if config.adapter:
        config.adapter = check_model(config.adapter, config.tracking_uri, adapter=True)
    bench = get_benchmark(config.benchmark)
    began = time.perf_counter()
    items, context = bench.read(config.data)
    if config.limit is not None:
        items = items[: config.limit]
    if not items:
        raise ValueError(f"{config.benchmark}: the annotations hold no items to evaluate")
    out = resolve(config.out, config.data.s3)
    predictions, todo = _open_predictions(config, OutputDir(out.child("predictions")), items)
    stage = {
        "model_dir": config.model,
        "tracking_uri": config.tracking_uri,
        "adapter": config.adapter,
        "question": bench.question,
        "max_new_tokens": config.tokens(),
        "engine": config.engine(),
        "device": "cuda" if config.resources.evaluator_gpus > 0 else "cpu",
        "dtype": config.generation.dtype,
        "s3": config.data.s3,
        "out": predictions,
    }
    if todo and local:
        _run_local(todo, stage, config.resources.batch)
    elif todo:
        _run_ray(todo, stage, config.resources, ray_address)
    wanted = {item["item_id"] for item in items}
    frame = read_predictions(predictions)
    frame = frame[frame["item_id"].isin(wanted)].reset_index(drop=True)
    metrics = bench.score(items, frame, context, config.data)
    seconds = time.perf_counter() - began
    with out.fs.open_output_stream(out.child("metrics.json").path) as stream:
        # The decoding mode beside the scores: sampled numbers are not greedy ones.
        sampling = config.generation.sampling_record()
        record = {"decoding": sampling["decoding"]}
        if sampling["decoding"] == "reference":
            record["seed"] = sampling["seed"]
        stream.write(json.dumps(metrics | record, indent=2).encode())
    result = EvalResult(
        config.benchmark,
        metrics,
        predictions.where.uri,
        len(items),
        seconds,
        already_done=len(items) - len(todo),
    )
    if config.mlflow:
        result.run_id, result.model_run_id = _log(config, metrics)
    return result


def _open_predictions(
    config: EvalConfig, predictions: OutputDir, items: list[dict[str, Any]]
) -> tuple[OutputDir, list[dict[str, Any]]]:
    """Prepare OUT/predictions (emptied with --overwrite, else checked to hold predictions of the
    same options); returns it and the items no committed part holds yet."""
    where = predictions.where
    if config.overwrite and where.fs.get_file_info(where.path).type != pafs.FileType.NotFound:
        where.fs.delete_dir_contents(where.path, missing_dir_ok=True)
    predictions.ensure()
    predictions.clean_temporary()
    predictions.check_job(config.identity())
    done = done_items(predictions)
    return predictions, [item for item in items if item["item_id"] not in done]


def _log(config: EvalConfig, metrics: dict[str, float]) -> tuple[str, str | None]:
    from osprey.tracking import find_tracking_uri, log_evaluation

    return log_evaluation(
        config.tracking_uri or find_tracking_uri(config.evaluated, config.out),
        config.benchmark,
        config.evaluated,
        metrics,
        _describe(config),
        model_run=config.model_run,
        experiment=config.experiment,
    )


def _items_table(items: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(items, schema=ITEM_SCHEMA)


def _run_local(items, stage: dict, batch: int) -> None:
    from tqdm import tqdm

    from osprey.eval.answer import AnswerStage

    answer = AnswerStage(**stage)
    for start in tqdm(range(0, len(items), batch), desc="eval", unit="batch"):
        chunk = items[start : start + batch]
        answer.commit(chunk, answer.process(chunk))


def _run_ray(items, stage: dict, res: EvalResources, address) -> None:
    import ray

    from osprey.eval.answer import AnswerStage

    started = init_ray(address, num_cpus=res.evaluators * res.evaluator_cpus + 1)
    try:
        blocks = max(1, math.ceil(len(items) / res.batch))
        ds = ray.data.from_arrow(_items_table(items)).repartition(blocks)
        ds = ds.map_batches(
            AnswerStage,
            fn_constructor_kwargs=stage,
            batch_size=res.batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=res.evaluators),
            num_cpus=res.evaluator_cpus,
            num_gpus=res.evaluator_gpus,
        )
        for _ in ds.iter_rows():  # each row: one committed part
            pass
    finally:
        if started:
            ray.shutdown()


def done_items(predictions: OutputDir) -> set[str]:
    """Items some committed part holds (a part holds all rows of its items)."""
    done: set[str] = set()
    for path in predictions.parts():
        done.update(predictions.read_column(path, ["item_id"]).column(0).to_pylist())
    return done


def read_predictions(predictions: OutputDir):
    """All committed rows, one per (item, region): a copy left by an orphaned writer of a killed
    run is dropped."""
    from osprey.eval.answer import PREDICTION_SCHEMA

    tables = [
        pq.read_table(path, schema=PREDICTION_SCHEMA, filesystem=predictions.where.fs)
        for path in predictions.parts()
    ]
    frame = (
        pa.concat_tables(tables).to_pandas()
        if tables
        else PREDICTION_SCHEMA.empty_table().to_pandas()
    )
    frame = frame.drop_duplicates(["item_id", "region_id"], keep="first")
    return frame.sort_values(
        ["item_id", "region_id"], na_position="first", kind="stable"
    ).reset_index(drop=True)


def _normalise(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _describe(config: EvalConfig) -> dict[str, Any]:
    data = asdict(config.data)
    data.pop("s3", None)
    return {
        "benchmark": config.benchmark,
        "model": config.model,
        "adapter": config.adapter,
        "data": data,
        "out": config.out,
        "template": config.engine().template,
        "max_new_tokens": config.tokens(),
        **config.generation.sampling_record(),
        "limit": config.limit,
        "dtype": config.generation.dtype,
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def benchmarks_help() -> str:
    """The benchmark table of `osprey eval --help`: data layout and the paper's numbers."""
    lines = ["benchmarks (files under --data; Osprey-7B's numbers from the paper):"]
    for bench in BENCHMARKS.values():
        paper = ", ".join(f"{k} {v:g}" for k, v in bench.paper.items()) or bench.paper_note
        if bench.paper and bench.paper_note:
            paper += f" ({bench.paper_note})"
        lines.append(f"  {bench.name:<11} {bench.title}: {bench.metrics}")
        lines.append(f"  {'':<11} data: {bench.layout}")
        lines.append(f"  {'':<11} paper: {paper}")
        lines.append(
            f"  {'':<11} run:   osprey eval --benchmark {bench.name} --model MODEL --data DIR"
        )
    lines.append("details: docs/evaluation.md")
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = benchmarks_help()
    parser.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    parser.add_argument(
        "--model",
        required=True,
        help="a model directory (ours or a release's), ORG/NAME[@REV] on the Hugging Face Hub, "
        "s3://BUCKET/PREFIX or models:/NAME@ALIAS (with --tracking-uri or MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--adapter", help="a LoRA adapter folder (osprey finetune's) applied to --model, unmerged"
    )
    parser.add_argument("--out", help="folder or s3:// prefix for predictions and metrics.json")
    parser.add_argument(
        "--overwrite", action="store_true", help="drop OUT's predictions instead of resuming"
    )
    data = parser.add_argument_group("benchmark files (default: the layout under --data)")
    data.add_argument("--data", help="the benchmark's folder, laid out as listed below")
    data.add_argument("--annotations", help="the annotation file")
    data.add_argument("--images", help="the image folder (shapes: the val/ shard folder)")
    data.add_argument("--panoptic", help="ADE20K/Cityscapes: the panoptic PNG folder")
    data.add_argument(
        "--instances",
        help="RefCOCOg from refs(umd).p: COCO's instances.json; ADE20K: its instance JSON "
        "(default ade20k_instance_val.json)",
    )
    data.add_argument(
        "--ground-truth", help="Cityscapes: the gtFine/val folder (default: under --data)"
    )
    data.add_argument(
        "--scoring",
        choices=("reference", "coco"),
        default="reference",
        help="ADE20K/Cityscapes: the paper's evaluators and ground-truth files (reference), or "
        "everything from the panoptic PNGs with COCOeval (coco); docs/evaluation.md",
    )
    data.add_argument("--split", default="val", help="RefCOCOg from refs(umd).p: the split")
    data.add_argument(
        "--class-names",
        help="ADE20K/Cityscapes: a file of '<id>:<name>,<synonym>' lines in the JSON's category "
        "order, or 'json' for the JSON's names (default: the paper's, osprey/eval/classes/)",
    )
    data.add_argument("--limit", type=int, help="only the first N images (POPE: questions)")
    add_s3_arguments(data)
    gen = add_generation_arguments(
        parser, template_help="prompt template (default: the benchmark's)"
    )
    gen.add_argument("--max-new-tokens", type=int, help="default: the benchmark's")
    res = parser.add_argument_group("scaling")
    res.add_argument("--evaluators", type=int, default=1, help="answering actors (model copies)")
    res.add_argument("--evaluator-cpus", type=float, default=1.0)
    res.add_argument("--evaluator-gpus", type=float, default=0.0)
    res.add_argument("--batch", type=int, default=8, help="images per actor call")
    res.add_argument("--local", action="store_true", help="run in this process, without Ray")
    res.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS, else local)")
    track = parser.add_argument_group("MLflow")
    track.add_argument("--tracking-uri", help="default: the mlflow.db beside the model's training")
    track.add_argument("--model-run", help="the model's MLflow run id (default: found by path)")
    track.add_argument("--experiment", default="osprey")
    track.add_argument("--no-mlflow", action="store_true", help="only write metrics.json")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    s3 = s3_options_from_args(args)
    return EvalConfig(
        benchmark=args.benchmark,
        model=args.model,
        adapter=args.adapter,
        out=args.out,
        data=BenchmarkData(
            root=args.data,
            annotations=args.annotations,
            images=args.images,
            panoptic=args.panoptic,
            instances=args.instances,
            ground_truth=args.ground_truth,
            scoring=args.scoring,
            class_names=args.class_names,
            split=args.split,
            s3=s3,
        ),
        max_new_tokens=args.max_new_tokens,
        generation=generation_from_args(args),
        limit=args.limit,
        resources=EvalResources(
            evaluators=args.evaluators,
            evaluator_cpus=args.evaluator_cpus,
            evaluator_gpus=args.evaluator_gpus,
            batch=args.batch,
        ),
        overwrite=args.overwrite,
        mlflow=not args.no_mlflow,
        tracking_uri=args.tracking_uri,
        model_run=args.model_run,
        experiment=args.experiment,
    )


def run_eval_command(args: argparse.Namespace) -> EvalResult:
    """The `osprey eval` command: run the benchmark, print the scores, return them."""
    result = run_eval(config_from_args(args), local=args.local, ray_address=args.ray_address)
    print(result)
    return result
