"""The HTTP edge: request bodies in (Content-Type, size, JSON, fields), and the /v1 gate (API key, loading,
the requests counter). Whatever a client sends is a 2xx or a 4xx with OpenAI's error body from here on."""

from __future__ import annotations

import hmac
import re
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from .protocol import APIError, error_body, refuse_unsupported

M = TypeVar("M", bound=BaseModel)
V1_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def short(value: Any, limit: int = 60) -> str:
    """A client's value in a message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_content_type(request: Request) -> None:
    """JSON or nothing said: a form, text or another charset is a 400 rather than a guess."""
    given = request.headers.get("content-type")
    if given is None:
        return
    mime, *params = (p.strip().lower() for p in given.split(";"))
    charset = next((p.split("=", 1)[1].strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if not (mime == "application/json" or mime.startswith("application/") and mime.endswith("+json")) or \
            charset not in ("utf-8", "utf8"):
        raise APIError(400, f"the body must be JSON in UTF-8 (Content-Type: application/json), not {short(given)}",
                       code="invalid_content_type")


async def read_json(request: Request, model: type[M], limit: int) -> M:
    """The body as `model`: 413 past `limit` bytes; 400 for a wrong Content-Type, bad JSON (invalid UTF-8, nesting
    too deep, NaN, numbers out of range), a value that is not an object, and for fields (naming the field)."""
    check_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    try:  # pydantic's own JSON parser: no Python recursion, strict UTF-8, numbers checked, types strict
        req = model.model_validate_json(bytes(body))
    except ValidationError as e:
        raise invalid(e) from None
    refuse_unsupported(req)
    return req


def invalid(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 that names the field."""
    first = e.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}",
                        code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the body must be a JSON object", code="invalid_json")
    # pydantic names the member of a union it tried ("str", "list[int]", "TextPart"): not a field
    param = ".".join(str(p) for p in first["loc"] if not _UNION_MEMBER.match(str(p))) or None
    message = UNION_MESSAGES.get(param or "", first["msg"]) if len(e.errors()) > 1 else first["msg"]
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*|\w+\[.*\])$")
UNION_MESSAGES = {"prompt": "must be a string, a list of strings, a list of token ids or a list of lists of ids",
                  "stop": "must be a string or a list of strings"}


class V1Gate:
    """ASGI middleware on /v1 routes: the API key (401 without it, compared in constant time), 503 while the model
    loads, and the requests counter by route and status. Plain ASGI rather than BaseHTTPMiddleware, so that
    streamed responses and client disconnects pass through untouched."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state, key = self.state, self.state.settings.api_key
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if key is not None and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            reply: Any = JSONResponse(error_body("a valid API key is needed: Authorization: Bearer KEY",
                                                 code="invalid_api_key"), status_code=401)
        elif not state.ready.is_set():
            reply = JSONResponse(error_body(state.load_error or "the model is loading", "server_error"),
                                 status_code=503)
        else:
            reply = self.app
        try:
            await reply(scope, receive, send_and_note)
        finally:
            state.metrics.requests.labels(path if path in V1_ROUTES else "other", str(status)).inc()
