"""HTTP plumbing of the steering service: the error body, exception handlers and the guard middleware.

Every client mistake is answered ``{"error": {"code", "message", "details"?}}`` with a 4xx status;
:class:`GuardMiddleware` (outermost) records metrics for every request, checks the API key for
policy writes and enforces the body-size limit before any parsing.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from safesteer.errors import ContextTooLong, SafesteerError
from safesteer.serve.metrics import Metrics
from safesteer.serve.worker import Overloaded

API_KEY_HEADER = "X-API-Key"


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Optional[list[dict[str, Any]]] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 503)
}


# ------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error response with a status, a short code and a one-line message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = (
            status,
            code,
            message,
            details,
            headers,
        )


def _error_json(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "overloaded",
    504: "timeout",
}


def _clean_errors(errors: Sequence[Mapping[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    out = []
    for e in list(errors)[:limit]:
        out.append(
            {
                "loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
                "msg": str(e.get("msg", "invalid")),
                "type": str(e.get("type", "value_error")),
            }
        )
    return out


def _first_message(details: list[dict[str, Any]]) -> str:
    if not details:
        return "invalid request"
    d = details[0]
    loc = ".".join(str(x) for x in d["loc"] if x != "body") or "body"
    more = f" (+{len(details) - 1} more)" if len(details) > 1 else ""
    return f"{loc}: {d['msg']}{more}"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_json(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _clean_errors(exc.errors())
        if any(d["type"] == "json_invalid" for d in details):
            return _error_json(400, "malformed_json", "the request body is not valid JSON", details)
        if (
            len(details) == 1
            and details[0]["loc"] == ["body"]
            and details[0]["type"] in ("model_attributes_type", "dict_type", "model_type")
        ):
            return _error_json(
                422,
                "invalid_body",
                "the request body must be a JSON object (send Content-Type: application/json)",
                details,
            )
        return _error_json(422, "validation_error", _first_message(details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        if exc.status_code == 400 and "parsing the body" in message:
            return _error_json(400, "malformed_json", "the request body cannot be parsed as JSON")
        return _error_json(
            exc.status_code, _CODES.get(exc.status_code, "http_error"), message, headers=exc.headers
        )

    @app.exception_handler(SafesteerError)
    async def _safesteer(_request: Request, exc: SafesteerError) -> JSONResponse:
        if isinstance(exc, ContextTooLong):
            return _error_json(422, "context_length_exceeded", exc.message)
        return _error_json(400, "bad_request", exc.message)

    @app.exception_handler(Overloaded)
    async def _overloaded(_request: Request, exc: Overloaded) -> JSONResponse:
        return _error_json(503, "overloaded", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:  # a bug, never a client mistake
        return _error_json(500, "internal_error", f"internal server error ({type(exc).__name__})")


# --------------------------------------------------------------------------------- middleware
async def _send_json(
    send: Callable, status: int, payload: dict[str, Any], headers: Mapping[str, str] | None = None
) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Outermost app layer: metrics for every request, API-key check for policy writes, body size limit.

    The body is read here (at most ``max_body`` bytes; a larger Content-Length or a longer body is
    refused with 413 before any parsing) and replayed to the application.
    """

    WRITE_METHODS = frozenset({"PUT", "DELETE", "POST", "PATCH"})

    def __init__(
        self,
        app: Any,
        max_body: int,
        api_key: str | None,
        metrics: Metrics,
        route_of: Callable[[dict], str | None] | None = None,
    ):
        self.app = app
        self.max_body = int(max_body)
        self.api_key = api_key
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            if not await self._handle(scope, receive, send_wrapper):
                status[0] = 499  # the client went away before sending its whole body
        finally:
            endpoint = getattr(scope.get("route"), "path", None)
            if endpoint is None and self.route_of is not None:  # answered here (401/413) before routing
                endpoint = self.route_of(scope)
            endpoint = endpoint or "unmatched"
            self.metrics.observe_request(
                endpoint, scope.get("method", "?"), status[0], time.perf_counter() - start
            )

    def _authorised(self, scope: dict) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get(API_KEY_HEADER.lower())
        if given is None:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        assert self.api_key is not None
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "replace"), self.api_key.encode("utf-8")
        )

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> bool:
        """False when the client disconnected before the body was read."""
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        if self.api_key and method in self.WRITE_METHODS and path.startswith("/v1/policies"):
            if not self._authorised(scope):
                await _send_json(
                    send,
                    401,
                    {
                        "error": {
                            "code": "unauthorized",
                            "message": f"missing or wrong API key; send it in the {API_KEY_HEADER} header",
                        }
                    },
                    {"WWW-Authenticate": "Bearer"},
                )
                return True
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    await _send_json(
                        send,
                        400,
                        {"error": {"code": "bad_request", "message": "Content-Length is not an integer"}},
                    )
                    return True
                if declared > self.max_body:
                    await _send_json(
                        send,
                        413,
                        {
                            "error": {
                                "code": "payload_too_large",
                                "message": f"request body of {declared} bytes exceeds the limit of "
                                f"{self.max_body} bytes",
                            }
                        },
                    )
                    return True
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_json(
                    send,
                    413,
                    {
                        "error": {
                            "code": "payload_too_large",
                            "message": f"request body exceeds the limit of {self.max_body} bytes",
                        }
                    },
                )
                return True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
        return True
