"""What every converter shares: the protocol, skip accounting, mask and image checks, row building.

A converter turns one source data set into SHARD_SCHEMA rows in two steps so that the work can be
split across Ray tasks: `entries()` reads the annotation file once and returns small, picklable
units (one per output row at most), and `convert(entry, stats)` turns one unit into a row, reading
its image. A bad annotation or a missing image never stops a conversion: it is skipped, counted in
`ConversionStats` and logged with its id.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from PIL import Image
from tqdm import tqdm

from osprey.data import masks
from osprey.data.schema import TASKS
from osprey.io.storage import Location

logger = logging.getLogger("osprey.data.converters")

# COCO 2014 file names ("COCO_train2014_000000123456.jpg") are the 2017 names with a prefix; several
# Osprey files use the 2014 names while their instructions put the 2017 images in the image root.
_COCO2014_NAME = re.compile(r"^(?:.*/)?COCO_[a-z]+\d{4}_(\d+\.\w+)$")


@dataclass
class ConversionStats:
    rows: int = 0
    skipped_annotations: int = 0
    skipped_entries: int = 0

    def skip_annotation(self, where: str, reason: str) -> None:
        self.skipped_annotations += 1
        logger.warning("skipped %s: %s", where, reason)

    def skip_entry(self, where: str, reason: str) -> None:
        self.skipped_entries += 1
        logger.warning("skipped %s: %s", where, reason)

    def merge(self, other: ConversionStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> str:
        return (
            f"{self.rows} rows, skipped {self.skipped_annotations} annotations "
            f"and {self.skipped_entries} entries"
        )


class Converter(Protocol):
    source: str

    def entries(self) -> list[Any]:
        """Read the annotation file: one picklable unit per potential row, in file order."""
        ...

    def convert(self, entry: Any, stats: ConversionStats) -> dict[str, Any] | None:
        """One unit -> one SHARD_SCHEMA row, or None (skipped and counted in `stats`)."""
        ...


def iter_rows(
    converter: Converter,
    stats: ConversionStats | None = None,
    entries: Sequence[Any] | None = None,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Convert `entries` (default: all of the converter's) and yield the rows; counts into `stats`."""
    stats = stats if stats is not None else ConversionStats()
    if entries is None:
        entries = converter.entries()
    for entry in tqdm(entries, desc=converter.source, unit="entry", disable=not progress):
        row = converter.convert(entry, stats)
        if row is not None:
            stats.rows += 1
            yield row


@dataclass(frozen=True)
class LoadedImage:
    uri: str
    data: bytes  # the file's bytes, never re-encoded
    width: int
    height: int


def make_row(
    *,
    sample_id: str,
    source: str,
    task: str,
    image: LoadedImage,
    regions: list[dict[str, Any]] | None = None,
    conversations: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"sample {sample_id}: unknown task {task!r}; expected one of {TASKS}")
    return {
        "sample_id": sample_id,
        "source": source,
        "task": task,
        "image_path": image.uri,
        "image": image.data,
        "width": image.width,
        "height": image.height,
        "regions": regions or [],
        "conversations": conversations or [],
    }


def image_candidates(file_name: str) -> list[str]:
    """Names to try under the image root: the file's own, then the COCO 2017 name of a 2014 one."""
    names = [file_name]
    match = _COCO2014_NAME.match(file_name)
    if match:
        names.append(match.group(1))
    return names


def load_image(
    root: Location,
    names: Iterable[str],
    stats: ConversionStats,
    where: str,
    expect_size: tuple[int, int] | None = None,
) -> LoadedImage | None:
    """Read the first existing `root/name`; its size comes from the header (no decoding).

    `expect_size` is the (width, height) the annotation claims: masks are decoded at that size, so
    an image of another size would silently misplace them and the entry is skipped instead.
    """
    names = list(names)
    for name in names:
        location = root.child(name)
        if location.exists():
            break
    else:
        stats.skip_entry(where, f"image {names[0]!r} not found under {root.uri}")
        return None
    data = location.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # PIL raises many types for a bad header; any of them means skip
        stats.skip_entry(where, f"{location.uri} is not a readable image ({exc})")
        return None
    if expect_size is not None and (width, height) != tuple(expect_size):
        stats.skip_entry(
            where,
            f"{location.uri} is {width}x{height} but the annotation says "
            f"{expect_size[0]}x{expect_size[1]}",
        )
        return None
    return LoadedImage(location.uri, data, width, height)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_polygon(polygon: Any) -> bool:
    # pycocotools reads a 4-number "polygon" as a box and shorter ones crash it; COCO has a few.
    return (
        isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(_is_number(v) for v in polygon)
    )


def _checked_segmentation(segmentation: Any, height: int, width: int) -> Any:
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if _valid_polygon(p)]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        return polygons
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        if not isinstance(size, (list, tuple)) or [int(v) for v in size] != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size [{height}, {width}]")
        return segmentation
    raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")


def decode_region(
    segmentation: Any,
    height: int,
    width: int,
    label: str | None,
    stats: ConversionStats,
    where: str,
) -> dict[str, Any] | None:
    """COCO segmentation -> shard region, or None (skipped, counted, logged) if it cannot be used."""
    try:
        cleaned = _checked_segmentation(segmentation, height, width)
        region = masks.annotation_to_region(cleaned, height, width, label)
    except Exception as exc:  # pycocotools raises bare Exception for some malformed input
        stats.skip_annotation(where, f"mask cannot be decoded ({exc})")
        return None
    if region["area"] <= 0:
        stats.skip_annotation(where, "empty mask (it lies outside the image)")
        return None
    return region


def entry_size(entry: dict[str, Any], stats: ConversionStats, where: str) -> tuple[int, int] | None:
    """(width, height) an annotation entry claims, or None (entry skipped) if absent or bad."""
    try:
        width, height = int(entry["width"]), int(entry["height"])
    except (KeyError, TypeError, ValueError) as exc:
        stats.skip_entry(where, f"no usable width/height ({exc!r})")
        return None
    if width <= 0 or height <= 0:
        stats.skip_entry(where, f"non-positive size {width}x{height}")
        return None
    return width, height


def qa_pairs(conversations: Any) -> list[tuple[str, str]] | None:
    """Alternating human/gpt turns -> (question, answer) pairs; a trailing question is dropped.
    None if the turns do not alternate as LLaVA-style files do."""
    if not isinstance(conversations, list):
        return None
    pairs = []
    for i in range(0, len(conversations) - 1, 2):
        q, a = conversations[i], conversations[i + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)):
            return None
        if q.get("from") != "human" or a.get("from") != "gpt":
            return None
        pairs.append((str(q.get("value", "")), str(a.get("value", ""))))
    return pairs


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}
