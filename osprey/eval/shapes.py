"""The `shapes` benchmark: category questions on the synthetic validation split.

`evaluate_shapes` scores a model in this process (the quickstart's last step); the same benchmark
runs as a Ray job with `osprey eval --benchmark shapes` (osprey.eval.job), scored by
`score_answer`.

Each region of each held-out image is asked the data set's own category question (the first
turn of its `category` rows) alone, with greedy decoding; a prediction is right when its
normalised text equals the region's "<colour> <shape>".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from osprey.data.images import decode_image
from osprey.data.masks import decode_region
from osprey.data.shapes import COLOURS, SHAPES, normalize_answer
from osprey.data.shards import iter_rows
from osprey.model.image_processing import preprocess_image
from osprey.prompts import TEMPLATES, build_generation_ids

_REGION = re.compile(r"<region\d+>")


@dataclass
class ShapesScore:
    total: int = 0
    correct: int = 0
    colour_correct: int = 0
    shape_correct: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)  # (prediction, truth)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def as_metrics(self) -> dict[str, float]:
        n = max(self.total, 1)
        return {
            "shapes_accuracy": self.correct / n,
            "shapes_colour_accuracy": self.colour_correct / n,
            "shapes_shape_accuracy": self.shape_correct / n,
            "shapes_regions": float(self.total),
        }


def category_questions(shards_dir: str | Path, limit: int | None = None):
    """(image bytes, region, question, truth) for every region of the `category` rows."""
    n = 0
    for shard in sorted(Path(shards_dir).glob("*.parquet")):
        for row in iter_rows(str(shard)):
            if row["task"] != "category":
                continue
            first = row["conversations"][0]["value"]
            for region in row["regions"]:
                yield row["image"], region, _REGION.sub("<region1>", first), region["category"]
                n += 1
                if limit is not None and n >= limit:
                    return


@torch.no_grad()
def evaluate_shapes(
    model,
    tokenizer,
    shards_dir: str | Path,
    *,
    template: str = "vicuna_v1",
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int = 8,
) -> ShapesScore:
    model.eval()
    score = ShapesScore()
    items = list(category_questions(shards_dir, limit))
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [
            build_generation_ids(
                tokenizer, q, template=TEMPLATES[template], num_regions=1
            ).input_ids
            for _, _, q, _ in chunk
        ]
        images = torch.stack(
            [preprocess_image(decode_image(img), model.config.vision) for img, _, _, _ in chunk]
        )
        masks = [torch.from_numpy(decode_region(r)[None].astype(np.uint8)) for _, r, _, _ in chunk]
        outputs = model.generate(prompts, images, masks, max_new_tokens=max_new_tokens)
        for out, (_, _, _, truth) in zip(outputs, chunk, strict=True):
            score_answer(score, tokenizer.decode(out, skip_special_tokens=True), truth)
    return score


def score_answer(score: ShapesScore, answer: str, truth: str) -> None:
    """Adds one region's answer to `score` (also the `shapes` benchmark job's scorer)."""
    prediction, truth = normalize_answer(answer), normalize_answer(truth)
    score.total += 1
    score.correct += prediction == truth
    words = prediction.split()
    score.colour_correct += bool(set(words) & set(COLOURS)) and truth.split()[0] in words
    score.shape_correct += bool(set(words) & set(SHAPES)) and truth.split()[-1] in words
    if len(score.examples) < 20:
        score.examples.append((prediction, truth))
