"""One shard row -> one training example: regions sampled and checked, conversation templated
and tokenised, image decoded and preprocessed. Bad rows come back as errors, never exceptions."""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from osprey.data.images import ImageDecodeError, decode_image
from osprey.model.config import VisionConfig
from osprey.model.image_processing import preprocess_image
from osprey.prompts import (
    DETAILED_QUESTIONS,
    PART_IMAGENET_INSTRUCTION,
    PASCAL_PART_INSTRUCTION,
    STAGE2_CATEGORY_INSTRUCTION,
    STAGE2_REFERRING_INSTRUCTION,
    STAGE2_REFERRING_NO_POSITION_INSTRUCTION,
    TEMPLATES,
    VG_QUESTIONS,
    VG_SHORT_PHRASE_SUFFIX,
    choose,
    tokenize_conversation,
)
from osprey.prompts.plain import PLAIN, tokenize_plain

log = logging.getLogger(__name__)

# At most this many regions of one image per sample, in random order (OSPREY.md).
DEFAULT_REGION_CAPS: dict[str, int] = {
    "coco": 20,
    "refcoco": 15,
    "refcoco+": 15,
    "refcocog": 15,
    "pascal_part": 15,
    "partimagenet": 15,
    "vg": 3,
}
# Part data sets name their whole fixed class lists in the instruction (stage2_data.py).
PART_INSTRUCTIONS = {
    "pascal_part": PASCAL_PART_INSTRUCTION,
    "partimagenet": PART_IMAGENET_INSTRUCTION,
}
# Rows of these tasks may carry no conversation: it is templated here from their regions.
TEMPLATED_TASKS = ("category", "refer", "part", "detailed", "short")
_REGION_REF = re.compile(r"<region(\d+)>")


class BadSample(ValueError):
    """A row that cannot become an example; the message says why."""


@dataclass(kw_only=True)
class ExampleConfig:
    """How rows become examples; everything the per-row work needs, picklable for Ray."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    # None: never truncate (the reference's behaviour); else drop trailing exchanges to fit.
    max_length: int | None = 2048
    template: str = "vicuna_v1"  # or "plain" (stage 1 of the release, LLaVA-1.5's recipe)
    region_caps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_REGION_CAPS))
    seed: int = 0
    # The epoch whose draws (regions, their order, question templates) these examples take.
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {self.epoch}")
        if self.template not in TEMPLATES and self.template != PLAIN:
            raise ValueError(
                f"template {self.template!r}: choose one of {sorted([*TEMPLATES, PLAIN])}"
            )


def row_rng(seed: int, sample_id: str, epoch: int = 0) -> random.Random:
    """Per-row randomness, the same on every worker and every run, drawn anew every epoch (the
    reference re-draws regions and templates each time a sample is read)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def check_regions(row: dict[str, Any]) -> None:
    h, w = row["height"], row["width"]
    for k, region in enumerate(row["regions"], start=1):
        if list(region["size"]) != [h, w]:
            raise BadSample(f"region {k} has size {list(region['size'])}, image is {[h, w]}")
        if region["area"] <= 0:
            raise BadSample(f"region {k} has an empty mask")


def sample_regions(row: dict[str, Any], rng: random.Random, cap: int | None) -> list[int]:
    """Indices of at most `cap` labelled regions, in random order."""
    order = [i for i, r in enumerate(row["regions"]) if r.get("category")]
    if not order:
        raise BadSample("no labelled region to ask about")
    rng.shuffle(order)
    return order[:cap] if cap else order


def description_turns(row: dict[str, Any], rng: random.Random, cap: int | None) -> list[dict]:
    """One templated question per region, answer = its description.

    Detailed descriptions (osprey_724k.py) ask about every region in file order; Visual Genome
    (vg.py) asks about at most `cap` regions in random order, with its own questions and suffix.
    """
    detailed = row["task"] == "detailed"
    if detailed:
        order = [i for i, r in enumerate(row["regions"]) if r.get("category")]
        if not order:
            raise BadSample("no labelled region to ask about")
    else:
        order = sample_regions(row, rng, cap)
    turns = []
    for i in order:
        if detailed:
            question = choose(DETAILED_QUESTIONS, rng)
        else:
            question = choose(VG_QUESTIONS, rng).strip() + VG_SHORT_PHRASE_SUFFIX
        turns.append({"from": "human", "value": question.replace("<region>", f"<region{i + 1}>")})
        turns.append({"from": "gpt", "value": row["regions"][i]["category"]})
    return turns


