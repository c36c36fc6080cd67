"""The API's request and response models (v1): FastAPI turns them into the OpenAPI schema at
/openapi.json and the documentation at /docs.

Images travel as base64 text (a `data:` URL prefix is accepted) in JSON, or as a file in the
`/upload` variants of each route (multipart: `image` file plus `request`, the JSON of the other
fields). Masks travel as COCO RLE in the image's pixel grid (compressed `counts` text or an
uncompressed list of run lengths) or as a PNG whose non-zero pixels are the region.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Base64 = str
TaskName = Literal["category", "short", "detailed"]


Decoding = Literal["greedy", "reference"]
DECODING_HELP = (
    "greedy, or reference: the released code's sampling (temperature 0.2, top-p/top-k from the "
    "model's generation_config.json); default: the deployment's"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- regions ---------------------------------------------------------------------------------


class Rle(_Model):
    """COCO run-length encoding: runs alternate 0s and 1s, column-major, starting with 0s."""

    size: tuple[int, int] = Field(description="[height, width] of the image")
    counts: str | list[int] = Field(
        description="compressed RLE text (pycocotools) or uncompressed run lengths"
    )


class RegionIn(_Model):
    """One region: exactly one of `rle` or `png`."""

    rle: Rle | None = None
    png: Base64 | None = Field(None, description="base64 PNG mask; non-zero pixels are in")

    @model_validator(mode="after")
    def _one(self) -> RegionIn:
        if (self.rle is None) == (self.png is None):
            raise ValueError("give exactly one of rle or png")
        return self


class MaskOut(_Model):
    rle: Rle
    bbox: tuple[float, float, float, float] = Field(description="COCO [x, y, width, height]")
    area: int
    score: float | None = Field(None, description="SAM's predicted IoU; null when classical")
    png: Base64 | None = Field(None, description="the mask as a PNG, when return_png was set")


# ---- segment ---------------------------------------------------------------------------------


class SegmentParams(_Model):
    """Exactly one of points, boxes or everything."""

    points: list[tuple[float, float]] | None = Field(
        None, description="(x, y) pixel points; one mask per point"
    )
    boxes: list[tuple[float, float, float, float]] | None = Field(
        None, description="[x0, y0, x1, y1] boxes; one mask per box"
    )
    everything: bool = Field(False, description="segment the whole image (largest first)")
    return_png: bool = Field(False, description="also return each mask as a PNG")

    @model_validator(mode="after")
    def _one(self) -> SegmentParams:
        given = [self.points is not None, self.boxes is not None, self.everything]
        if sum(given) != 1:
            raise ValueError("give exactly one of points, boxes or everything=true")
        return self


class SegmentRequest(SegmentParams):
    image: Base64


class SegmentResponse(_Model):
    width: int
    height: int
    segmenter: str
    masks: list[MaskOut]


# ---- describe --------------------------------------------------------------------------------


class DescribeParams(_Model):
    regions: list[RegionIn] = Field(min_length=1)
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["category", "short"],
        description="category (one word or phrase), short (a phrase), detailed (paragraph)",
    )
    question: str | None = Field(
        None, description="also a free question naming the region as <region>"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="cap on every answer's length (default: each task's own)"
    )
    decoding: Decoding | None = Field(None, description=DECODING_HELP)

    @model_validator(mode="after")
    def _some_task(self) -> DescribeParams:
        if not self.tasks and self.question is None:
            raise ValueError("ask for at least one task or a question")
        return self


class DescribeRequest(DescribeParams):
    image: Base64


class DescribeResponse(_Model):
    answers: list[dict[str, str]] = Field(
        description="per region, in request order: {task or 'answer': text}"
    )


# ---- chat ------------------------------------------------------------------------------------


class Message(_Model):
    role: Literal["user", "assistant"]
    content: str


class ChatParams(_Model):
    regions: list[RegionIn] = Field(
        default_factory=list,
        description="regions the messages refer to as <region1>, <region2>, ... (1-based)",
    )
    messages: list[Message] = Field(
        min_length=1, description="alternating user/assistant turns, ending with the user's"
    )
    max_new_tokens: int | None = Field(None, ge=1)
    decoding: Decoding | None = Field(None, description=DECODING_HELP)


class ChatRequest(ChatParams):
    image: Base64


class ChatResponse(_Model):
    answer: str


# ---- service ---------------------------------------------------------------------------------


class Health(_Model):
    status: Literal["ok"] = "ok"


class Readiness(_Model):
    ready: bool
    deployments: dict[str, str]


class Info(_Model):
    model: str
    segmenter: str
    tasks: list[str]
    auth: bool
    limits: dict[str, int]
    max_batch_size: int


class ErrorDetail(_Model):
    type: str
    field: str | None
    message: str


class ErrorBody(_Model):
    error: ErrorDetail
