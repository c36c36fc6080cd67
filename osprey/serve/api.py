"""The HTTP API (v1) and the web page, as a FastAPI app over a `Backend` (the ingress
deployment's handles to the mask generator and the captioner).

Routes: POST /v1/segment, /v1/describe, /v1/chat (JSON with a base64 image) and their
`/upload` variants (multipart), GET /v1/info, /readyz, and /healthz (never authenticated); the
OpenAI-compatible POST /v1/chat/completions and GET /v1/models (osprey.serve.chat_completions).
GET / serves the web page. Requests are checked here, in the ingress, so the model replicas
only ever see images and masks that fit the limits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError

from osprey.infer.config import question_task
from osprey.infer.regions import Region
from osprey.infer.segment import check_boxes, check_points
from osprey.serve.auth import BearerAuth
from osprey.serve.backend import Backend
from osprey.serve.chat_completions import add_chat_completions
from osprey.serve.config import ServeArgs
from osprey.serve.errors import APIError, error_response, field_name, install_error_handlers
from osprey.serve.inputs import (
    check_count,
    image_from_base64,
    load_image,
    mask_png,
    regions_from_request,
)
from osprey.serve.schemas import (
    ChatParams,
    ChatRequest,
    ChatResponse,
    DescribeParams,
    DescribeRequest,
    DescribeResponse,
    ErrorBody,
    Health,
    Info,
    MaskOut,
    Readiness,
    Rle,
    SegmentParams,
    SegmentRequest,
    SegmentResponse,
)

API_VERSION = "1.0.0"
STATIC = Path(__file__).parent / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "malformed JSON"),
        (401, "missing or wrong bearer token (when authentication is on)"),
        (413, "image or body over the limits"),
        (422, "a field is invalid; `error.field` names it"),
        (503, "overloaded: retry later"),
        (504, "a deployment did not answer in time"),
    )
}
P = TypeVar("P", bound=BaseModel)


def create_api(backend: Backend, args: ServeArgs, auth: BearerAuth) -> FastAPI:
    limits = args.limits
    app = FastAPI(
        title="Osprey region understanding",
        version=API_VERSION,
        description=(
            "Segment an image (points, boxes or everything) and describe its regions (masks "
            "as COCO RLE or PNG): category, short caption, detailed description, a free "
            "question, or a multi-turn chat. Errors are JSON `{error: {type, field, message}}`."
        ),
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(
                    400, "content-length", "not a number", "bad_request", request=request
                )
            if int(length) > limits.max_body_bytes:
                return error_response(
                    413,
                    "body",
                    f"{int(length):,} bytes is over the limit of {limits.max_body_bytes:,}",
                    "payload_too_large",
                    request=request,
                )
        return await call_next(request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)], responses=ERRORS)

    # ---- segment -----------------------------------------------------------------------------

    async def segment(image: np.ndarray, params: SegmentParams) -> SegmentResponse:
        size = image.shape[:2]
        if params.everything:
            mode, prompts = "everything", []
        elif params.points is not None:
            check_count(len(params.points), limits, "points", "points")
            mode, prompts = "points", _each(check_points, params.points, size, "points")
        else:
            check_count(len(params.boxes or []), limits, "boxes", "boxes")
            mode, prompts = "boxes", _each(check_boxes, params.boxes or [], size, "boxes")
        found = await backend.segment(image, mode, prompts, limits.max_regions)
        masks = []
        for data in found:
            region = Region.from_dict(data)
            masks.append(
                MaskOut(
                    rle=Rle(size=region.size, counts=region.counts.decode("ascii")),
                    bbox=region.bbox,
                    area=region.area,
                    score=region.predicted_iou,
                    png=mask_png(region) if params.return_png else None,
                )
            )
        return SegmentResponse(
            width=int(size[1]), height=int(size[0]), segmenter=backend.segmenter_name, masks=masks
        )

    @v1.post("/segment", response_model=SegmentResponse, response_model_exclude_none=True)
    async def segment_json(body: SegmentRequest) -> SegmentResponse:
        """Masks for points (one per point), boxes (one per box) or the whole image."""
        return await segment(image_from_base64(body.image, limits), body)

    @v1.post("/segment/upload", response_model=SegmentResponse, response_model_exclude_none=True)
    async def segment_upload(
        image: Annotated[UploadFile, File()], request: Annotated[str, Form()] = "{}"
    ) -> SegmentResponse:
        """/v1/segment with the image as a file; `request` holds the other fields as JSON."""
        params = _params(SegmentParams, request)
        return await segment(await _upload(image, args), params)

    # ---- describe ----------------------------------------------------------------------------

    async def describe(image: np.ndarray, params: DescribeParams) -> DescribeResponse:
        cap = _max_new_tokens(params.max_new_tokens, args)
        if params.question is not None:
            _check_text(params.question, "question", args)
            try:
                question_task(params.question)
            except ValueError as exc:
                raise APIError(422, "question", str(exc), "bad_question") from exc
        regions = regions_from_request(params.regions, image.shape[:2], limits)
        answers = await backend.describe(
            image,
            [r.to_dict() for r in regions],
            list(dict.fromkeys(params.tasks)),
            params.question,
            cap,
            params.decoding,
        )
        return DescribeResponse(answers=answers)

    @v1.post("/describe", response_model=DescribeResponse)
    async def describe_json(body: DescribeRequest) -> DescribeResponse:
        """Per region: the asked tasks' answers (and the free question's, as `answer`)."""
        return await describe(image_from_base64(body.image, limits), body)

    @v1.post("/describe/upload", response_model=DescribeResponse)
    async def describe_upload(
        image: Annotated[UploadFile, File()], request: Annotated[str, Form()]
    ) -> DescribeResponse:
        """/v1/describe with the image as a file; `request` holds the other fields as JSON."""
        params = _params(DescribeParams, request)
        return await describe(await _upload(image, args), params)

    # ---- chat --------------------------------------------------------------------------------

    async def chat(image: np.ndarray, params: ChatParams) -> ChatResponse:
        cap = _max_new_tokens(params.max_new_tokens, args)
        regions = regions_from_request(params.regions, image.shape[:2], limits)
        turns = _turns(params, len(regions), args)
        params = {"max_new_tokens": cap, "decoding": params.decoding}
        answer = await backend.chat(image, [r.to_dict() for r in regions], turns, params)
        return ChatResponse(answer=answer["text"])

    @v1.post("/chat", response_model=ChatResponse)
    async def chat_json(body: ChatRequest) -> ChatResponse:
        """The assistant's next turn in a conversation about the image's regions."""
        return await chat(image_from_base64(body.image, limits), body)

    @v1.post("/chat/upload", response_model=ChatResponse)
    async def chat_upload(
        image: Annotated[UploadFile, File()], request: Annotated[str, Form()]
    ) -> ChatResponse:
        """/v1/chat with the image as a file; `request` holds the other fields as JSON."""
        params = _params(ChatParams, request)
        return await chat(await _upload(image, args), params)

    # ---- service -----------------------------------------------------------------------------

    @v1.get("/info", response_model=Info)
    async def info() -> Info:
        """The model, segmenter, tasks and limits this service runs with."""
        return Info(
            model=backend.model_name,
            segmenter=backend.segmenter_name,
            tasks=["category", "short", "detailed"],
            auth=auth.enabled,
            limits=limits.model_dump(),
            max_batch_size=args.max_batch_size,
        )

    app.include_router(v1)
    add_chat_completions(app, backend, args, auth)

    @app.get(
        "/readyz",
        response_model=Readiness,
        dependencies=[Depends(auth)],
        responses={401: ERRORS[401], 503: {"model": Readiness, "description": "not ready"}},
    )
    async def readiness():
        """Ready when every deployment answers."""
        states = await backend.ready()
        ready = all(s == "ok" for s in states.values())
        body = Readiness(ready=ready, deployments=states).model_dump()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/healthz", response_model=Health)
    async def health() -> Health:
        """The ingress is up (no authentication)."""
        return Health()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- helpers ---------------------------------------------------------------------------------


def _each(check, items: Sequence, size: tuple[int, int], field: str) -> list[tuple[float, ...]]:
    out = []
    for i, item in enumerate(items):
        try:
            out += check([item], size)
        except ValueError as exc:
            raise APIError(422, f"{field}[{i}]", str(exc), "out_of_image") from exc
    return out


def _params(model: type[P], text: str) -> P:
    """The `request` form field of an upload route, parsed as `model`."""
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, "request", "not valid JSON", "malformed_json") from exc
        where = field_name(first["loc"])
        raise APIError(
            422, f"request.{where}" if where else "request", first["msg"], "validation_error"
        ) from exc


async def _upload(file: UploadFile, args: ServeArgs) -> np.ndarray:
    data = await file.read(args.limits.max_image_bytes + 1)
    return load_image(data, args.limits, "image")


def _max_new_tokens(asked: int | None, args: ServeArgs) -> int:
    if asked is not None and asked > args.limits.max_new_tokens:
        raise APIError(
            422,
            "max_new_tokens",
            f"{asked} is over the limit of {args.limits.max_new_tokens}",
            "too_many_tokens",
        )
    return asked or args.limits.max_new_tokens


def _check_text(text: str, field: str, args: ServeArgs) -> None:
    if len(text) > args.limits.max_message_chars:
        raise APIError(
            422,
            field,
            f"{len(text):,} characters is over the limit of {args.limits.max_message_chars:,}",
            "text_too_long",
        )


def _turns(params: ChatParams, num_regions: int, args: ServeArgs) -> list[dict]:
    """Messages as the prompt builder's human/gpt turns; placeholders checked here."""
    from osprey.prompts.regions import has_region_marker, rewrite_regions

    messages = params.messages
    if len(messages) > args.limits.max_messages:
        raise APIError(
            422,
            "messages",
            f"{len(messages)} messages is over the limit of {args.limits.max_messages}",
            "too_many_messages",
        )
    turns = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(
                422,
                f"{field}.role",
                f"expected {expected!r}: turns alternate user/assistant, starting with the user",
                "bad_conversation",
            )
        _check_text(message.content, f"{field}.content", args)
        try:
            if message.role == "user":
                rewrite_regions(message.content, num_regions=num_regions)
            elif has_region_marker(message.content):
                raise ValueError("assistant turns cannot hold region placeholders")
        except ValueError as exc:
            raise APIError(422, f"{field}.content", str(exc), "bad_region_reference") from exc
        turns.append(
            {"from": "human" if message.role == "user" else "gpt", "value": message.content}
        )
    if messages[-1].role != "user":
        raise APIError(
            422, f"messages[{len(messages) - 1}].role", "the last turn must be the user's",
            "bad_conversation",
        )  # fmt: skip
    return turns


def dump_openapi(path: str | Path) -> None:
    """Write the OpenAPI schema without starting anything (docs, clients)."""

    class _NoBackend:
        segmenter_name = model_name = ""

    app = create_api(_NoBackend(), ServeArgs(model="unused"), BearerAuth(None))  # type: ignore[arg-type]
    Path(path).write_text(json.dumps(app.openapi(), indent=2))
