"""The OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models.

Clients that speak the Chat Completions API (the `openai` package, and whatever already talks to
vLLM or SGLang) reach the same batched engine as /v1/chat. One image per conversation, as a
`data:` URL `image_url` part of the first user message. Regions come either from the `regions`
extension field (RLE or PNG masks as in /v1/describe; `extra_body` in the openai client), named
in the text as `<region1>`, `<region2>`, ..., or, without that field, from the image's alpha
channel (one region, as NVIDIA's Describe Anything server takes it). The `regions` field wins
over an opaque alpha channel; `regions` together with a partly transparent image is ambiguous
and refused. Sampling is greedy unless `temperature` > 0. Errors use OpenAI's error body.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osprey.infer.regions import Region
from osprey.serve.auth import BearerAuth
from osprey.serve.config import Limits, ServeArgs
from osprey.serve.errors import APIError, field_name
from osprey.serve.inputs import b64decode, load_image_alpha, regions_from_request
from osprey.serve.schemas import RegionIn

if TYPE_CHECKING:
    from osprey.serve.backend import Backend

MAX_STOP = 4


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class CompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extension: the regions the messages name as <region1>, <region2>, ...
    regions: list[RegionIn] | None = None
    # Extension: "reference" samples as the released code does (temperature, top_p and
    # top_k of the request are then ignored); default: the deployment's decoding.
    decoding: Literal["greedy", "reference"] | None = None


def add_chat_completions(app: FastAPI, backend: Backend, args: ServeArgs, auth: BearerAuth) -> None:
    @app.get("/v1/models", dependencies=[Depends(auth)], tags=["openai"])
    async def models() -> dict[str, Any]:
        """The served model, in OpenAI's list format."""
        return {"object": "list", "data": [_model_card(args.served_model_name)]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], tags=["openai"])
    async def chat_completions(request: Request):
        """OpenAI Chat Completions (see the module docstring), streamed with `stream: true`."""
        body = await _parse(request)
        if body.model != args.served_model_name:
            raise APIError(
                404, "model", f"the model {body.model!r} does not exist; this server has "
                f"{args.served_model_name!r}", "model_not_found",
            )  # fmt: skip
        if body.n not in (None, 1):
            raise APIError(400, "n", f"n={body.n}: only one choice per request", "unsupported")
        image, alpha, turns = _conversation(body, args)
        regions = _regions(body, image, alpha, args.limits)
        turns = _check_turns(turns, len(regions), args)
        params = _sampling(body, args)
        name, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        masks = [r.to_dict() for r in regions]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = await backend.chat_stream(image, masks, turns, params)
            chunks = _sse(events, name, created, args.served_model_name, include_usage)
            return StreamingResponse(
                chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        out = await backend.chat(image, masks, turns, params)
        return {
            "id": name,
            "object": "chat.completion",
            "created": created,
            "model": args.served_model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "finish_reason": out["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": _usage(out),
        }


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "osprey"}


async def _parse(request: Request) -> CompletionRequest:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, None, "the body is not valid JSON", "malformed_json") from exc
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = field_name(first["loc"])
        raise APIError(400, where, first["msg"], "invalid_value") from exc


def _conversation(
    body: CompletionRequest, args: ServeArgs
) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    """The image (colour channels and alpha), and the turns as (role, text) pairs."""
    image = alpha = None
    turns = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        if message.role in ("system", "developer"):
            raise APIError(
                400, f"{where}.role", "system messages are not supported: Osprey's prompt has "
                "its own fixed system line", "unsupported",
            )  # fmt: skip
        parts = message.content
        if parts is None:
            raise APIError(400, f"{where}.content", "a message needs content", "invalid_value")
        if isinstance(parts, str):
            parts = [ContentPart(type="text", text=parts)]
        texts = []
        for k, part in enumerate(parts):
            at = f"{where}.content[{k}]"
            if part.type == "text":
                texts.append(part.text or "")
                continue
            if message.role != "user" or part.image_url is None:
                raise APIError(400, at, "only user messages carry an image_url", "invalid_value")
            if image is not None:
                raise APIError(400, at, "one image per conversation", "too_many_images")
            if i != 0:
                raise APIError(
                    400, at, "the image belongs in the first user message", "invalid_value"
                )
            image, alpha = _image(part.image_url.url, args, f"{at}.image_url.url")
        turns.append({"role": message.role, "text": "\n".join(t for t in texts if t)})
    if image is None:
        raise APIError(
            400, "messages[0].content", "no image: give one image_url part (a data: URL) in the "
            "first user message", "missing_image",
        )  # fmt: skip
    return image, alpha, turns


