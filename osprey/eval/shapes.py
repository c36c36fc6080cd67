"""The `shapes` benchmark: category questions on the synthetic validation split.

`evaluate_shapes` scores a model in this process (the quickstart's last step) by running the
benchmark exactly as `osprey eval --benchmark shapes --local` does (osprey.eval.job, the engine's
batched shared-prefix decode), then reading its predictions back as a `ShapesScore`;
`score_answer` is the scorer of both.

Each region of each held-out image is asked the data set's own category question (the first
turn of its `category` rows) alone, with greedy decoding; a prediction is right when its
normalised text equals the region's "<colour> <shape>".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from osprey.data.shapes import COLOURS, SHAPES, normalize_answer


@dataclass
class ShapesScore:
    total: int = 0
    correct: int = 0
    colour_correct: int = 0
    shape_correct: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)  # (prediction, truth)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def as_metrics(self) -> dict[str, float]:
        """Percentages (as every benchmark's scores), and the region count; `osprey eval` and
        the quickstart store them under these names."""
        n = max(self.total, 1)
        return {
            "accuracy": 100 * self.correct / n,
            "colour_accuracy": 100 * self.colour_correct / n,
            "shape_accuracy": 100 * self.shape_correct / n,
            "regions": float(self.total),
        }


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
    from osprey.eval.benchmarks import BenchmarkData
    from osprey.eval.job import EvalConfig, EvalResources, read_predictions, run_eval
    from osprey.io.output import OutputDir
    from osprey.io.storage import resolve

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


def score_answer(score: ShapesScore, answer: str, truth: str) -> None:
    """Adds one region's answer to `score` (also the `shapes` benchmark job's scorer)."""
    prediction, truth = normalize_answer(answer), normalize_answer(truth)
    score.total += 1
    score.correct += prediction == truth
    words = prediction.split()
    score.colour_correct += bool(set(words) & set(COLOURS)) and truth.split()[0] in words
    score.shape_correct += bool(set(words) & set(SHAPES)) and truth.split()[-1] in words
    if len(score.examples) < 20:
        score.examples.append((prediction, truth))
