"""Errors in OpenAI's JSON shape with the HTTP status a client expects, in one place
(the HTTP counterpart of api/interceptors.py), counted in the same failure metric
under the same code names as gRPC.

    {"error": {"message": "temperature: ...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_argument"}}
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..errors import MAX_MESSAGE_CHARS, HotswapError, InvalidArgument, shown

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("hotswap.server.http")

STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
         413: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
RETRY_AFTER_SECONDS = "1"
"""429 (queue full) and 503 (starting, draining) are worth retrying soon; clients honour Retry-After."""


class HTTPFailure(Exception):
    """An HTTP-only error (no gRPC counterpart): a body too large, an unknown route."""

    def __init__(self, status: int, message: str, code: str, grpc_code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.grpc_code, self.param = status, message, code, grpc_code, param


def status_of(e: HotswapError) -> int:
    # RESOURCE_EXHAUSTED is also "this request can never fit the KV cache": not worth a retry.
    if e.code == "RESOURCE_EXHAUSTED" and e.field != "max_queue":
        return 400
    return STATUS.get(e.code, 500)


def error_body(status: int, message: str, code: str, param: str | None) -> dict:
    return {"error": {"message": message[:MAX_MESSAGE_CHARS], "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def from_hotswap(e: HotswapError) -> tuple[int, dict]:
    status = status_of(e)
    code = "model_not_found" if status == 404 and e.field == "model" else e.code.lower()
    return status, error_body(status, str(e), code, e.field)


def from_validation(e: ValidationError) -> InvalidArgument:
    """pydantic's first problem as InvalidArgument naming the field the way gRPC errors do: messages[0].content."""
    errors = e.errors(include_url=False)
    # A union reports each branch; the deepest location is the branch the caller meant.
    err = max(errors, key=lambda x: len(x["loc"]))
    if err["type"] == "json_invalid":
        return InvalidArgument(f"the request body is not valid JSON: {err['msg']}", field="body")
    parts = [p for p in err["loc"] if isinstance(p, int) or not ("[" in p or p in ("str", "int", "float", "bool"))]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "body"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unrecognised request argument"
    elif "input" in err and err["type"] != "missing":
        message += f", got {shown(err['input'])}"
    return InvalidArgument(message, field=field)


def respond(status: int, body: dict) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def install(app, metrics: Metrics | None) -> None:
    """Exception handlers: every failure leaves as OpenAI's error object, counted by code."""

    def count(code: str) -> None:
        if metrics is not None:
            metrics.failures.labels(code).inc()

    @app.exception_handler(HotswapError)
    async def hotswap_error(request: Request, e: HotswapError) -> JSONResponse:
        count(e.code)
        return respond(*from_hotswap(e))

    @app.exception_handler(HTTPFailure)
    async def http_failure(request: Request, e: HTTPFailure) -> JSONResponse:
        count(e.grpc_code)
        return respond(e.status, error_body(e.status, e.message, e.code, e.param))

    @app.exception_handler(404)
    async def not_found(request: Request, e: Exception) -> JSONResponse:
        return respond(404, error_body(404, f"no route {request.method} {shown(request.url.path)}", "not_found", None))

    @app.exception_handler(405)
    async def not_allowed(request: Request, e: Exception) -> JSONResponse:
        return respond(405, error_body(405, f"{request.method} is not allowed on {shown(request.url.path)}", "method_not_allowed", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        count("INTERNAL")
        return respond(500, error_body(500, f"internal error: {type(e).__name__}: {str(e)[:MAX_MESSAGE_CHARS]}", "internal", None))
