"""The `shapes` benchmark scored in this process (the quickstart's last step): the benchmark run
exactly as `osprey eval --benchmark shapes --local` runs it (osprey.eval.job, the engine's batched
shared-prefix decode), its predictions read back as a `ShapesScore`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from osprey.eval.benchmarks import BenchmarkData
from osprey.eval.job import EvalConfig, EvalResources, read_predictions, run_eval
from osprey.eval.shapes import ShapesScore, score_answer
from osprey.io.output import OutputDir
from osprey.io.storage import resolve


def evaluate_shapes(
    model_dir: str | os.PathLike,
    shapes_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    out: str | os.PathLike | None = None,
) -> ShapesScore:
    """The shapes benchmark of the model directory on `shapes_dir`'s val/ split, in this
    process; `limit` keeps the first N images, `out` keeps the predictions (default: a
    temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="shapes-eval-") as tmp:
        where = str(out) if out is not None else str(Path(tmp) / "shapes")
        config = EvalConfig(
            benchmark="shapes",
            model=str(model_dir),
            data=BenchmarkData(root=str(shapes_dir)),
            out=where,
            limit=limit,
            resources=EvalResources(batch=batch_size),
            mlflow=False,
        )
        run_eval(config, local=True)
        frame = read_predictions(OutputDir(resolve(where).child("predictions")))
    score = ShapesScore()
    for prediction, truth in zip(frame["prediction"], frame["truth"], strict=True):
        score_answer(score, prediction if isinstance(prediction, str) else "", json.loads(truth))
    return score
