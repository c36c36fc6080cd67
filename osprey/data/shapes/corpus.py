"""Every word and phrase the shapes data set can write, to train the tiny tokenizer on."""

from __future__ import annotations

from collections.abc import Iterator

from osprey.data.shapes.config import (
    BACKGROUNDS,
    COLOURS,
    NUMBER_WORDS,
    POSITIONS,
    RELATIONS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    ShapesConfig,
)
from osprey.data.shapes.text import (
    CAPTION_PROMPTS,
    CAPTION_TEMPLATES,
    CATEGORY_INSTRUCTIONS,
    CATEGORY_QUESTION,
    CONVERSATION_OPENING,
    CONVERSATION_OPENING_ONE,
    CONVERSATION_QUESTIONS,
    CONVERSATION_REGION,
    COUNT_ANSWERS,
    DETAILED_COVERED,
    DETAILED_QUESTIONS,
    DETAILED_RELATION,
    DETAILED_WHERE,
    POSNEG_ANSWERS,
    POSNEG_QUESTIONS,
    SHORT_QUESTIONS,
)
from osprey.data.shapes.writer import image_rows

# --------------------------------------------------------------------------------------------
# Text corpus for the tiny tokenizer
# --------------------------------------------------------------------------------------------

_EXAMPLE_FIELDS = {
    "region": "<region1>",
    "name": "region1",
    "other": "region2",
    "winner": "region1",
    "n": "3",
    "region_list": "region1<region1>, region2<region2>, region3<region3>",
    "items": "a red circle, a blue star and a green square",
    "background": "grey",
    "number": "three",
    "colour": "red",
    "size": "small",
    "where": "in the top left",
    "relation": "to the left of",
    "category": "red circle",
    "a_category": "a red circle",
    "a_shape": "a circle",
    "a_thing": "a small red circle",
    "noun": "circle",
    "nouns": "circles",
    "things": "the red circle and the blue star",
}


def _all_templates() -> list[str]:
    templates = [
        *CAPTION_PROMPTS,
        *CAPTION_TEMPLATES,
        *CATEGORY_INSTRUCTIONS,
        CATEGORY_QUESTION,
        *SHORT_QUESTIONS,
        *DETAILED_QUESTIONS,
        DETAILED_WHERE,
        DETAILED_RELATION,
        DETAILED_COVERED,
        *(t for group in POSNEG_QUESTIONS.values() for t in group),
        *POSNEG_ANSWERS,
        CONVERSATION_OPENING,
        CONVERSATION_OPENING_ONE,
        CONVERSATION_REGION,
        *COUNT_ANSWERS,
    ]
    for questions, answer in CONVERSATION_QUESTIONS.values():
        templates += [*questions, answer]
    return [t for t in templates if t]


def shapes_corpus(config: ShapesConfig | None = None, n_examples: int = 64) -> Iterator[str]:
    """Every word and phrase the data set can write, then n_examples images' real conversations.

    Vocabulary first (colours, shapes, sizes, positions, numbers, region names), then each
    template filled with example values, then whole sample texts for realistic frequencies.
    """
    cfg = config or ShapesConfig()
    yield from COLOURS
    yield from SHAPES
    yield from SHAPE_PLURALS.values()
    yield from SIZES
    yield from BACKGROUNDS
    yield from POSITIONS.values()
    yield from RELATIONS
    yield from NUMBER_WORDS
    yield "an"
    for k in range(1, cfg.max_shapes + 1):
        yield f"region{k}"
        yield f"<region{k}>"
        yield str(k)
    for colour in COLOURS:
        for shape in SHAPES:
            yield f"{colour} {shape}"
    for template in _all_templates():
        yield template.format(**_EXAMPLE_FIELDS)
    for index in range(n_examples):
        for row in image_rows(index, "corpus", cfg):
            for turn in row["conversations"]:
                yield turn["value"]
