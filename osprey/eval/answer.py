"""The answering stage of an evaluation: items in, one prediction row per region (or question).

`AnswerStage` loads the model once (a Ray Data actor, or the local runner's one object), and per
batch of items decodes the images, builds the masks (RLE, or segment ids of a panoptic PNG) and
asks every region its question with the shared-prefix engine (osprey.infer.engine); image-level
questions (POPE) go through the engine's `ask`. Decoding is greedy unless a
temperature is given. A failure stays with its item: the item's rows carry an `error`. Each
call commits its items' rows as one parquet part (osprey.io.output's atomic writes), so a
killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from osprey.infer.config import EngineConfig, question_task
from osprey.io.output import OutputDir, part_name
from osprey.io.storage import S3Options, resolve

SUMMARY_SCHEMA = pa.schema(
    [pa.field("part", pa.string()), pa.field("items", pa.int64()), pa.field("errors", pa.int64())]
)

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("region_id", pa.string()),  # None for an image-level question
        pa.field("image_path", pa.string()),
        pa.field("question", pa.string()),
        pa.field("prediction", pa.string()),
        pa.field("truth", pa.string()),  # JSON
        pa.field("error", pa.string()),
    ]
)


def read_uri(uri: str, s3: S3Options | None = None) -> bytes:
    return resolve(uri, s3).read_bytes()


def item_masks(item: dict[str, Any], regions: list[dict], s3: S3Options | None = None) -> list:
    """(H, W) uint8 masks of an item's regions, in order."""
    from pycocotools import mask as mask_utils

    if item.get("panoptic_path"):
        from PIL import Image

        from osprey.eval.openvocab import rgb2id

        png = np.asarray(Image.open(io.BytesIO(read_uri(item["panoptic_path"], s3))).convert("RGB"))
        ids = rgb2id(png)
        return [(ids == r["segment"]).astype(np.uint8) for r in regions]
    masks = []
    for r in regions:
        rle = {"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode("ascii")}
        masks.append(mask_utils.decode(rle))
    return masks


class AnswerStage:
    """See the module docstring; `__call__` adapts it to Ray Data's pyarrow batches."""

    def __init__(
        self,
        model_dir: str,
        question: str | None,
        max_new_tokens: int,
        engine: EngineConfig,
        device: str = "cpu",
        dtype: str | None = None,
        s3: S3Options | None = None,
        max_pixels: int | None = None,
        out: OutputDir | None = None,
        tracking_uri: str | None = None,
        adapter: str | None = None,
    ) -> None:
        from osprey.infer.engine import RegionCaptioner

        # `model_dir` may be any model name: fetched once per node (osprey.io.models).
        self.engine = RegionCaptioner.from_pretrained(
            model_dir, engine, device=device, dtype=dtype, tracking_uri=tracking_uri, s3=s3,
            adapter=adapter,
        )  # fmt: skip
        self.question = question
        self.max_new_tokens = max_new_tokens
        self.s3 = s3
        self.max_pixels = max_pixels
        self.out = out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Predictions of a batch of items; with `out`, they are committed there as one part
        and a summary row comes back instead."""
        items = batch.to_pylist()
        rows = self.process(items)
        if self.out is None:
            return pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
        return pa.Table.from_pylist([self.commit(items, rows)], schema=SUMMARY_SCHEMA)

    def commit(self, items: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the rows of whole items as one part (atomically, named by the items)."""
        if self.out is None:
            raise RuntimeError(
                "commit needs an output folder (this answerer was built without one)"
            )
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), sink)
        name = part_name([item["item_id"] for item in items])
        self.out.write_bytes(name, sink.getvalue().to_pybytes())
        errors = len({r["item_id"] for r in rows if r["error"]})
        return {"part": name, "items": len(items), "errors": errors}

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        loaded, rows = [], []
        for item in items:
            try:
                loaded.append((item, *self._load(item)))
            except Exception as exc:
                rows += _rows(item, None, f"{_where(item)}: {type(exc).__name__}: {exc}")
        region_items = [x for x in loaded if x[0]["regions"] is not None]
        image_items = [x for x in loaded if x[0]["regions"] is None]
        by_question: dict[str, list] = defaultdict(list)
        for entry in region_items:
            by_question[entry[0]["question"] or self.question].append(entry)
        for question, group in by_question.items():
            rows += self._regions(question, group)
        if image_items:
            rows += self._images(image_items)
        return rows

    def _load(self, item: dict[str, Any]) -> tuple[np.ndarray, list[dict] | None, list | None]:
        from osprey.data.images import DEFAULT_MAX_PIXELS, decode_image

        data = item["image"] if item["image"] is not None else read_uri(item["image_path"], self.s3)
        # Annotations are made on the stored pixel grid: no EXIF rotation.
        image = np.asarray(
            decode_image(data, self.max_pixels or DEFAULT_MAX_PIXELS, apply_exif=False)
        )
        if item["regions"] is None:
            return image, None, None
        regions = json.loads(item["regions"])
        masks = item_masks(item, regions, self.s3)
        for mask in masks:
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"a {mask.shape[0]}x{mask.shape[1]} mask for a "
                    f"{image.shape[0]}x{image.shape[1]} image"
                )
        return image, regions, masks

    def _regions(self, question: str, group: list) -> list[dict[str, Any]]:
        task = question_task(question, self.max_new_tokens)
        try:
            answers = self.engine.caption([g[1] for g in group], [g[3] for g in group], [task])
        except Exception:
            if len(group) == 1:
                item = group[0][0]
                import traceback

                return _rows(item, question, f"{_where(item)}: {traceback.format_exc(limit=1)}")
            return [row for g in group for row in self._regions(question, [g])]
        rows = []
        for (item, _, regions, _), per_region in zip(group, answers, strict=True):
            for region, answer in zip(regions, per_region, strict=True):
                rows.append(_row(item, region, question, answer[task.name]))
        return rows

    def _images(self, group: list) -> list[dict[str, Any]]:
        """Image-level questions: "<image>\\n" + the item's question, as the reference asks."""
        params = self.engine.config.sampling(self.max_new_tokens)
        answers = self.engine.ask(
            [image for _, image, *_ in group], [item["question"] for item, *_ in group], params
        )
        return [
            _row(item, None, item["question"], answer)
            for (item, *_), answer in zip(group, answers, strict=True)
        ]


def _where(item: dict[str, Any]) -> str:
    return item["image_path"] or f"item {item['item_id']}"


def _row(item: dict, region: dict | None, question: str | None, prediction: str | None) -> dict:
    return {
        "item_id": item["item_id"],
        "region_id": None if region is None else region["id"],
        "image_path": item["image_path"],
        "question": question,
        "prediction": prediction,
        "truth": json.dumps(region["truth"] if region is not None else json.loads(item["truth"])),
        "error": None,
    }


def _rows(item: dict, question: str | None, error: str) -> list[dict]:
    """Error rows: one per region (or one for an image-level item)."""
    regions = json.loads(item["regions"]) if item["regions"] else [None]
    rows = []
    for region in regions:
        row = _row(item, region, question or item["question"], None)
        row["error"] = error
        rows.append(row)
    return rows
