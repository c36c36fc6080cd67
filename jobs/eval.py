r"""Evaluate a model on one of the paper's benchmarks (or `shapes`) on a Ray cluster.

    ray job submit --working-dir . -- python -m jobs.eval --benchmark lvis \
        --model /models/osprey-7b --data /data/lvis --out s3://bucket/eval/lvis \
        --evaluators 4 --evaluator-gpus 1

Same arguments as `osprey eval` (`--help` lists the benchmarks, their data layout and the
paper's numbers). Predictions go to OUT/predictions/*.parquet, the scores to OUT/metrics.json
and to MLflow beside the model's training run. `--model` takes a directory or a name (docs/models.md). The work is in osprey.eval.job.
"""

from __future__ import annotations

import argparse
import logging

from osprey.eval.job import EvalResult, add_eval_arguments, run_eval_command


def main(argv: list[str] | None = None) -> EvalResult:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.eval", description="Evaluate an Osprey model on a benchmark with Ray."
    )
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_eval_command(args)


if __name__ == "__main__":
    main()
