"""The shapes data set's vocabulary (colours, shapes, sizes, positions, number words) and
its typed drawing config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from osprey.data.schema import TASKS

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
