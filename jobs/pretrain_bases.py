r"""Pretrain the tiny stand-in bases (vision tower and LLM) on a shapes data set, on Ray.

    python -m jobs.prepare shapes --out data/shapes --n 2000
    ray job submit --working-dir . -- python -m jobs.pretrain_bases \
        --shapes-dir data/shapes --out outputs/bases

Writes out/{tokenizer,vision,llm} and out/osprey_config.json (the `tiny` config pointing at
them). Run without `ray job submit`, it starts a local Ray instance. The work is in
osprey.train.bases.
"""

from __future__ import annotations

import argparse

from osprey.model.config import OspreyConfig
from osprey.train.bases import CONFIG_FILE, prepare_bases_on_ray
from osprey.train.config import add_bases_arguments, bases_from_args


def main(argv: list[str] | None = None) -> OspreyConfig:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.pretrain_bases",
        description="Pretrain the tiny vision tower and LLM on a shapes data set, in a Ray task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--shapes-dir", required=True, help="a data set from `prepare shapes`")
    parser.add_argument("--out", required=True, help="output directory")
    add_bases_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the task holds")
    parser.add_argument(
        "--ray-address", help="cluster to join (default: RAY_ADDRESS, else a new local one)"
    )
    args = parser.parse_args(argv)
    config = prepare_bases_on_ray(
        args.out,
        args.shapes_dir,
        bases_from_args(args, seed=args.seed),
        num_cpus=args.num_cpus,
        ray_address=args.ray_address,
    )
    print(f"bases ready: {args.out}/{CONFIG_FILE}")
    return config


if __name__ == "__main__":
    main()
