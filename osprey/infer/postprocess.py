"""The released demo's clean-up of a generated description (reference decoding only).

The reference demo (`demo/osprey_inference.py`, `osprey_predict`) keeps, of a short or detailed
description, the piece between the first and second `:` when there is a colon (the model
sometimes answers "region1: ..."), then the sentences up to the first one that repeats an
earlier one: sampled decoding at temperature 0.2 can loop. Sentences are the pieces between
`.`; they are compared as written, leading space included, and each kept one gets its `.` back.
"""

from __future__ import annotations


def demo_answer(text: str) -> str:
    """`text` cleaned as the reference demo cleans a description."""
    text = text.strip()
    if ":" in text:
        text = text.split(":")[1]
    kept: list[str] = []
    for sentence in text.split("."):
        if sentence in kept:
            break
        if sentence:
            kept.append(sentence)
    return "".join(sentence + "." for sentence in kept)
