"""Domain errors. Each carries the gRPC status it maps to, so the service layer
translates them in one place (an interceptor) instead of in every handler."""
from __future__ import annotations


MAX_MESSAGE_CHARS = 2000
"""An error message is sent in the call's trailing metadata: past ~8 KiB a client's metadata
limit would replace the real error with RESOURCE_EXHAUSTED."""


def shown(value: object, limit: int = 200) -> str:
    """repr() of a caller's value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class HotswapError(Exception):
    """Base class. `code` is a grpc.StatusCode name; `field` names the offending input."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "…"


def renamed(error: HotswapError, fields: dict[str, str]) -> HotswapError:
    """`error` with its field as the caller's API names it (`fields`: the engine's name → the caller's)."""
    error.field = fields.get(error.field, error.field)
    return error


class InvalidArgument(HotswapError):
    code = "INVALID_ARGUMENT"


class NotFound(HotswapError):
    code = "NOT_FOUND"


class AdapterIncompatible(HotswapError):
    """The adapter cannot run on the loaded base model (shape, layers, targets, rank)."""

    code = "FAILED_PRECONDITION"


class FailedPrecondition(HotswapError):
    """The request is well formed but the system is not in a state to do it."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(HotswapError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(HotswapError):
    code = "UNAVAILABLE"


class Cancelled(HotswapError):
    code = "CANCELLED"


class ModelLoadError(HotswapError):
    """The base model could not be found or loaded (missing files, offline hub, bad GGUF)."""

    code = "FAILED_PRECONDITION"


class DeadlineExceeded(HotswapError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(HotswapError):
    code = "UNAUTHENTICATED"


class PermissionDenied(HotswapError):
    """The caller named something the server's configuration forbids it to read."""

    code = "PERMISSION_DENIED"
