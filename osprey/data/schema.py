"""The shard format: one parquet row per image-and-conversation sample.

Every converter writes rows of this schema and every reader checks it, so the training pipeline,
the captioning job and the evaluation readers never see a source's own format. See docs/data.md.
"""

from __future__ import annotations

import pyarrow as pa

REGION_TYPE = pa.struct(
    [
        # COCO compressed RLE, exactly as pycocotools.mask.encode returns it (bytes).
        pa.field("counts", pa.binary(), nullable=False),
        # [height, width] of the mask, which is the image's size.
        pa.field("size", pa.list_(pa.int32(), 2), nullable=False),
        # COCO [x, y, w, h] in pixels.
        pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("area", pa.float64(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
    ]
)

TURN_TYPE = pa.struct(
    [
        # "human" or "gpt", as in LLaVA/Osprey JSON files.
        pa.field("from", pa.string(), nullable=False),
        # Text; regions are referred to as <region1>, <region2>, ... (1-based into `regions`).
        pa.field("value", pa.string(), nullable=False),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        # Encoded image bytes as stored (JPEG/PNG/...), never decoded pixels.
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("regions", pa.list_(REGION_TYPE), nullable=False),
        pa.field("conversations", pa.list_(TURN_TYPE), nullable=False),
    ]
)

# Task kinds a row can have. Rows whose conversation is empty are templated at load time from
# their regions (e.g. COCO categories become "What is the category of <region1>?" turns).
TASKS = (
    "caption",  # stage 1: image-level caption, no regions
    "category",  # stage 2: region -> category name
    "refer",  # stage 2: region -> referring expression
    "short",  # region -> short description
    "detailed",  # region -> detailed description
    "conversation",  # multi-turn, multi-region conversation
    "posneg",  # positive/negative yes-no questions
    "part",  # part-level category / attribute questions
    "images",  # a plain image with no annotation (captioning input)
)
