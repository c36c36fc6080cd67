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
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from osprey.data.masks import encode_mask
from osprey.data.schema import TASKS
from osprey.data.shards import write_shards

SOURCE = "shapes"

# Saturated and far apart in RGB so that mask pooling of any features separates them.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 70, 200),
    "orange": (250, 140, 30),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES: tuple[str, ...] = ("small", "medium", "large")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)
SHAPES_TASKS: tuple[str, ...] = (
    "caption",
    "category",
    "short",
    "detailed",
    "posneg",
    "conversation",
)
if not set(SHAPES_TASKS) <= set(TASKS):
    raise RuntimeError(f"shapes tasks {sorted(set(SHAPES_TASKS) - set(TASKS))} are not TASKS")

# Label-map value of background pixels; shape pixels hold 1 + index into COLOURS / SHAPES.
BACKGROUND_LABEL = 0

NUMBER_WORDS: tuple[str, ...] = (
    "no",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

# 3x3 grid cell (row, column) of a region's visible centroid -> where it is.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
# Centroids closer than this fraction of the image are not said to be left/right/above/below.
RELATION_MARGIN = 0.1
# A later shape "covers" an earlier one when it hides at least this fraction of it.
COVER_MIN_RATIO = 0.03


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class ShapesConfig:
    """How shapes images are drawn. The same config and seed give byte-identical images."""

    image_size: int = 128
    min_shapes: int = 2
    max_shapes: int = 5
    colours: tuple[str, ...] = COLOURS
    shapes: tuple[str, ...] = SHAPES
    # Area of the whole (unoccluded) shape, as a fraction of the image, for small/medium/large.
    size_areas: tuple[float, float, float] = (0.05, 0.085, 0.13)
    # Each shape's area is scaled by a factor in [1 - jitter, 1 + jitter].
    size_jitter: float = 0.1
    backgrounds: tuple[str, ...] = BACKGROUNDS
    # Standard deviation (in 0-255 levels) of pixel noise over the whole image; 0 keeps PNGs tiny.
    noise_std: float = 0.0
    # A kept region shows at least this fraction of the image ...
    min_visible_fraction: float = 0.03
    # ... and at least this fraction of its own shape, so its silhouette stays recognisable.
    min_visible_ratio: float = 0.7
    # Every region must survive a bilinear resize of its mask to image_size // feature_stride
    # followed by `> 0` (Osprey's mask pooling); None skips the check.
    feature_stride: int | None = 32
    # One shape per category in an image, so "the blue star" names exactly one region.
    unique_categories: bool = True
    max_placement_tries: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(
                f"min_shapes/max_shapes must satisfy 1 <= min_shapes <= max_shapes, got "
                f"{self.min_shapes}/{self.max_shapes}"
            )
        if self.max_shapes >= len(NUMBER_WORDS):
            raise ValueError(f"max_shapes must be below {len(NUMBER_WORDS)}, got {self.max_shapes}")
        _check_names("colours", self.colours, COLOURS)
        _check_names("shapes", self.shapes, SHAPES)
        _check_names("backgrounds", self.backgrounds, BACKGROUNDS)
        if len(self.size_areas) != len(SIZES) or list(self.size_areas) != sorted(self.size_areas):
            raise ValueError(f"size_areas must be 3 increasing fractions, got {self.size_areas}")
        if not 0 <= self.size_jitter < 0.5:
            raise ValueError(f"size_jitter must be in [0, 0.5), got {self.size_jitter}")
        smallest = self.size_areas[0] * (1 - self.size_jitter)
        if not 0 < self.min_visible_fraction <= smallest:
            raise ValueError(
                f"min_visible_fraction must be in (0, {smallest:.4f}] (the smallest shape's "
                f"area), got {self.min_visible_fraction}"
            )
        if self.size_areas[-1] * (1 + self.size_jitter) > 0.4:
            raise ValueError(f"size_areas too large to fit shapes: {self.size_areas}")
        if not 0 < self.min_visible_ratio <= 1:
            raise ValueError(f"min_visible_ratio must be in (0, 1], got {self.min_visible_ratio}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.feature_stride is not None and not 1 <= self.feature_stride <= self.image_size:
            raise ValueError(
                f"feature_stride must be in [1, image_size], got {self.feature_stride}"
            )
        if self.unique_categories and self.max_shapes > len(self.colours) * len(self.shapes):
            raise ValueError("max_shapes exceeds the number of categories with unique_categories")
        if self.max_placement_tries < 1:
            raise ValueError(f"max_placement_tries must be >= 1, got {self.max_placement_tries}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), as meta.json stores it."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapesConfig:
        """Inverse of to_dict (JSON turns tuples into lists)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ShapesConfig options: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _check_names(option: str, names: Sequence[str], known: Sequence[str]) -> None:
    # Negative questions need a second colour and a second shape to ask about.
    minimum = 1 if option == "backgrounds" else 2
    if len(names) < minimum or len(set(names)) != len(names):
        raise ValueError(f"{option} must list at least {minimum} distinct names, got {names}")
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"{option}: unknown {bad}; choose from {list(known)}")


# --------------------------------------------------------------------------------------------
# Geometry: unit shapes (scale 1, centred at 0, y pointing down) and rasterisation
# --------------------------------------------------------------------------------------------


def _regular_points(n: int, radii: Sequence[float]) -> np.ndarray:
    """n vertices starting straight up, radius cycling through `radii` (a star alternates)."""
    angles = -math.pi / 2 + 2 * math.pi * np.arange(n) / n
    r = np.array([radii[i % len(radii)] for i in range(n)])
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _unit_polygon(kind: str) -> np.ndarray | None:
    """Vertices of a shape at scale 1; None for the circle, which PIL draws as an ellipse."""
    if kind == "circle":
        return None
    if kind == "square":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if kind == "triangle":
        return _regular_points(3, [1.0])
    if kind == "star":
        # A fat inner radius keeps the arms visible after downsampling.
        return _regular_points(10, [1.0, 0.45])
    if kind == "cross":
        t = 0.36
        return np.array(
            [
                [-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t],
                [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t],
            ],
            dtype=float,
        )  # fmt: skip
    raise ValueError(f"unknown shape {kind!r}; choose from {list(SHAPES)}")


def _unit_area(kind: str) -> float:
    poly = _unit_polygon(kind)
    if poly is None:
        return math.pi
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _unit_extent(kind: str) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) of the unit shape."""
    poly = _unit_polygon(kind)
    if poly is None:
        return (-1.0, -1.0, 1.0, 1.0)
    return (*poly.min(axis=0).tolist(), *poly.max(axis=0).tolist())


@dataclass(frozen=True, slots=True)
class _ShapeSpec:
    colour: str
    kind: str
    size: str
    cx: float
    cy: float
    scale: float


def _rasterise(spec: _ShapeSpec, image_size: int) -> np.ndarray:
    """Bool HxW mask of the whole shape (no anti-aliasing, so pixels are either in or out)."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _unit_polygon(spec.kind)
    if poly is None:
        r = spec.scale
        draw.ellipse([spec.cx - r, spec.cy - r, spec.cx + r, spec.cy + r], fill=1)
    else:
        points = poly * spec.scale + np.array([spec.cx, spec.cy])
        draw.polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShapeLabel:
    """One kept shape. Indices refer to draw order (0 is drawn first, at the bottom)."""

    colour: str
    shape: str
    size: str
    # (x, y) of the visible pixels' centroid.
    centroid: tuple[float, float]
    area: int
    full_area: int
    # Shapes drawn later that hide part of this one.
    covered_by: tuple[int, ...]

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"


class Scene(NamedTuple):
    """One rendered image: pixels, visible masks and labels, all in draw order."""

    image: np.ndarray  # HxWx3 uint8
    masks: np.ndarray  # NxHxW bool, pairwise disjoint
    labels: list[ShapeLabel]
    background: str


def _random_spec(rng: np.random.Generator, cfg: ShapesConfig, used: set[str]) -> _ShapeSpec:
    pairs = [
        (c, s)
        for c in cfg.colours
        for s in cfg.shapes
        if not (cfg.unique_categories and f"{c} {s}" in used)
    ]
    colour, kind = pairs[int(rng.integers(len(pairs)))]
    size_index = int(rng.integers(len(SIZES)))
    jitter = 1 + cfg.size_jitter * (2 * rng.random() - 1)
    area = cfg.size_areas[size_index] * jitter * cfg.image_size**2
    scale = math.sqrt(area / _unit_area(kind))
    x0, y0, x1, y1 = (v * scale for v in _unit_extent(kind))
    # Keep the whole shape inside the image, so its size label means what it says.
    last = cfg.image_size - 1
    cx = float(rng.uniform(-x0, last - x1))
    cy = float(rng.uniform(-y0, last - y1))
    return _ShapeSpec(colour, kind, SIZES[size_index], cx, cy, scale)


def _stride_sample_pixels(image_size: int, stride: int) -> np.ndarray:
    """Pixel rows/columns a bilinear resize to image_size // stride reads (align_corners=False)."""
    out = max(image_size // stride, 1)
    centres = (np.arange(out) + 0.5) * (image_size / out) - 0.5
    pixels = np.concatenate([np.floor(centres), np.ceil(centres)]).clip(0, image_size - 1)
    return np.unique(pixels.astype(int))


def _visible_masks(full: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each shape minus everything drawn after it."""
    covered = np.zeros_like(full[0])
    visible: list[np.ndarray] = []
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _visible_ok(visible: np.ndarray, full_area: int, cfg: ShapesConfig, grid: np.ndarray) -> bool:
    area = int(visible.sum())
    if area < cfg.min_visible_fraction * cfg.image_size**2:
        return False
    if area < cfg.min_visible_ratio * full_area:
        return False
    return grid.size == 0 or bool(visible[np.ix_(grid, grid)].any())


def _place_shapes(
    rng: np.random.Generator, cfg: ShapesConfig, target: int
) -> tuple[list[_ShapeSpec], list[np.ndarray]]:
    """Add shapes one by one, keeping each only if every shape so far stays visible enough."""
    grid = (
        _stride_sample_pixels(cfg.image_size, cfg.feature_stride)
        if cfg.feature_stride
        else np.zeros(0, dtype=int)
    )
    specs: list[_ShapeSpec] = []
    full: list[np.ndarray] = []
    for _ in range(cfg.max_placement_tries):
        if len(specs) >= target:
            break
        spec = _random_spec(rng, cfg, {f"{s.colour} {s.kind}" for s in specs})
        mask = _rasterise(spec, cfg.image_size)
        candidate = [*full, mask]
        visible = _visible_masks(candidate)
        if all(
            _visible_ok(v, int(f.sum()), cfg, grid) for v, f in zip(visible, candidate, strict=True)
        ):
            specs.append(spec)
            full.append(mask)
    return specs, full


def _label(index: int, spec: _ShapeSpec, full: list[np.ndarray], visible: np.ndarray) -> ShapeLabel:
    ys, xs = np.nonzero(visible)
    # A touch of a few pixels is not worth a "partly covered by" in the description.
    least = max(10, COVER_MIN_RATIO * full[index].sum())
    covered_by = tuple(
        j for j in range(index + 1, len(full)) if (full[index] & full[j]).sum() >= least
    )
    return ShapeLabel(
        colour=spec.colour,
        shape=spec.kind,
        size=spec.size,
        centroid=(float(xs.mean()), float(ys.mean())),
        area=int(visible.sum()),
        full_area=int(full[index].sum()),
        covered_by=covered_by,
    )


def _paint(
    rng: np.random.Generator,
    cfg: ShapesConfig,
    background: str,
    specs: list[_ShapeSpec],
    visible: list[np.ndarray],
) -> np.ndarray:
    image = np.empty((cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB[background]
    for spec, mask in zip(specs, visible, strict=True):
        image[mask] = COLOUR_RGB[spec.colour]
    if cfg.noise_std > 0:
        noise = rng.normal(0.0, cfg.noise_std, size=image.shape)
        image = np.clip(image + noise, 0, 255).round().astype(np.uint8)
    return image


def render_sample(rng: np.random.Generator, cfg: ShapesConfig | None = None) -> Scene:
    """Draw one image. Masks are exactly the pixels painted in each shape's colour."""
    cfg = cfg or ShapesConfig()
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    # Crowded draws can fail to fit min_shapes; a fresh draw from the same stream stays seeded.
    for _ in range(100):
        target = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
        specs, full = _place_shapes(rng, cfg, target)
        if len(specs) >= cfg.min_shapes:
            break
    else:
        raise RuntimeError(f"could not place {cfg.min_shapes} shapes; loosen the ShapesConfig")
    visible = _visible_masks(full)
    labels = [_label(i, spec, full, visible[i]) for i, spec in enumerate(specs)]
    image = _paint(rng, cfg, background, specs, visible)
    return Scene(image, np.stack(visible), labels, background)


def label_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (colour, shape) int64 maps: BACKGROUND_LABEL, or 1 + index into COLOURS/SHAPES.

    Indices are into the module constants, not the config, so labels mean the same across configs.
    """
    h, w = scene.masks.shape[1:]
    colour_map = np.full((h, w), BACKGROUND_LABEL, dtype=np.int64)
    shape_map = np.full((h, w), BACKGROUND_LABEL, dtype=np.int64)
    for mask, label in zip(scene.masks, scene.labels, strict=True):
        colour_map[mask] = 1 + COLOURS.index(label.colour)
        shape_map[mask] = 1 + SHAPES.index(label.shape)
    return colour_map, shape_map


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


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


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _image_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # One independent stream per (image, purpose): changing one task's text leaves the image
    # and the other tasks untouched.
    return np.random.default_rng([seed, index, stream])


def _task_turns(
    task: str,
    rng: np.random.Generator,
    scene: Scene,
    labels: list[ShapeLabel],
    cfg: ShapesConfig,
) -> Turns:
    if task == "caption":
        return _caption_turns(rng, scene, cfg)
    return _REGION_TASK_BUILDERS[task](rng, labels, cfg)


def image_rows(
    index: int,
    split: str,
    cfg: ShapesConfig | None = None,
    tasks: Sequence[str] = SHAPES_TASKS,
) -> list[dict[str, Any]]:
    """The SHARD_SCHEMA rows (one per task) of image `index`; a pure function of its arguments."""
    cfg = cfg or ShapesConfig()
    _check_tasks(tasks)
    rng = _image_rng(cfg.seed, index, 0)
    scene = render_sample(rng, cfg)
    # Region order is shuffled so that <region1> is not always the bottom-most shape.
    order = rng.permutation(len(scene.labels)).tolist()
    labels = [_reindex(scene.labels[i], order) for i in order]
    regions = []
    for i in order:
        region = encode_mask(scene.masks[i])
        region["category"] = scene.labels[i].category
        regions.append(region)
    image = encode_png(scene.image)
    size = cfg.image_size
    rows = []
    for task in tasks:
        turns = _task_turns(
            task, _image_rng(cfg.seed, index, 1 + SHAPES_TASKS.index(task)), scene, labels, cfg
        )
        rows.append(
            {
                "sample_id": f"{SOURCE}:{split}:{index:06d}:{task}",
                "source": SOURCE,
                "task": task,
                "image_path": f"{SOURCE}/{split}/{index:06d}.png",
                "image": image,
                "width": size,
                "height": size,
                "regions": [] if task == "caption" else regions,
                "conversations": turns,
            }
        )
    return rows


def _reindex(label: ShapeLabel, order: list[int]) -> ShapeLabel:
    """Map covered_by from draw order into region order."""
    position = {draw: k for k, draw in enumerate(order)}
    return dataclasses.replace(label, covered_by=tuple(position[j] for j in label.covered_by))


def _check_tasks(tasks: Sequence[str]) -> None:
    bad = [t for t in tasks if t not in SHAPES_TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks: unknown {bad}; choose from {list(SHAPES_TASKS)}")


def split_indices(n: int, seed: int, val_fraction: float) -> dict[str, list[int]]:
    """Disjoint image indices per split; at least one val image when val_fraction > 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([seed, 2**32 - 1]).permutation(n)
    val = set(perm[:n_val].tolist())
    return {
        "train": [i for i in range(n) if i not in val],
        "val": sorted(val),
    }


def _split_rows(
    indices: list[int],
    split: str,
    cfg: ShapesConfig,
    tasks: Sequence[str],
    counts: dict[str, int],
    bar: tqdm,
) -> Iterator[dict[str, Any]]:
    for index in indices:
        for row in image_rows(index, split, cfg, tasks):
            counts[row["task"]] = counts.get(row["task"], 0) + 1
            yield row
        bar.update(1)


def write_shapes_dataset(
    out_dir: str,
    *,
    n: int = 2000,
    seed: int | None = None,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    rows_per_shard: int = 2000,
    config: ShapesConfig | None = None,
    tasks: Sequence[str] = SHAPES_TASKS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write out_dir/{train,val}/shapes-*.parquet and out_dir/meta.json; return the meta.

    `seed` and `image_size` override `config` (default seed 0, image_size 128). The split is
    by image, so no image appears in both splits. The returned meta's "files" are the shard
    paths as written (under out_dir); meta.json lists them relative to out_dir.
    """
    cfg = config or ShapesConfig()
    overrides = {"seed": seed, "image_size": image_size}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    _check_tasks(tasks)
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    splits = split_indices(n, cfg.seed, val_fraction)
    _prepare_dirs(out_dir, list(splits), overwrite)
    counts: dict[str, dict[str, Any]] = {}
    files: dict[str, list[str]] = {}
    with tqdm(total=n, desc="shapes", unit="img", disable=not progress) as bar:
        for split, indices in splits.items():
            task_counts: dict[str, int] = {}
            rows = _split_rows(indices, split, cfg, tasks, task_counts, bar)
            paths = write_shards(rows, os.path.join(out_dir, split), "shapes", rows_per_shard)
            files[split] = [os.path.relpath(p, out_dir) for p in paths]
            counts[split] = {
                "images": len(indices),
                "rows": sum(task_counts.values()),
                "tasks": task_counts,
            }
    meta = {
        "source": SOURCE,
        "n": n,
        "val_fraction": val_fraction,
        "config": cfg.to_dict(),
        "tasks": list(tasks),
        "colours": list(cfg.colours),
        "shapes": list(cfg.shapes),
        "sizes": list(SIZES),
        "counts": counts,
        "files": files,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    # The caller gets paths it can open; meta.json keeps them relative so the folder can move.
    written = {split: [os.path.join(out_dir, p) for p in paths] for split, paths in files.items()}
    return {**meta, "files": written}


def _prepare_dirs(out_dir: str, splits: list[str], overwrite: bool) -> None:
    """Refuse to mix with an earlier data set's shards, or remove them when overwrite is set."""
    for split in splits:
        split_dir = os.path.join(out_dir, split)
        old = (
            sorted(f for f in os.listdir(split_dir) if f.endswith(".parquet"))
            if os.path.isdir(split_dir)
            else []
        )
        if old and not overwrite:
            raise FileExistsError(f"{split_dir} already holds shards; pass overwrite=True")
        for name in old:
            os.remove(os.path.join(split_dir, name))
        os.makedirs(split_dir, exist_ok=True)


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
