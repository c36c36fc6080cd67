r"""Convert a source data set into shards on a Ray cluster.

    ray job submit --working-dir . -- python -m jobs.prepare coco \
        --annotations data/coco/annotations/instances_train2017.json --images data/coco/imgs \
        --out data/shards/coco

Same arguments as `osprey prepare`, plus --entries-per-task and --ray-address. Run without
`ray job submit`, it starts a local Ray instance. The work is in osprey.data.prepare.
"""

from __future__ import annotations

import argparse
import logging

from osprey.data.prepare import add_prepare_arguments, add_ray_arguments, run_prepare_on_ray


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare", description="Convert a data set into shards with Ray."
    )
    add_prepare_arguments(parser)
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_prepare_on_ray(args)


if __name__ == "__main__":
    main()
