r"""Segment everything and caption every region of a bucket of images on a Ray cluster.

    ray job submit --working-dir . -- python -m jobs.caption s3://bucket/images \
        --out s3://bucket/captions --model /models/osprey-7b --sam-weights /models/sam-vit-base \
        --captioners 2 --captioner-gpus 1 --segmenters 4 --segmenter-gpus 0.25 --render

Same arguments as `osprey caption`. Run without `ray job submit`, it starts a local Ray instance;
rerun it over the same --out to resume. `--model` takes a directory or a name (docs/models.md). The work is in osprey.infer.job.
"""

from __future__ import annotations

import argparse
import logging

from osprey.infer.job import CaptionSummary, add_caption_arguments, run_caption


def main(argv: list[str] | None = None) -> CaptionSummary:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.caption", description="Segment and caption images with Ray."
    )
    add_caption_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_caption(args)


if __name__ == "__main__":
    main()
