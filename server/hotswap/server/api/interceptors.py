"""Cross-cutting concerns of every RPC, in one place: bearer-token auth, the
mapping of domain errors to gRPC status codes (and their failure metric), and the
count of calls in flight that a drain waits for."""
from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import grpc

from ..errors import MAX_MESSAGE_CHARS, HotswapError, InvalidArgument, shown

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .state import ServerState

log = logging.getLogger("hotswap.server")

# Kubernetes' gRPC probes cannot send credentials.
UNAUTHENTICATED_OK = ("/grpc.health.v1.Health/",)
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
OPEN_ENDED = ("/grpc.health.v1.Health/Watch", "/hotswap.v1.TunerService/WatchTrainingJob", *REFLECTION)
"""Streams that end when their client ends them, not when their work is done: a drain does not wait for them."""


def _wrap(handler: grpc.RpcMethodHandler, around, deserializer=None) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour runs inside `around` (unary or streaming response),
    its request deserializer replaced by `deserializer(original)` when given."""
    deserialize = deserializer(handler.request_deserializer) if deserializer else handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(around(handler.unary_unary, False), deserialize, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(around(handler.unary_stream, True), deserialize, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(around(handler.stream_unary, False), deserialize, handler.response_serializer)
    if handler.stream_stream:  # server reflection
        return grpc.stream_stream_rpc_method_handler(around(handler.stream_stream, True), deserialize, handler.response_serializer)
    return handler


class Malformed:
    """What a request that fails to parse becomes, so the handler's wrapper can refuse it with
    INVALID_ARGUMENT (grpc answers UNKNOWN when a deserializer raises)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def refuse(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid protobuf message: {shown(str(self.error))}", field="request")


def _tolerant(deserialize):
    if deserialize is None:
        return None

    def run(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - bad bytes from a client, refused by the handler's wrapper
            return Malformed(e)

    return run


async def _checked(requests: AsyncIterator) -> AsyncIterator:
    async for r in requests:
        if isinstance(r, Malformed):
            raise r.refuse()
        yield r


def _parsed(request):
    """The request, or the stream of requests, with malformed messages refused."""
    if isinstance(request, Malformed):
        raise request.refuse()
    return _checked(request) if hasattr(request, "__aiter__") else request


async def _responses(fn, request, context) -> AsyncIterator:
    """A streaming handler's responses, whichever way it sends them: an async generator
    yields them; a coroutine (grpc's health Watch) writes them with context.write."""
    out = fn(request, context)
    if hasattr(out, "__aiter__"):
        async for item in out:
            yield item
    else:
        await out


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the calls in flight in `state.calls`, open-ended streams (OPEN_ENDED) aside: what a drain
    waits for before it stops the server (a health Watch would otherwise hold the exit for the whole
    drain time, however soon the work was done)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_ENDED):
            return handler
        return _wrap(handler, lambda fn, streaming: self._streaming(fn) if streaming else self._unary(fn))

    def _unary(self, fn):
        async def run(request, context):
            self.state.calls += 1
            try:
                return await fn(request, context)
            finally:
                self.state.calls -= 1

        return run

    def _streaming(self, fn):
        async def run(request, context):
            self.state.calls += 1
            try:
                async for item in _responses(fn, request, context):
                    yield item
            finally:
                self.state.calls -= 1

        return run


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """HotswapError → its status code with the message naming the field; anything
    else → INTERNAL (logged with its traceback). Counts failures by code."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        return _wrap(handler, lambda fn, streaming: self._streaming(fn, details.method) if streaming else self._unary(fn, details.method),
                     _tolerant)

    def _unary(self, fn, method: str):
        async def run(request, context):
            try:
                return await fn(_parsed(request), context)
            except Exception as e:  # noqa: BLE001 - mapped to a status here, once
                await self._abort(e, context, method)

        return run

    def _streaming(self, fn, method: str):
        async def run(request, context):
            try:
                async for item in _responses(fn, _parsed(request), context):
                    yield item
            except Exception as e:  # noqa: BLE001 - mapped to a status here, once
                await self._abort(e, context, method)

        return run

    async def _abort(self, e: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
        if isinstance(e, grpc.aio.AbortError):  # the handler aborted on purpose
            raise e
        if isinstance(e, HotswapError):
            code, message = getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL), str(e)
        else:
            log.exception("unexpected error in %s", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {str(e)[:MAX_MESSAGE_CHARS]}"
        if self.metrics is not None:
            self.metrics.failures.labels(code.name).inc()
        await context.abort(code, message)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health checks."""

    def __init__(self, token: str, metrics: Metrics | None, public_reflection: bool = False) -> None:
        self.token = token.encode()
        self.metrics = metrics
        # Reflection lists the API, not data: an operator may let tools browse it without a token.
        self.exempt = UNAUTHENTICATED_OK + (REFLECTION if public_reflection else ())

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.exempt):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token):
            return handler
        reason = "missing" if not given else "invalid"
        metrics = self.metrics

        def around(fn, streaming):
            async def deny(request, context):
                if metrics is not None:
                    metrics.failures.labels("UNAUTHENTICATED").inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {reason} bearer token")

            if not streaming:
                return deny

            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover - unreachable, makes this an async generator

            return deny_stream

        return _wrap(handler, around)
