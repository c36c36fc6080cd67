"""The words of the shapes data set: every template, region descriptions, and the
conversation of each task for a drawn scene."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from osprey.data.shapes.config import (
    NUMBER_WORDS,
    POSITIONS,
    RELATION_MARGIN,
    RELATIONS,
    SHAPE_PLURALS,
    ShapesConfig,
)
from osprey.data.shapes.drawing import Scene, ShapeLabel

# --------------------------------------------------------------------------------------------
# Templates. Every literal word the data set writes lives here, so shapes_corpus can list them.
# Fields: {region} "<region1>", {name} "region1", {other} "region2", {n} a digit,
# {region_list}, {items}, {background}, {number} a number word, {colour}, {size}, {where},
# {relation}, {category} "red circle", {a_category} "a red circle", {a_shape} "a circle",
# {a_thing} "a small red circle", {noun} "circle", {nouns} "circles",
# {things} "the red circle and the blue star".
# --------------------------------------------------------------------------------------------

CAPTION_PROMPTS = (
    "Give a short caption of the image.",
    "Describe the image briefly.",
    "What does this picture show?",
    "Summarize the picture in one sentence.",
)
CAPTION_TEMPLATES = (
    "{items} on a {background} background",
    "a {background} background with {items}",
    "{number} shapes on a {background} background: {items}",
)
CATEGORY_INSTRUCTIONS = (
    "I will point to one region of the image at a time. Answer with its category, "
    "a colour and a shape.",
    "Each question below is about one region. Name the category of the region.",
)
CATEGORY_QUESTION = (
    "What is the category of {region}? Answer the question using a single word or phrase."
)
SHORT_QUESTIONS = (
    "Please give me a short description of {region}.",
    "Describe {region} in a few words.",
    "What is {region}? Answer with a short phrase.",
)
DETAILED_QUESTIONS = (
    "Can you give me a detailed description of {region}?",
    "Describe {region} in detail.",
    "What can you tell me about {region} and where it is?",
)
DETAILED_WHERE = "{a_thing} {where} of the image"
DETAILED_RELATION = "{relation} {things}"
DETAILED_COVERED = "partly covered by {things}"
POSNEG_QUESTIONS: dict[str, tuple[str, ...]] = {
    "category": ("Is {region} {a_category}?", "Is {region} {a_category}? Answer yes or no."),
    "colour": ("Is {region} {colour}?", "Is the shape in {region} {colour}?"),
    "shape": ("Is {region} {a_shape}?", "Does {region} show {a_shape}?"),
}
POSNEG_ANSWERS = ("Yes", "No")
CONVERSATION_OPENING = "There are {n} regions in the picture: {region_list}."
CONVERSATION_OPENING_ONE = "There is {n} region in the picture: {region_list}."
CONVERSATION_REGION = "{name}{region}"
CONVERSATION_QUESTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    # kind: (question templates, answer template)
    "colour": (("What colour is {name}?", "What is the colour of {name}?"), "It is {colour}."),
    "shape": (("What shape is {name}?", "What kind of shape is {name}?"), "It is {a_shape}."),
    "size": (("What size is {name}?", "How big is {name}?"), "It is a {size} shape."),
    "where": (("Where is {name}?", "Where is {name} in the image?"), "It is {where} of the image."),
    "describe": (("What is {name}?",), "It is {a_thing}."),
    "find": (("Which region shows the {category}?",), "It is {name}."),
    "relation": (("Where is {name} relative to {other}?",), "It is {relation} {other}."),
    "left": (("Which is further left, {name} or {other}?",), "It is {winner}."),
    "higher": (("Which is higher in the image, {name} or {other}?",), "It is {winner}."),
    "count": (("How many {nouns} are there?", "How many {nouns} can you see?"), ""),
    "count_all": (("How many shapes are in the picture?",), "There are {number} shapes."),
}
# How often a conversation turn asks about one region, a pair of regions, or a count.
CONVERSATION_GROUP_WEIGHTS = (0.55, 0.3, 0.15)
COUNT_ANSWERS = (
    "There are no {nouns}.",
    "There is one {noun}.",
    "There are {number} {nouns}.",
)


def _fill(template: str, **fields: str) -> str:
    return template.format(**fields)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------
# Describing regions
# --------------------------------------------------------------------------------------------


def _where(label: ShapeLabel, image_size: int) -> str:
    x, y = label.centroid
    col = min(int(3 * x / image_size), 2)
    row = min(int(3 * y / image_size), 2)
    return POSITIONS[(row, col)]


def _relation(a: ShapeLabel, b: ShapeLabel, image_size: int) -> str | None:
    """Where a is relative to b, along whichever axis separates their centroids more.

    None when the centroids are too close for the answer to be clear (a shape on top of another).
    """
    dx = a.centroid[0] - b.centroid[0]
    dy = a.centroid[1] - b.centroid[1]
    if max(abs(dx), abs(dy)) <= RELATION_MARGIN * image_size:
        return None
    if abs(dx) >= abs(dy):
        return RELATIONS[0] if dx < 0 else RELATIONS[1]
    return RELATIONS[2] if dy < 0 else RELATIONS[3]


def _thing(label: ShapeLabel) -> str:
    return _article(f"{label.size} {label.category}")


def _detailed_description(
    rng: np.random.Generator, labels: list[ShapeLabel], i: int, image_size: int
) -> str:
    me = labels[i]
    text = _fill(DETAILED_WHERE, a_thing=_thing(me), where=_where(me, image_size))
    others = [j for j in rng.permutation(len(labels)).tolist() if j != i]
    related = [(j, _relation(me, labels[j], image_size)) for j in others]
    by_relation: dict[str, list[str]] = {}
    for j, relation in [(j, r) for j, r in related if r is not None][:2]:
        by_relation.setdefault(relation, []).append(f"the {labels[j].category}")
    relations = [
        _fill(DETAILED_RELATION, relation=relation, things=_join(things))
        for relation, things in by_relation.items()
    ]
    if relations:
        text += ", " + _join(relations)
    if me.covered_by:
        things = _join([f"the {labels[j].category}" for j in me.covered_by])
        text += ", " + _fill(DETAILED_COVERED, things=things)
    return text + "."


# --------------------------------------------------------------------------------------------
# Conversations per task. `labels` are in region order: labels[k] is <region{k+1}>.
# Each returns alternating human/gpt turns; region tasks refer to every region exactly once.
# --------------------------------------------------------------------------------------------

Turns = list[dict[str, str]]


def _turns(pairs: Sequence[tuple[str, str]]) -> Turns:
    turns: Turns = []
    for question, answer in pairs:
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _region(k: int) -> str:
    return f"<region{k + 1}>"


def _caption_turns(rng: np.random.Generator, scene: Scene, cfg: ShapesConfig) -> Turns:
    labels = scene.labels
    with_sizes = bool(rng.integers(2))
    items = [
        _thing(labels[k]) if with_sizes else _article(labels[k].category)
        for k in rng.permutation(len(labels)).tolist()
    ]
    caption = _fill(
        _pick(rng, CAPTION_TEMPLATES),
        items=_join(items),
        background=scene.background,
        number=NUMBER_WORDS[len(labels)],
    )
    return _turns([(_pick(rng, CAPTION_PROMPTS), caption)])


def _category_turns(rng: np.random.Generator, labels: list[ShapeLabel], cfg: ShapesConfig) -> Turns:
    pairs = [
        (_fill(CATEGORY_QUESTION, region=_region(k)), labels[k].category)
        for k in rng.permutation(len(labels)).tolist()
    ]
    first_question, first_answer = pairs[0]
    pairs[0] = (_pick(rng, CATEGORY_INSTRUCTIONS) + "\n" + first_question, first_answer)
    return _turns(pairs)


def _short_turns(rng: np.random.Generator, labels: list[ShapeLabel], cfg: ShapesConfig) -> Turns:
    return _turns(
        [
            (_fill(_pick(rng, SHORT_QUESTIONS), region=_region(k)), _thing(labels[k]))
            for k in rng.permutation(len(labels)).tolist()
        ]
    )


def _detailed_turns(rng: np.random.Generator, labels: list[ShapeLabel], cfg: ShapesConfig) -> Turns:
    return _turns(
        [
            (
                _fill(_pick(rng, DETAILED_QUESTIONS), region=_region(k)),
                _detailed_description(rng, labels, k, cfg.image_size),
            )
            for k in rng.permutation(len(labels)).tolist()
        ]
    )


def _negative(
    rng: np.random.Generator,
    kind: str,
    me: ShapeLabel,
    labels: list[ShapeLabel],
    cfg: ShapesConfig,
) -> tuple[str, str]:
    """A (colour, shape) the region is not, differing in what `kind` asks about.

    Half the category negatives are other regions of the same image; the rest change one
    attribute, so that neither colour nor shape alone answers them.
    """
    other_colour = _pick(rng, [c for c in cfg.colours if c != me.colour])
    other_shape = _pick(rng, [s for s in cfg.shapes if s != me.shape])
    if kind == "colour":
        return other_colour, me.shape
    if kind == "shape":
        return me.colour, other_shape
    others = [o for o in labels if o.category != me.category]
    draw = rng.random()
    if others and draw < 0.5:
        other = _pick(rng, others)
        return other.colour, other.shape
    return (other_colour, me.shape) if draw < 0.75 else (me.colour, other_shape)


def _posneg_question(rng: np.random.Generator, kind: str, k: int, colour: str, shape: str) -> str:
    template = _pick(rng, POSNEG_QUESTIONS[kind])
    return _fill(
        template,
        region=_region(k),
        colour=colour,
        a_shape=_article(shape),
        a_category=_article(f"{colour} {shape}"),
    )


def _posneg_turns(rng: np.random.Generator, labels: list[ShapeLabel], cfg: ShapesConfig) -> Turns:
    n = len(labels)
    # Exactly half (rounded by a coin) of the questions are positive.
    positives = n // 2 + (int(rng.integers(2)) if n % 2 else 0)
    is_positive = np.zeros(n, dtype=bool)
    is_positive[rng.permutation(n)[:positives]] = True
    pairs = []
    for k in rng.permutation(n).tolist():
        me = labels[k]
        kind = _pick(rng, tuple(POSNEG_QUESTIONS))
        if is_positive[k]:
            colour, shape = me.colour, me.shape
        else:
            colour, shape = _negative(rng, kind, me, labels, cfg)
        answer = POSNEG_ANSWERS[0] if is_positive[k] else POSNEG_ANSWERS[1]
        pairs.append((_posneg_question(rng, kind, k, colour, shape), answer))
    return _turns(pairs)


def _count_answer(count: int, noun: str, nouns: str) -> str:
    template = COUNT_ANSWERS[min(count, 2)]
    return _fill(template, number=NUMBER_WORDS[count], noun=noun, nouns=nouns)


def _region_questions(
    labels: list[ShapeLabel], k: int, image_size: int
) -> list[tuple[str, dict[str, str]]]:
    me = labels[k]
    fields = {
        "name": f"region{k + 1}",
        "colour": me.colour,
        "a_shape": _article(me.shape),
        "size": me.size,
        "where": _where(me, image_size),
        "a_thing": _thing(me),
        "category": me.category,
    }
    return [(kind, fields) for kind in ("colour", "shape", "size", "where", "describe", "find")]


def _pair_questions(
    labels: list[ShapeLabel], a: int, b: int, image_size: int
) -> list[tuple[str, dict[str, str]]]:
    """Relative-position questions, only where the centroids are clearly apart."""
    (ax, ay), (bx, by) = labels[a].centroid, labels[b].centroid
    margin = RELATION_MARGIN * image_size
    names = (f"region{a + 1}", f"region{b + 1}")
    relation = _relation(labels[a], labels[b], image_size)
    questions = []
    if relation is not None:
        questions.append(("relation", {"name": names[0], "other": names[1], "relation": relation}))
    if abs(ax - bx) > margin:
        winner = names[0] if ax < bx else names[1]
        questions.append(("left", {"name": names[0], "other": names[1], "winner": winner}))
    if abs(ay - by) > margin:
        winner = names[0] if ay < by else names[1]
        questions.append(("higher", {"name": names[0], "other": names[1], "winner": winner}))
    return questions


def _conversation_pair(
    rng: np.random.Generator, kind: str, fields: dict[str, str]
) -> tuple[str, str]:
    templates, answer = CONVERSATION_QUESTIONS[kind]
    question = _fill(_pick(rng, templates), **fields)
    if kind == "count":
        answer = _count_answer(int(fields["count"]), fields["noun"], fields["nouns"])
    else:
        answer = _fill(answer, **fields)
    return question, answer


def _count_questions(
    rng: np.random.Generator, labels: list[ShapeLabel], cfg: ShapesConfig
) -> list[tuple[str, dict[str, str]]]:
    """Counts of one shape kind and one colour (present or not), and of all shapes."""
    shape = _pick(rng, cfg.shapes)
    colour = _pick(rng, cfg.colours)
    by_shape = sum(label.shape == shape for label in labels)
    by_colour = sum(label.colour == colour for label in labels)
    return [
        ("count", {"count": str(by_shape), "noun": shape, "nouns": SHAPE_PLURALS[shape]}),
        (
            "count",
            {"count": str(by_colour), "noun": f"{colour} shape", "nouns": f"{colour} shapes"},
        ),
        ("count_all", {"number": NUMBER_WORDS[len(labels)]}),
    ]


def _conversation_turns(
    rng: np.random.Generator, labels: list[ShapeLabel], cfg: ShapesConfig
) -> Turns:
    n = len(labels)
    groups = [
        [q for k in range(n) for q in _region_questions(labels, k, cfg.image_size)],
        [
            q
            for a in range(n)
            for b in range(n)
            if a != b
            for q in _pair_questions(labels, a, b, cfg.image_size)
        ],
        _count_questions(rng, labels, cfg),
    ]
    # Pick a group first, so that pair questions (which grow as n^2) do not crowd out the rest;
    # region questions matter most, counts are few and easy.
    weights = np.array(CONVERSATION_GROUP_WEIGHTS)
    pairs = []
    for _ in range(int(rng.integers(3, 7))):
        p = weights * np.array([len(g) > 0 for g in groups])
        group = groups[int(rng.choice(len(groups), p=p / p.sum()))]
        kind, fields = group.pop(int(rng.integers(len(group))))
        pairs.append(_conversation_pair(rng, kind, fields))
    region_list = ", ".join(
        _fill(CONVERSATION_REGION, name=f"region{k + 1}", region=_region(k)) for k in range(n)
    )
    opening = CONVERSATION_OPENING if n > 1 else CONVERSATION_OPENING_ONE
    first_question, first_answer = pairs[0]
    pairs[0] = (
        _fill(opening, n=str(n), region_list=region_list) + "\n" + first_question,
        first_answer,
    )
    return _turns(pairs)


_REGION_TASK_BUILDERS = {
    "category": _category_turns,
    "short": _short_turns,
    "detailed": _detailed_turns,
    "posneg": _posneg_turns,
    "conversation": _conversation_turns,
}


def task_turns(
    task: str,
    rng: np.random.Generator,
    scene: Scene,
    labels: list[ShapeLabel],
    cfg: ShapesConfig,
) -> Turns:
    """The conversation of `task` about a scene whose regions, in region order, are `labels`."""
    if task == "caption":
        return _caption_turns(rng, scene, cfg)
    return _REGION_TASK_BUILDERS[task](rng, labels, cfg)
