"""The five Osprey-724K files.

Every file is a JSON list of entries {"file_name", "height", "width", "annotation": [{...,
"segmentation"}], and "conversations" or "description"}; one row per entry, its annotations are
the regions in file order. The files write a region as `<regionK>` (1-based into "annotation").
How each kind's text becomes our turns, following what Osprey trains on:

- conversation / short / part: Osprey shows every mask exactly once, in an opening sentence that
  names them ("... region1<mask><pos>,region2<mask><pos>. "), and the text then calls them by name:
  it strips the angle brackets, so "<region1>" reads "region1". We store exactly that: the first
  human turn starts with the intro, whose `<regionK>` tags are the only ones in the conversation,
  and every other "<regionK>" becomes "regionK". Short-form and part-level questions end with the
  single-word-or-phrase instruction, as in Osprey.
- posneg: every "<regionK>" in a question stands for the mask itself; the tags are kept as they
  are (Osprey replaces each one by <mask><pos>).
- detailed: "description" holds "<regionK>: text" strings. The description becomes region K's
  label (its `category`) and the conversation stays empty: the pipeline draws a question for each
  region when it reads the row, as Osprey does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from osprey.data.converters.base import (
    ConversionStats,
    decode_region,
    entry_size,
    image_candidates,
    load_image,
    make_row,
    qa_pairs,
    turn,
)
from osprey.io.storage import Location, as_location

KINDS = ("conversation", "detailed", "short", "part", "posneg")
SHORT_ANSWER = " Answer the question using a single word or phrase."
_WITH_SHORT_ANSWER = ("short", "part")

_REGION_TAG = re.compile(r"<region(\d+)>")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")
_DESCRIPTION = re.compile(r"^\s*<(?:region(\d+)|[^>]*)>\s*:\s*(.*)$", re.DOTALL)


# (regions, conversation turns) of one entry
Converted = tuple[list[dict[str, Any]], list[dict[str, str]]]


def region_intro(n: int) -> str:
    """The opening that shows each of the n masks once and names it regionK."""
    listed = ",".join(f"region{k}<region{k}>" for k in range(1, n + 1))
    if n == 1:
        return f"There is 1 part region in the picture: {listed}. "
    return f"There are {n} part regions in the picture: {listed}. "


def name_regions(text: str) -> str:
    """File text -> text that names regions: "<region2>" -> "region2", other brackets dropped."""
    return _IMAGE_TAG.sub(" ", text).strip().replace("<", "").replace(">", "")


def parse_descriptions(descriptions: Any) -> dict[int, str]:
    """["<region2>: text", ...] -> {2: "text", ...}; an untagged string counts by its position."""
    out: dict[int, str] = {}
    if not isinstance(descriptions, list):
        return out
    for position, item in enumerate(descriptions, start=1):
        text = str(item)
        match = _DESCRIPTION.match(text)
        if match:
            k = int(match.group(1)) if match.group(1) else position
            text = match.group(2)
        else:
            k = position
        if text.strip():
            out[k] = text.strip()
    return out


@dataclass
class Osprey724K:
    """One of the five Osprey-724K files; `kind` is also the rows' task."""

    annotations: str | Location
    images: str | Location
    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Osprey-724K kind {self.kind!r} is not one of {KINDS}")
        self.annotations = as_location(self.annotations)
        self.images = as_location(self.images)
        self.source = self.source or f"osprey_{self.kind}"

    def entries(self) -> list[tuple[int, dict[str, Any]]]:
        data = self.annotations.read_json()
        if not isinstance(data, list):
            raise ValueError(f"{self.annotations.uri}: expected a JSON list of Osprey-724K entries")
        return list(enumerate(data))

    def convert(
        self, entry: tuple[int, dict[str, Any]], stats: ConversionStats
    ) -> dict[str, Any] | None:
        k, ann = entry
        file_name = str(ann.get("file_name", ""))
        where = f"{self.source} entry {k} ({file_name})"
        size = entry_size(ann, stats, where)
        if size is None:
            return None
        annotations = ann.get("annotation")
        if not isinstance(annotations, list) or not annotations:
            stats.skip_entry(where, "no annotation list")
            return None
        if self.kind == "detailed":
            result = self._detailed(annotations, ann.get("description"), size, stats, where)
        else:
            result = self._conversation(annotations, ann.get("conversations"), size, stats, where)
        if result is None:
            return None
        regions, conversations = result
        image = load_image(self.images, image_candidates(file_name), stats, where, size)
        if image is None:
            return None
        return make_row(
            sample_id=f"{self.source}:{file_name}:{k}",
            source=self.source,
            task=self.kind,
            image=image,
            regions=regions,
            conversations=conversations,
        )

    def _detailed(
        self,
        annotations: list[Any],
        descriptions: Any,
        size: tuple[int, int],
        stats: ConversionStats,
        where: str,
    ) -> Converted | None:
        width, height = size
        texts = parse_descriptions(descriptions)
        regions = []
        for i, a in enumerate(annotations, start=1):
            ann_where = f"{where} region {i}"
            if i not in texts:
                stats.skip_annotation(ann_where, "no description for this region")
                continue
            region = decode_region(_segmentation(a), height, width, texts[i], stats, ann_where)
            if region is not None:
                regions.append(region)
        if not regions:
            stats.skip_entry(where, "no described region with a usable mask")
            return None
        return regions, []

    def _conversation(
        self,
        annotations: list[Any],
        conversations: Any,
        size: tuple[int, int],
        stats: ConversionStats,
        where: str,
    ) -> Converted | None:
        width, height = size
        pairs = qa_pairs(conversations)
        if not pairs:
            stats.skip_entry(where, "no human/gpt question-answer pair")
            return None
        regions = []
        for i, a in enumerate(annotations, start=1):
            region = decode_region(
                _segmentation(a), height, width, None, stats, f"{where} region {i}"
            )
            if region is None:
                # The text refers to regions by number; without this one it would be wrong.
                stats.skip_entry(where, f"region {i} is unusable and the text refers to it")
                return None
            regions.append(region)
        if self.kind == "posneg":
            try:
                return regions, posneg_turns(pairs, len(regions))
            except ValueError as exc:
                stats.skip_entry(where, str(exc))
                return None
        limit = SHORT_ANSWER if self.kind in _WITH_SHORT_ANSWER else ""
        return regions, named_turns(pairs, len(regions), limit)


def named_turns(pairs: list[tuple[str, str]], n: int, limit: str = "") -> list[dict[str, str]]:
    """Turns where the intro shows the n masks once and the text calls them region1, region2..."""
    turns = []
    for j, (question, answer) in enumerate(pairs):
        question = name_regions(question) + limit
        if j == 0:
            question = region_intro(n) + question
        turns += [turn("human", question), turn("gpt", name_regions(answer))]
    return turns


def posneg_turns(pairs: list[tuple[str, str]], n: int) -> list[dict[str, str]]:
    """Turns whose <regionK> tags stand for the masks themselves; ValueError for a K beyond n."""
    turns = []
    for question, answer in pairs:
        question = _IMAGE_TAG.sub(" ", question).strip()
        bad = [int(k) for k in _REGION_TAG.findall(question) if not 1 <= int(k) <= n]
        if bad:
            raise ValueError(f"a question names region {bad[0]} of {n}")
        turns += [turn("human", question), turn("gpt", answer)]
    return turns


def _segmentation(annotation: Any) -> Any:
    return annotation.get("segmentation") if isinstance(annotation, dict) else None
