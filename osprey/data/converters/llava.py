"""LLaVA stage-1 caption files: blip_laion_cc_sbu_558k.json and CC3M-595K's chat.json.

Both are JSON lists of {"id", "image", "conversations": [human, gpt]} where the human turn is a
caption request holding an `<image>` placeholder and the gpt turn is the caption. One row per
entry, task "caption", no regions, width/height from the image header. The turns are kept as
written, placeholder included: LLaVA puts it before or after the request at random, and the
tokeniser splices the image where it stands (rows without one get the image prefix instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from osprey.data.converters.base import ConversionStats, load_image, make_row, qa_pairs, turn
from osprey.io.storage import Location, as_location

IMAGE_PLACEHOLDER = "<image>"


def placeholder_ok(pairs: list[tuple[str, str]]) -> bool:
    """At most one `<image>`, and only in the first question (what the tokeniser accepts)."""
    texts = [text for pair in pairs for text in pair]
    total = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    return total == 0 or (total == 1 and IMAGE_PLACEHOLDER in texts[0])


@dataclass
class LlavaCaptions:
    annotations: str | Location
    images: str | Location
    source: str = "cc3m"

    def __post_init__(self) -> None:
        self.annotations = as_location(self.annotations)
        self.images = as_location(self.images)

    def entries(self) -> list[tuple[int, dict[str, Any]]]:
        data = self.annotations.read_json()
        if not isinstance(data, list):
            raise ValueError(f"{self.annotations.uri}: expected a JSON list of LLaVA entries")
        return list(enumerate(data))

    def convert(
        self, entry: tuple[int, dict[str, Any]], stats: ConversionStats
    ) -> dict[str, Any] | None:
        k, ann = entry
        image_name = str(ann.get("image", ""))
        where = f"{self.source} entry {k} ({ann.get('id', image_name)})"
        pairs = qa_pairs(ann.get("conversations"))
        if not image_name or not pairs:
            stats.skip_entry(where, "no image or no human/gpt caption pair")
            return None
        if not placeholder_ok(pairs):
            stats.skip_entry(where, f"{IMAGE_PLACEHOLDER} must appear once, in the first question")
            return None
        image = load_image(self.images, [image_name], stats, where)
        if image is None:
            return None
        turns = []
        for question, caption in pairs:
            turns += [turn("human", question), turn("gpt", caption)]
        return make_row(
            sample_id=f"{self.source}:{ann.get('id', image_name)}:{k}",
            source=self.source,
            task="caption",
            image=image,
            conversations=turns,
        )
