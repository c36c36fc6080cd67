"""`--render`: an overlay PNG per image (each mask tinted, outlined and labelled with its index
and category) and a static HTML gallery over the whole output, a page at a time."""

from __future__ import annotations

import colorsys
import html
import io
import posixpath
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from osprey.infer.regions import Region
from osprey.io.output import GALLERY_DIR, OutputDir

# Overlays are written at least MIN and at most MAX pixels on their longer side (small images
# are enlarged so their labels stay readable).
MIN_OVERLAY_SIDE = 512
MAX_OVERLAY_SIDE = 1024
ALPHA = 0.45


def colour(index: int) -> tuple[int, int, int]:
    """Distinct, stable colours: hues a golden-ratio step apart."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay(image: np.ndarray, regions: Sequence[Region], labels: Sequence[str]) -> Image.Image:
    """The image with each region tinted and outlined, labelled "index: label" at its box."""
    height, width = image.shape[:2]
    longer = max(height, width)
    scale = min(MAX_OVERLAY_SIDE, max(MIN_OVERLAY_SIDE, longer)) / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST
    canvas = np.asarray(Image.fromarray(image).resize(size, resample), dtype=np.float32)
    # Smallest last, so a small region inside a large one stays visible.
    order = sorted(range(len(regions)), key=lambda i: -regions[i].area)
    for i in order:
        mask = regions[i].mask()
        if scale != 1.0:
            mask = (
                np.asarray(Image.fromarray(mask * 255).resize(size, Image.Resampling.NEAREST)) > 0
            )
        mask = mask.astype(bool)
        tint = np.array(colour(i), dtype=np.float32)
        canvas[mask] = (1 - ALPHA) * canvas[mask] + ALPHA * tint
        edge = mask & ~_erode(mask)
        canvas[edge] = tint
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i in order:
        x, y = regions[i].bbox[0] * scale, regions[i].bbox[1] * scale
        text = f"{i}: {labels[i]}" if i < len(labels) and labels[i] else str(i)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=colour(i), font=font)
    return out


def overlay_png(image: np.ndarray, regions: Sequence[Region], labels: Sequence[str]) -> bytes:
    buffer = io.BytesIO()
    overlay(image, regions, labels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


# --------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------

_COLUMNS = [
    "image_path",
    "mask_index",
    "category",
    "short_caption",
    "detailed_caption",
    "answer",
    "render",
    "error",
]

_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #fafafa; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: 320px; background: white; border: 1px solid #ddd; padding: 0.5em; }
figure img { width: 100%; }
figcaption { font-size: 12px; }
.error { color: #b00; }
ol { padding-left: 1.5em; margin: 0.3em 0; }
nav { margin: 1em 0; }
"""


def _images(out: OutputDir) -> Iterator[list[dict]]:
    """Rows grouped by image, one part at a time (an image's rows all lie in one part)."""
    for path in out.parts():
        table = out.read_column(path, _COLUMNS)
        by_image: dict[str, list[dict]] = {}
        for row in table.to_pylist():
            by_image.setdefault(row["image_path"], []).append(row)
        for name in sorted(by_image):
            yield sorted(
                by_image[name], key=lambda r: -1 if r["mask_index"] is None else r["mask_index"]
            )


def _figure(rows: list[dict]) -> str:
    first = rows[0]
    name = html.escape(first["image_path"])
    parts = ["<figure>"]
    if first["render"]:
        src = html.escape(posixpath.join("..", first["render"]))
        parts.append(f'<a href="{src}"><img src="{src}" loading="lazy" alt="{name}"></a>')
    parts.append(f"<figcaption><b>{name}</b>")
    if first["error"]:
        parts.append(f'<div class="error">{html.escape(first["error"])}</div>')
    items = []
    for r in rows:
        if r["mask_index"] is None:
            continue
        texts = [r[c] for c in ("category", "short_caption", "answer") if r[c]]
        line = html.escape(" | ".join(texts))
        if r["detailed_caption"]:
            line += f"<br><small>{html.escape(r['detailed_caption'])}</small>"
        items.append(f'<li value="{r["mask_index"]}">{line}</li>')
    if items:
        parts.append("<ol>" + "".join(items) + "</ol>")
    elif not first["error"]:
        parts.append("<div>no regions found</div>")
    parts.append("</figcaption></figure>")
    return "".join(parts)


def _page_name(number: int) -> str:
    return "index.html" if number == 1 else f"page-{number:04d}.html"


def _page(number: int, figures: list[str], has_next: bool) -> bytes:
    links = []
    if number > 1:
        links.append(f'<a href="{_page_name(number - 1)}">previous</a>')
    if has_next:
        links.append(f'<a href="{_page_name(number + 1)}">next</a>')
    nav = f"<nav>page {number} {' '.join(links)}</nav>"
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>osprey caption, page "
        f"{number}</title><style>{_STYLE}</style></head><body>{nav}"
        f"<div class='grid'>{''.join(figures)}</div>{nav}</body></html>"
    )
    return body.encode("utf-8")


def write_gallery(out: OutputDir, per_page: int = 100) -> str:
    """Write DST/gallery/index.html (and further pages); returns the index's URI.

    A page is written once the next one is known to exist, so only one page is in memory.
    """
    if per_page < 1:
        raise ValueError(f"per_page must be >= 1, got {per_page}")
    number, figures, full = 1, [], None
    for rows in _images(out):
        if len(figures) == per_page:
            full, figures = figures, []
        figures.append(_figure(rows))
        if full is not None:
            out.write_bytes(f"{GALLERY_DIR}/{_page_name(number)}", _page(number, full, True))
            number, full = number + 1, None
    out.write_bytes(f"{GALLERY_DIR}/{_page_name(number)}", _page(number, figures, False))
    return out.where.child(f"{GALLERY_DIR}/index.html").uri
