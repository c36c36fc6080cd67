"""Command-line entry points for training: one stage, or the three stages chained."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from osprey.io.storage import add_s3_arguments, s3_options_from_args
from osprey.train.config import load_stage_config, shipped_configs

STAGES = ("stage1", "stage2", "stage3")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/run", help="checkpoints, exports, MLflow")
    parser.add_argument("--pipeline", default="osprey", help="name of the run (Ray, MLflow)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-failures", type=int, default=2, help="worker restarts allowed")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in output)")
    parser.add_argument(
        "--storage",
        help="checkpoint storage every node reaches: a shared path or s3://bucket/prefix "
        "(default: <output-dir>/ray)",
    )
    add_s3_arguments(parser)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a stage config value, e.g. --set lr=2e-5 (repeatable)",
    )


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str | None = None) -> None:
    parser.add_argument(
        "--config",
        default=None if stage is None else f"tiny/{stage}",
        required=stage is None,
        help=f"a stage YAML file or a shipped one: {', '.join(shipped_configs())}",
    )
    add_run_arguments(parser)
    from osprey.train.sizing import add_dry_run_arguments

    add_dry_run_arguments(parser)


def run_options(args: argparse.Namespace):
    from osprey.train.runner import RunOptions

    return RunOptions(
        output_dir=str(Path(args.output_dir).resolve()),
        pipeline=args.pipeline,
        num_workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        s3=s3_options_from_args(args),
    )


def run_one_stage(args: argparse.Namespace) -> int | None:
    from osprey.train.runner import configure_logging, run_stage

    options = run_options(args)
    stage = load_stage_config(args.config, args.overrides, output_dir=options.output_dir)
    if getattr(args, "dry_run", False):
        from osprey.train.sizing import run_dry_run

        return run_dry_run(stage, args)
    configure_logging()
    result = run_stage(stage, options)
    print(json.dumps(result.__dict__, indent=2))


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="config folder: tiny or osprey-7b")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    add_run_arguments(parser)


def run_pipeline(args: argparse.Namespace) -> None:
    """Stages in order; each starts from the previous one's export (`{output_dir}/stageN/model`)."""
    from osprey.train.runner import configure_logging, run_stage

    configure_logging()
    options = run_options(args)
    results = []
    tracker = options.tracker()
    with tracker.ending(tracker.pipeline_run(options.pipeline, running=True)):
        for name in args.stages:
            stage = load_stage_config(
                f"{args.preset}/{name}", args.overrides, output_dir=options.output_dir
            )
            results.append(run_stage(stage, options).__dict__)
    print(json.dumps(results, indent=2))


def stage_main(stage: str, argv: list[str] | None = None) -> None:
    """`python -m jobs.train_<stage>`: parse the command line and train that stage."""
    parser = argparse.ArgumentParser(
        prog=f"jobs.train_{stage}", description=f"Train Osprey {stage} on Ray Train."
    )
    add_stage_arguments(parser, stage)
    status = run_one_stage(parser.parse_args(argv))
    if status:
        raise SystemExit(status)


def pipeline_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jobs.train_pipeline", description="Train the Osprey stages in order on Ray Train."
    )
    add_pipeline_arguments(parser)
    run_pipeline(parser.parse_args(argv))
