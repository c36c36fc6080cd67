"""Reading a model's answer about a shapes region: normalisation and the category it names."""

from __future__ import annotations

import re

from osprey.data.shapes.config import COLOUR_RGB, SHAPE_PLURALS, SHAPES

# --------------------------------------------------------------------------------------------
# Scoring helpers
# --------------------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}
_SYNONYMS = {"gray": "grey", "violet": "purple", "plus": "cross", "centre": "center"}
_SINGULAR = {plural: shape for shape, plural in SHAPE_PLURALS.items()}


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, whitespace collapsed."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def category_of(answer: str) -> str | None:
    """The first colour and first shape named in an answer as "<colour> <shape>", else None."""
    colour = shape = None
    for word in normalize_answer(answer).split():
        word = _SYNONYMS.get(word, word)
        word = _SINGULAR.get(word, word)
        if colour is None and word in COLOUR_RGB:
            colour = word
        elif shape is None and word in SHAPES:
            shape = word
    if colour is None or shape is None:
        return None
    return f"{colour} {shape}"
