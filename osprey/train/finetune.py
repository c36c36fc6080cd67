"""`osprey finetune`: stage-3-style training of a released or registered model on your shards.

Full fine-tuning or LoRA (QLoRA on a GPU) with the finetune presets' defaults
(configs/<preset>/finetune[-lora].yaml), on Ray Train + DeepSpeed, tracked in MLflow and
registered under the name the user gives, like the stages (runner.run_stage).
"""

from __future__ import annotations

import argparse
import json

from osprey.train.config import StageConfig, load_stage_config
from osprey.train.entry import add_run_arguments, run_options
from osprey.train.sizing import add_dry_run_arguments

METHODS = ("full", "lora", "qlora")


def finetune_config_name(preset: str, method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose from {', '.join(METHODS)}")
    return f"{preset}/finetune" if method == "full" else f"{preset}/finetune-lora"


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="the model to start from: a model directory, ORG/NAME[@REV] on the Hugging Face "
        "Hub, s3://BUCKET/PREFIX or models:/NAME@ALIAS (docs/models.md)",
    )  # fmt: skip
    parser.add_argument(
        "--data", nargs="+", required=True, help="shard folders (any converter's output)"
    )
    parser.add_argument("--name", required=True, help="registered model name (MLflow)")
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument(
        "--preset", default="osprey-7b", help="finetune defaults to start from: osprey-7b or tiny"
    )
    parser.add_argument("--config", help="a finetune YAML of your own (instead of the preset's)")
    lora = parser.add_argument_group("LoRA (override the preset's)")
    lora.add_argument("--rank", type=int)
    lora.add_argument("--alpha", type=float)
    lora.add_argument("--dropout", type=float)
    lora.add_argument("--targets", nargs="+", help="LLM projections to adapt, e.g. q_proj v_proj")
    lora.add_argument(
        "--train-parts", nargs="*", choices=("projector", "mask_extractor"),
        help="parts trained fully beside the adapters (default: both; none: give the flag alone)",
    )  # fmt: skip
    add_run_arguments(parser)
    add_dry_run_arguments(parser)
    parser.set_defaults(pipeline=None, workers=2)


def finetune_stage(args: argparse.Namespace, model: str, output_dir: str) -> StageConfig:
    """The stage config of the run: the preset's finetune file, the model, data and flags."""
    overrides = [f"init={json.dumps(model)}", f"data={json.dumps(list(args.data))}"]
    if args.method == "qlora":
        overrides.append("lora.quantize_4bit=true")
    for flag, key in (("rank", "rank"), ("alpha", "alpha"), ("dropout", "dropout")):
        if getattr(args, flag) is not None:
            overrides.append(f"lora.{key}={getattr(args, flag)}")
    if args.targets:
        overrides.append(f"lora.target_modules={json.dumps(args.targets)}")
    if args.train_parts is not None:
        overrides.append(f"trains={json.dumps(args.train_parts)}")
    config = args.config or finetune_config_name(args.preset, args.method)
    stage = load_stage_config(config, overrides + list(args.overrides), output_dir=output_dir)
    if args.method != "full" and stage.lora is None:
        raise ValueError(f"--method {args.method}: {config} has no `lora` block")
    return stage


def run_finetune(args: argparse.Namespace) -> int | None:
    from osprey.train.runner import configure_logging, run_stage

    args.pipeline = args.pipeline or args.name
    options = run_options(args)
    options.model_name = args.name
    # The model's name goes in as the stage's `init`: the runner pins it (a local path made
    # absolute, a hub revision its commit, a registry alias its version) and every worker
    # fetches it into its node's cache.
    stage = finetune_stage(args, args.model, options.output_dir)
    if args.dry_run:
        from osprey.train.sizing import run_dry_run

        return run_dry_run(stage, args)
    configure_logging()
    result = run_stage(stage, options)
    print(json.dumps(result.__dict__, indent=2))


def finetune_main(argv: list[str] | None = None) -> None:
    """`python -m jobs.finetune`: parse the command line and fine-tune."""
    parser = argparse.ArgumentParser(
        prog="jobs.finetune",
        description="Fine-tune Osprey (full or LoRA) on your own shards with Ray Train.",
    )
    add_finetune_arguments(parser)
    raise SystemExit(run_finetune(parser.parse_args(argv)))
