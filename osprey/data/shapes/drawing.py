"""Drawing shapes images: unit geometry, rasterisation, placement with occlusion, scenes and
their per-pixel label maps. No text and no files."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from osprey.data.shapes.config import (
    BACKGROUND_LABEL,
    BACKGROUND_RGB,
    COLOUR_RGB,
    COLOURS,
    COVER_MIN_RATIO,
    SHAPES,
    SIZES,
    ShapesConfig,
)

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
