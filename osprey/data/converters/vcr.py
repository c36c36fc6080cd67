"""VCR (Visual Commonsense Reasoning): train.jsonl plus one metadata JSON per image.

One row per jsonl line (a question about an image). Every detected object becomes a region, in the
order of `objects`; its mask is the union of the object's polygons from the metadata file
(`segms`, lists of [x, y] points in image coordinates), rasterised by pycocotools at the image size.
The `*_orig` texts name objects by 1-based number ("Why is 1 looking at 3?"); each number K becomes
"<class> at regionK". The turns are those of Osprey's reader (vcr.py): the first question opens
with the image line "<image>.\n" (which Osprey's preprocessing turns into "<image>\n.\n"), the
overview line and one of its phrasings that shows each mask once ("Given region1 <mask><pos>,
region2 <mask><pos>,"), directly followed by the question; then the answer, one of its "why"
questions, and the rationale. Osprey draws the phrasing and the "why" once per line when it loads
the file; we draw them once per line too, seeded by the line's id, so a conversion is repeatable.

Osprey's own reader looks the class up with the 1-based number as a 0-based index (naming the next
object's class, and dropping lines that mention the last object); we use the number as 1-based
(docs/fidelity.md). As there, a line whose text has a number that is no object (0, or more than
the object count) is skipped, since a plain number cannot be told from an object reference.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Any

from osprey.data.converters.base import (
    ConversionStats,
    decode_region,
    entry_size,
    load_image,
    make_row,
    turn,
)
from osprey.io.storage import Location, as_location
from osprey.prompts import VCR_REFERENCE_WAYS, VCR_WHY_QUESTIONS, vcr_opening

_NUMBER = re.compile(r"\b(\d+)\b")


def line_rng(sample_id: str) -> random.Random:
    """The draws of one line (phrasing, "why" question): the same on every run and worker."""
    return random.Random(zlib.crc32(sample_id.encode()))


def name_objects(text: str, objects: list[str]) -> str | None:
    """ "Is 2 taller than 1?" -> "Is dog at region2 taller than person at region1?"; None if a
    number is not an object's."""
    bad = False

    def replace(match: re.Match[str]) -> str:
        nonlocal bad
        k = int(match.group(1))
        if not 1 <= k <= len(objects):
            bad = True
            return match.group(0)
        return f"{objects[k - 1]} at region{k}"

    named = _NUMBER.sub(replace, text)
    return None if bad else named


def polygons_to_coco(polygons: Any) -> list[list[float]]:
    """VCR's [[x, y], ...] polygons -> COCO's flat [x1, y1, x2, y2, ...] lists."""
    if not isinstance(polygons, list):
        raise ValueError(f"expected a list of polygons, got {type(polygons).__name__}")
    return [[float(v) for point in polygon for v in point] for polygon in polygons]


@dataclass
class Vcr:
    annotations: str | Location  # train.jsonl
    images: str | Location  # vcr1images: holds both img_fn and metadata_fn
    source: str = "vcr"

    def __post_init__(self) -> None:
        self.annotations = as_location(self.annotations)
        self.images = as_location(self.images)

    def entries(self) -> list[tuple[int, dict[str, Any]]]:
        return list(enumerate(self.annotations.read_jsonl()))

    def convert(
        self, entry: tuple[int, dict[str, Any]], stats: ConversionStats
    ) -> dict[str, Any] | None:
        k, ann = entry
        annot_id = ann.get("annot_id", k)
        where = f"{self.source} {annot_id}"
        objects = [str(o) for o in ann.get("objects") or []]
        texts = [ann.get(key) for key in ("question_orig", "answer_orig", "rationale_orig")]
        if not objects or not all(isinstance(t, str) and t.strip() for t in texts):
            stats.skip_entry(where, "no objects or missing question/answer/rationale")
            return None
        named = [name_objects(t, objects) for t in texts]
        if any(t is None for t in named):
            stats.skip_entry(where, "its text has a number that is no object")
            return None
        try:
            meta = self.images.child(str(ann["metadata_fn"])).read_json()
        except (KeyError, FileNotFoundError, ValueError) as exc:
            stats.skip_entry(where, f"metadata unreadable ({exc!r})")
            return None
        size = entry_size(meta, stats, where)
        if size is None:
            return None
        width, height = size
        segms = meta.get("segms") or []
        regions = []
        for i, name in enumerate(objects):
            ann_where = f"{where} object {i + 1}"
            try:
                polygons = polygons_to_coco(segms[i])
            except (IndexError, TypeError, ValueError) as exc:
                stats.skip_annotation(ann_where, f"no usable polygons ({exc})")
                polygons = None
            region = (
                decode_region(polygons, height, width, name, stats, ann_where)
                if polygons is not None
                else None
            )
            if region is None:
                stats.skip_entry(where, f"object {i + 1} is unusable and the text may refer to it")
                return None
            regions.append(region)
        image = load_image(self.images, [str(ann.get("img_fn", ""))], stats, where, size)
        if image is None:
            return None
        sample_id = f"{self.source}:{annot_id}"
        rng = line_rng(sample_id)
        way = rng.choice(VCR_REFERENCE_WAYS)
        why = rng.choice(VCR_WHY_QUESTIONS)
        question, answer, rationale = named
        return make_row(
            sample_id=sample_id,
            source=self.source,
            task="conversation",
            image=image,
            regions=regions,
            conversations=[
                turn("human", (vcr_opening(len(regions), way) + question).rstrip()),
                turn("gpt", answer),
                turn("human", why),
                turn("gpt", rationale),
            ],
        )
