"""POPE (object hallucination): yes/no questions about whole images, scored as a classifier.

An answer is read as the reference `pope/evaluate.py` reads it: lower-cased, only its first
sentence (up to the first `.`), commas dropped, split on spaces; "no" or "not" among the words
means no, anything else yes. "yes" is the positive class. Reported in percent: accuracy,
precision, recall, F1 and the share of "yes" answers.
"""

from __future__ import annotations

from collections.abc import Sequence


def answer_is_yes(answer: str) -> bool:
    text = answer.lower()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("no" in words or "not" in words)


def label_is_yes(label: str) -> bool:
    """A POPE label: "yes" or "no" (anything but "no" counts as yes, as the reference)."""
    return label.strip().lower() != "no"


def pope_metrics(predictions: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} answers for {len(labels)} labels")
    tp = sum(p and t for p, t in zip(predictions, labels, strict=True))
    fp = sum(p and not t for p, t in zip(predictions, labels, strict=True))
    tn = sum(not p and not t for p, t in zip(predictions, labels, strict=True))
    fn = sum(not p and t for p, t in zip(predictions, labels, strict=True))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100 * (tp + tn) / n if n else 0.0,
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * (tp + fp) / n if n else 0.0,
        "questions": float(n),
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
    }
