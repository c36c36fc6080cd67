"""Every error the API returns is JSON: {"error": {"type", "field", "message"}}, where `field`
names the part of the request at fault (`image`, `regions[2].rle`, `messages[0].content`) or is
null when no field is (overload, an unknown route). The OpenAI-compatible routes answer in
OpenAI's shape instead: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the API refuses: its HTTP status, the field at fault and why."""

    def __init__(
        self,
        status: int,
        field: str | None,
        message: str,
        type: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, field, message, type, headers)
        self.status, self.field, self.message, self.type = status, field, message, type
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.field}: {self.message}"


class RequestError(ValueError):
    """Raised by a deployment when the request (not the service) is at fault; the ingress
    answers 422 naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field, self.message = field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


# Routes of the OpenAI-compatible API answer errors in OpenAI's shape, with 400 where the rest
# of the API says 422 (what OpenAI clients expect).
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


def is_openai(request: Request | None) -> bool:
    return request is not None and request.scope.get("path", "").endswith(OPENAI_PATHS)


def error_response(
    status: int,
    field: str | None,
    message: str,
    type: str,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
) -> JSONResponse:
    if is_openai(request):
        return openai_error(status, field, message, type, headers)
    body = {"error": {"type": type, "field": field, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def openai_error(
    status: int,
    param: str | None,
    message: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    status = 400 if status == 422 else status
    kind = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_name(loc: tuple | list) -> str | None:
    """pydantic's error location as a field path: ("body", "regions", 2, "rle") -> regions[2].rle."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header", "form")]
    if not parts:
        return None
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith("function-after") or part in ("list", "dict", "str"):
            continue  # pydantic's validator and union-branch names are not fields
        else:
            text += f".{part}" if text else str(part)
    return text or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.field, exc.message, exc.type, exc.headers, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return error_response(
                400, "body", "the body is not valid JSON", "malformed_json", request=request
            )
        field = field_name(first.get("loc", ()))
        message = str(first.get("msg", "invalid value"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(422, field or "body", message, "validation_error", request=request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, None, message, kind, headers, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        message = f"internal error: {type(exc).__name__}"
        return error_response(500, None, message, "internal_error", request=request)
