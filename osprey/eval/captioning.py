"""METEOR and CIDEr of region captions (RefCOCOg), through pycocoevalcap as COCO does.

Both sides go through the PTB tokenizer (Stanford CoreNLP's, lower-cases and drops
punctuation), then METEOR 1.5 (`meteor-1.5.jar`, run with Java) and CIDEr-D (pycocoevalcap's
`Cider`, what COCO's caption leaderboard and the paper call CIDEr) score the corpus. Scores are
reported x100, as the paper's table (METEOR 16.6, CIDEr 108.3).

Answer cleaning follows the reference `refcocog_eval.py`: strip, and keep the text after the
first `:` when there is one. Its `.` -> `.\\n` rewrite is not repeated: the tokenizer turns
newlines into spaces and drops the full stop, so it changes nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence


def clean_caption(text: str) -> str:
    text = text.strip()
    if ":" in text:
        text = text.split(":")[1]
    return text.strip()


def require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "METEOR (pycocoevalcap) runs a Java program and no `java` is on PATH; install a "
            "Java runtime (e.g. apt-get install default-jre-headless)"
        )


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = ("meteor", "cider"),
) -> dict[str, float]:
    """Corpus METEOR and CIDEr (x100) of one prediction per id against its references."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        missing = sorted(set(references) ^ set(predictions))[:5]
        raise ValueError(f"predictions and references cover different ids, e.g. {missing}")
    if not predictions:
        return {name: 0.0 for name in metrics}
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"item {key!r} has no reference caption")
    require_java()
    # One tokenizer run (a Java process) for both sides.
    both = {("g", k): [{"caption": c} for c in v] for k, v in references.items()}
    both.update({("r", k): [{"caption": v}] for k, v in predictions.items()})
    tokens = PTBTokenizer().tokenize(both)
    gts = {k: tokens[("g", k)] for k in references}
    res = {k: tokens[("r", k)] for k in predictions}
    out: dict[str, float] = {}
    for name in metrics:
        score, _ = _scorer(name).compute_score(gts, res)
        out[name] = 100 * float(score)
    return out


_METEOR = None


def _scorer(name: str):
    global _METEOR
    if name == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        # Its Java process loads the paraphrase table once (seconds): keep it for the next call.
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            _METEOR = Meteor()
        return _METEOR
    if name == "cider":
        from pycocoevalcap.cider.cider import Cider

        return Cider()
    if name == "bleu4":
        from pycocoevalcap.bleu.bleu import Bleu

        return _First(Bleu(4))
    raise ValueError(f"unknown caption metric {name!r}; choose meteor, cider or bleu4")


class _First:
    """Bleu returns one score per n; keep BLEU-4."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer

    def compute_score(self, gts, res):
        scores, per_item = self.scorer.compute_score(gts, res, verbose=0)
        return scores[-1], per_item[-1]
