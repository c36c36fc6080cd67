"""The `shapes` benchmark: category questions on the synthetic validation split.

`score_answer` is the scorer of the `shapes` benchmark job (osprey.eval.benchmarks) and of
`evaluate_shapes` (osprey.eval.run_shapes, the quickstart's last step).

Each region of each held-out image is asked the data set's own category question (the first
turn of its `category` rows) alone, with greedy decoding; a prediction is right when its
normalised text equals the region's "<colour> <shape>".
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
