"""The `osprey` command line: one sub-command per task, each a thin call into the package."""

from __future__ import annotations

import argparse
import sys


def _prepare(sub: argparse._SubParsersAction) -> None:
    from osprey.data.prepare import add_prepare_arguments, run_prepare

    parser = sub.add_parser("prepare", help="convert a data source into parquet shards")
    add_prepare_arguments(parser)
    parser.set_defaults(func=run_prepare)


def _train(sub: argparse._SubParsersAction) -> None:
    from osprey.train.entry import add_stage_arguments, run_one_stage

    parser = sub.add_parser("train", help="train one Osprey stage on Ray Train")
    add_stage_arguments(parser)
    parser.set_defaults(func=run_one_stage)


def _pipeline(sub: argparse._SubParsersAction) -> None:
    from osprey.train.entry import add_pipeline_arguments, run_pipeline

    parser = sub.add_parser("pipeline", help="train the three stages in order on Ray Train")
    add_pipeline_arguments(parser)
    parser.set_defaults(func=run_pipeline)


def _finetune(sub: argparse._SubParsersAction) -> None:
    from osprey.train.finetune import add_finetune_arguments, run_finetune

    parser = sub.add_parser(
        "finetune", help="fine-tune a model on your own shards (full, LoRA or QLoRA) on Ray Train"
    )
    add_finetune_arguments(parser)
    parser.set_defaults(func=run_finetune)


def _export(sub: argparse._SubParsersAction) -> None:
    from osprey.train.export import add_export_arguments, run_export

    parser = sub.add_parser("export", help="merge a LoRA adapter into its base model (--merge)")
    add_export_arguments(parser)
    parser.set_defaults(func=run_export)


def _caption(sub: argparse._SubParsersAction) -> None:
    from osprey.infer.job import add_caption_arguments, run_caption

    parser = sub.add_parser(
        "caption", help="segment and caption every region of a folder or s3:// prefix of images"
    )
    add_caption_arguments(parser)
    parser.set_defaults(func=run_caption)


def _eval(sub: argparse._SubParsersAction) -> None:
    from osprey.eval.job import add_eval_arguments, run_eval_command

    parser = sub.add_parser(
        "eval", help="score a model on one of the paper's benchmarks (or shapes) with Ray"
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=run_eval_command)


def _serve(sub: argparse._SubParsersAction) -> None:
    from osprey.serve.run import add_serve_arguments, run_serve

    parser = sub.add_parser(
        "serve", help="run the Ray Serve endpoint and its web page (like `serve run`)"
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve)


def _demo(sub: argparse._SubParsersAction) -> None:
    from osprey.train.config import add_bases_arguments, bases_from_args

    parser = sub.add_parser(
        "demo", help="the offline quickstart on the synthetic shapes data (tiny preset)"
    )
    parser.add_argument("--out", default="outputs/demo", help="folder for data and models")
    parser.add_argument("--images", type=int, default=600, help="synthetic images to generate")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--seed", type=int, default=0)
    add_bases_arguments(parser)
    parser.add_argument(
        "--rebuild-bases", action="store_true",
        help="pretrain the tiny bases here (~8 min) instead of installing the shipped ones",
    )  # fmt: skip
    parser.add_argument(
        "--verbose", action="store_true",
        help="show everything Ray, DeepSpeed and the libraries print (default: in OUT/quickstart.log)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a value in every stage config, e.g. --set epochs=1",
    )  # fmt: skip

    def run(args: argparse.Namespace) -> None:
        from osprey.quickstart import QuickstartConfig, run_quickstart

        run_quickstart(
            QuickstartConfig(
                out=args.out, n_images=args.images, workers=args.workers, seed=args.seed,
                bases=bases_from_args(args, seed=args.seed), overrides=tuple(args.overrides),
                rebuild_bases=args.rebuild_bases, verbose=args.verbose,
            )
        )  # fmt: skip

    parser.set_defaults(func=run)


def _bases(sub: argparse._SubParsersAction) -> None:
    from osprey.train.config import add_bases_arguments, bases_from_args

    parser = sub.add_parser(
        "bases",
        help="build the tiny preset's pretrained bases as a versioned artifact "
        "(the shipped one: --out osprey/assets/tiny_bases)",
    )
    parser.add_argument("--out", required=True, help="artifact folder (replaced)")
    parser.add_argument("--images", type=int, default=600, help="shapes images to pretrain on")
    parser.add_argument("--seed", type=int, default=0)
    add_bases_arguments(parser)

    def run(args: argparse.Namespace) -> None:
        from osprey.train.bases import build_bases_artifact

        out = build_bases_artifact(
            args.out, bases_from_args(args, seed=args.seed), n_images=args.images
        )
        print(f"bases artifact: {out}")

    parser.set_defaults(func=run)


def _info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="list the model presets and their sizes")

    def run(args: argparse.Namespace) -> None:
        import osprey

        for name in osprey.model.PRESETS:
            model = osprey.build_model(name, device="meta")
            n = sum(p.numel() for p in model.parameters())
            cfg = model.config
            print(
                f"{name:<10} {n / 1e6:>10,.1f} M params  image {cfg.vision.image_size}px "
                f"({cfg.vision.timm_model_name}), LLM {cfg.llm.num_hidden_layers} layers x "
                f"{cfg.llm.hidden_size}"
            )

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osprey", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _prepare,
        _train,
        _pipeline,
        _finetune,
        _export,
        _caption,
        _eval,
        _serve,
        _demo,
        _bases,
        _info,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"osprey {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