def _image(url: str, args: ServeArgs, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    if not url.startswith("data:"):
        raise APIError(
            400, field, "only data: URLs are accepted (this server fetches no URLs)",
            "unsupported_url",
        )  # fmt: skip
    data = b64decode(url, field, args.limits.max_image_bytes)
    return load_image_alpha(data, args.limits, field)


def _regions(
    body: CompletionRequest, image: np.ndarray, alpha: np.ndarray | None, limits: Limits
) -> list[Region]:
    partly_transparent = alpha is not None and bool((alpha < 255).any())
    if body.regions is not None:
        if partly_transparent:
            raise APIError(
                400, "regions", "ambiguous regions: the image's alpha channel is a mask and "
                "`regions` is given; send the masks in `regions` with an opaque image, or one "
                "region as the alpha channel without `regions`", "ambiguous_regions",
            )  # fmt: skip
        return regions_from_request(body.regions, image.shape[:2], limits, "regions")
    if not partly_transparent:
        return []
    mask = (alpha > 0).astype(np.uint8)
    if not mask.any():
        raise APIError(
            400, "messages[0].content", "the image's alpha channel is fully transparent: "
            "no region", "empty_mask",
        )  # fmt: skip
    return [Region.from_mask(np.ascontiguousarray(mask))]


def _check_turns(turns: list[dict], num_regions: int, args: ServeArgs) -> list[dict]:
    """OpenAI roles as the prompt builder's human/gpt turns; placeholders checked here."""
    from osprey.prompts.regions import has_region_marker, rewrite_regions

    limits = args.limits
    if len(turns) > limits.max_messages:
        raise APIError(
            400, "messages", f"{len(turns)} messages is over the limit of {limits.max_messages}",
            "too_many_messages",
        )  # fmt: skip
    out = []
    for i, turn in enumerate(turns):
        field = f"messages[{i}]"
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise APIError(
                400, f"{field}.role", f"expected {expected!r}: turns alternate user/assistant, "
                "starting with the user", "bad_conversation",
            )  # fmt: skip
        text = turn["text"]
        if len(text) > limits.max_message_chars:
            raise APIError(
                400, f"{field}.content", f"{len(text):,} characters is over the limit of "
                f"{limits.max_message_chars:,}", "text_too_long",
            )  # fmt: skip
        try:
            if turn["role"] == "user":
                rewrite_regions(text, num_regions=num_regions)
            elif has_region_marker(text):
                raise ValueError("assistant turns cannot hold region placeholders")
        except ValueError as exc:
            raise APIError(400, f"{field}.content", str(exc), "bad_region_reference") from exc
        out.append({"from": "human" if turn["role"] == "user" else "gpt", "value": text})
    if turns[-1]["role"] != "user":
        raise APIError(
            400, f"messages[{len(turns) - 1}].role", "the last turn must be the user's",
            "bad_conversation",
        )  # fmt: skip
    return out


def _sampling(body: CompletionRequest, args: ServeArgs) -> dict[str, Any]:
    asked = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    cap = args.limits.max_new_tokens
    if asked is not None and asked > cap:
        raise APIError(400, field, f"{asked} is over the limit of {cap}", "too_many_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(400, "stop", f"at most {MAX_STOP} non-empty stop strings", "invalid_value")
    return {
        "temperature": body.temperature or 0.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "seed": body.seed,
        "decoding": body.decoding,
        "max_new_tokens": asked or cap,
        "stop": tuple(stop),
    }


def _usage(out: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": out["prompt_tokens"],
        "completion_tokens": out["completion_tokens"],
        "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
    }


async def _sse(
    events: AsyncIterator[dict[str, Any]], name: str, created: int, model: str, usage: bool
) -> AsyncIterator[str]:
    """Chat Completions chunks as Server-Sent Events, one per decoded delta, then [DONE]."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            "id": name,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    last: dict[str, Any] = {}
    async for event in events:
        last = event
        if event.get("delta"):
            yield chunk({"content": event["delta"]})
    yield chunk({}, last.get("finish_reason", "stop"))
    if usage and "prompt_tokens" in last:
        body = {
            "id": name, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": _usage(last),
        }  # fmt: skip
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
