"""The five Osprey-724K files.

Every file is a JSON list of entries {"file_name", "height", "width", "annotation": [{...,
"segmentation"}], and "conversations" or "description"}; one row per entry, its annotations are
the regions in file order. The files write a region as `<regionK>` (1-based into "annotation").
How each kind's text becomes our turns, following what Osprey trains on:

- conversation / short / part: Osprey shows every mask exactly once, in an opening sentence that
  names them ("Ther are 2 part regions in the picture: region1<mask><pos>,region2<mask><pos>. ",
  sic), and the text then calls them by name: it drops every angle bracket, so "<region1>" reads
  "region1". We store exactly that: the first human turn starts with the opening, whose
  `<regionK>` tags are the only ones in the conversation. Short-form and part-level questions end
  with the single-word-or-phrase instruction, as in Osprey.
- posneg: every "<regionK>" in a question stands for the mask itself; the tags are kept as they
  are (Osprey replaces each one by <mask><pos>).
- detailed: "description" holds "<regionK>: text" strings; the i-th string describes the i-th
  annotation, whatever its tag says (Osprey takes them by position), and its text is what follows
  the last ">: " on its first line. It becomes region i's label (its `category`) and the
  conversation stays empty: the pipeline asks about every region in file order when it reads the
  row, as Osprey does.

The texts come from `osprey.prompts` (docs/fidelity.md says where the reference writes them).
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
from osprey.prompts import SHORT_ANSWER_SUFFIX, regions_overview

KINDS = ("conversation", "detailed", "short", "part", "posneg")
_WITH_SHORT_ANSWER = ("short", "part")

_REGION_TAG = re.compile(r"<region(\d+)>")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")
# Osprey's own pattern: greedy up to the last ">: ", the answer runs to the end of that line.
_DESCRIPTION = re.compile(r"<.*>: (.*)")


# (regions, conversation turns) of one entry
Converted = tuple[list[dict[str, Any]], list[dict[str, str]]]


def name_regions(text: str) -> str:
    """File text -> text that names regions: "<region2>" -> "region2"; every bracket dropped."""
    return text.replace("<", "").replace(">", "")


def parse_descriptions(descriptions: Any) -> dict[int, str]:
    """["<region1>: text", ...] -> {1: "text", ...}: the i-th string describes region i.

    A string without "<...>: " has no description (it is left out, and its region skipped).
    """
    out: dict[int, str] = {}
    if not isinstance(descriptions, list):
        return out
    for position, item in enumerate(descriptions, start=1):
        match = _DESCRIPTION.search(str(item))
        if match and match.group(1).strip():
            out[position] = match.group(1)
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
        limit = SHORT_ANSWER_SUFFIX if self.kind in _WITH_SHORT_ANSWER else ""
        return regions, named_turns(pairs, len(regions), limit)


def named_turns(pairs: list[tuple[str, str]], n: int, limit: str = "") -> list[dict[str, str]]:
    """Turns where the intro shows the n masks once and the text calls them region1, region2..."""
    turns = []
    for j, (question, answer) in enumerate(pairs):
        question = name_regions(question) + limit
        if j == 0:
            # Osprey strips the first turn when it moves <image> to its front.
            question = (regions_overview(n) + question).rstrip()
        turns += [turn("human", question), turn("gpt", name_regions(answer))]
    return turns


def posneg_turns(pairs: list[tuple[str, str]], n: int) -> list[dict[str, str]]:
    """Turns whose <regionK> tags stand for the masks themselves; ValueError for a K beyond n."""
    turns = []
    for j, (question, answer) in enumerate(pairs):
        if _IMAGE_TAG.search(question):
            question = _IMAGE_TAG.sub(" ", question).strip()
        if j == 0:
            question = question.rstrip()
        bad = [int(k) for k in _REGION_TAG.findall(question) if not 1 <= int(k) <= n]
        if bad:
            raise ValueError(f"a question names region {bad[0]} of {n}")
        turns += [turn("human", question), turn("gpt", answer)]
    return turns


def _segmentation(annotation: Any) -> Any:
    return annotation.get("segmentation") if isinstance(annotation, dict) else None
