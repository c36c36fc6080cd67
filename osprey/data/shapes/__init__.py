"""The synthetic shapes data set: coloured shapes with exact masks, for every Osprey task.

It is what the quickstart and the end-to-end tests train on, so a tiny Osprey must be able to
learn it on a CPU in minutes. A region's category is "<colour> <shape>". Each image holds 2-5
shapes drawn in order over a plain background; each region's mask is exactly the pixels of its
shape that stay visible after the later shapes are drawn, so regions never overlap. Shapes
whose visible part would be too small (or too little of the shape) are not kept.

Every image yields one SHARD_SCHEMA row per task (caption, category, short, detailed, posneg,
conversation), all with the same image bytes. Region rows refer to every region exactly once
with `<regionN>` (1-based into `regions`); caption rows have no regions. Text carries no
`<image>` prefix: the prompt builder adds it.

`render_sample` draws one image without encoding anything, for dense pretraining of a vision
tower; `label_maps` turns its output into per-pixel colour and shape labels.

Modules by purpose: `config` (vocabulary and ShapesConfig), `drawing` (geometry and scenes),
`text` (templates and each task's conversation), `writer` (rows and shard folders), `corpus`
(the tokenizer's text), `answers` (reading a model's answer). Their public names are all
importable from here.
"""

from osprey.data.shapes.answers import category_of, normalize_answer
from osprey.data.shapes.config import (
    BACKGROUND_LABEL,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    COVER_MIN_RATIO,
    NUMBER_WORDS,
    POSITIONS,
    RELATION_MARGIN,
    RELATIONS,
    SHAPE_PLURALS,
    SHAPES,
    SHAPES_TASKS,
    SIZES,
    SOURCE,
    ShapesConfig,
)
from osprey.data.shapes.corpus import shapes_corpus
from osprey.data.shapes.drawing import Scene, ShapeLabel, encode_png, label_maps, render_sample
from osprey.data.shapes.text import (
    CAPTION_PROMPTS,
    CAPTION_TEMPLATES,
    CATEGORY_INSTRUCTIONS,
    CATEGORY_QUESTION,
    CONVERSATION_GROUP_WEIGHTS,
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
    Turns,
    task_turns,
)
from osprey.data.shapes.writer import image_rows, split_indices, write_shapes_dataset

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_LABEL",
    "BACKGROUND_RGB",
    "CAPTION_PROMPTS",
    "CAPTION_TEMPLATES",
    "CATEGORY_INSTRUCTIONS",
    "CATEGORY_QUESTION",
    "COLOURS",
    "COLOUR_RGB",
    "CONVERSATION_GROUP_WEIGHTS",
    "CONVERSATION_OPENING",
    "CONVERSATION_OPENING_ONE",
    "CONVERSATION_QUESTIONS",
    "CONVERSATION_REGION",
    "COUNT_ANSWERS",
    "COVER_MIN_RATIO",
    "DETAILED_COVERED",
    "DETAILED_QUESTIONS",
    "DETAILED_RELATION",
    "DETAILED_WHERE",
    "NUMBER_WORDS",
    "POSITIONS",
    "POSNEG_ANSWERS",
    "POSNEG_QUESTIONS",
    "RELATIONS",
    "RELATION_MARGIN",
    "SHAPES",
    "SHAPES_TASKS",
    "SHAPE_PLURALS",
    "SHORT_QUESTIONS",
    "SIZES",
    "SOURCE",
    "Scene",
    "ShapeLabel",
    "ShapesConfig",
    "Turns",
    "category_of",
    "encode_png",
    "image_rows",
    "label_maps",
    "normalize_answer",
    "render_sample",
    "shapes_corpus",
    "split_indices",
    "task_turns",
    "write_shapes_dataset",
]
