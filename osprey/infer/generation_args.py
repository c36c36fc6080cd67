"""The generation argument group shared by `osprey caption` and `osprey eval`."""

from __future__ import annotations

import argparse

from osprey.infer.config import DECODING_MODES, GenerationOptions


def add_generation_arguments(
    parser: argparse.ArgumentParser, *, template_help: str
) -> argparse._ArgumentGroup:
    defaults = GenerationOptions()
    gen = parser.add_argument_group("generation (greedy by default)")
    gen.add_argument(
        "--decoding",
        choices=DECODING_MODES,
        default=defaults.decoding,
        help="greedy (deterministic), or reference: the released code's sampling (temperature "
        "0.2, top-p/top-k from the model's generation_config.json, up to 1024 new tokens, "
        "seeded by --seed, default 0); --temperature/--top-p/--top-k are then ignored",
    )
    gen.add_argument("--template", help=template_help)
    gen.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="0 (default) is greedy"
    )
    gen.add_argument("--top-p", type=float, default=defaults.top_p)
    gen.add_argument("--top-k", type=int, default=defaults.top_k, help="0: no top-k cut")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument(
        "--max-batch-regions",
        type=int,
        default=defaults.max_batch_regions,
        help="rows of one decode batch",
    )
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    return gen


def generation_from_args(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(
        decoding=args.decoding,
        template=args.template,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_batch_regions=args.max_batch_regions,
        dtype=args.dtype,
    )