def stage2_turns(row: dict[str, Any], rng: random.Random, cap: int | None) -> list[dict]:
    """Templated stage-2 conversation: one question per sampled region, answer = its label."""
    order = sample_regions(row, rng, cap)
    source = row["source"]
    if row["task"] == "refer":
        instruction = (
            STAGE2_REFERRING_NO_POSITION_INSTRUCTION
            if source == "refcoco+"
            else STAGE2_REFERRING_INSTRUCTION
        )
    else:
        instruction = PART_INSTRUCTIONS.get(source, STAGE2_CATEGORY_INSTRUCTION)
    turns = []
    for n, i in enumerate(order):
        question = f"<region{i + 1}>"
        if n == 0:
            question = "<image>\n" + instruction + question
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": row["regions"][i]["category"]})
    return turns


def conversation_turns(row: dict[str, Any]) -> list[dict]:
    turns = [{"from": t["from"], "value": t["value"]} for t in row["conversations"]]
    n_regions = len(row["regions"])
    for turn in turns:
        for ref in _REGION_REF.findall(turn["value"]):
            if not 1 <= int(ref) <= n_regions:
                raise BadSample(f"conversation refers to <region{ref}> but the row has {n_regions}")
    return turns


class ExampleBuilder:
    """Callable turning shard rows into examples (dicts of numpy values)."""

    def __init__(self, tokenizer: Any, config: ExampleConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.template = TEMPLATES.get(config.template)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._build(row)
        except (BadSample, ImageDecodeError, ValueError) as exc:
            log.warning("skipping sample %s: %s", row.get("sample_id"), exc)
            return self.error(row, str(exc))

    def _build(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        check_regions(row)
        if row["conversations"]:
            turns = conversation_turns(row)
        elif row["task"] in TEMPLATED_TASKS:
            rng = row_rng(cfg.seed, row["sample_id"], cfg.epoch)
            cap = cfg.region_caps.get(row["source"])
            if row["task"] in ("detailed", "short"):
                turns = description_turns(row, rng, cap)
            else:
                turns = stage2_turns(row, rng, cap)
        else:
            raise BadSample(f"task {row['task']!r} has no conversation to train on")
        if self.template is None:
            tokens = tokenize_plain(
                self.tokenizer,
                turns,
                max_length=cfg.max_length,
                num_image_tokens=cfg.vision.num_image_tokens,
            )
        else:
            tokens = tokenize_conversation(
                self.tokenizer,
                turns,
                template=self.template,
                max_length=cfg.max_length,
                num_image_tokens=cfg.vision.num_image_tokens,
                num_regions=len(row["regions"]),
            )
        image = decode_image(row["image"], apply_exif=False)
        if image.size != (row["width"], row["height"]):
            raise BadSample(
                f"image is {image.size[0]}x{image.size[1]}, row says {row['width']}x{row['height']}"
            )
        regions = [row["regions"][i] for i in tokens.region_indices]
        return {
            "sample_id": row["sample_id"],
            "source": row["source"],
            "input_ids": np.asarray(tokens.input_ids, dtype=np.int64),
            "labels": np.asarray(tokens.labels, dtype=np.int64),
            "pixel_values": preprocess_image(image, cfg.vision).numpy(),
            "mask_counts": [bytes(r["counts"]) for r in regions],
            "mask_size": np.asarray([row["height"], row["width"]], dtype=np.int64),
            "error": "",
        }

    def error(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        size = self.config.vision.image_size
        return {
            "sample_id": str(row.get("sample_id")),
            "source": str(row.get("source")),
            "input_ids": np.zeros(0, dtype=np.int64),
            "labels": np.zeros(0, dtype=np.int64),
            "pixel_values": np.zeros((3, size, size), dtype=np.float32),
            "mask_counts": [],
            "mask_size": np.zeros(2, dtype=np.int64),
            "error": reason or "error",
        }
