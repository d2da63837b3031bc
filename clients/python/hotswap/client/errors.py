"""One exception class per gRPC status code the server returns."""
from __future__ import annotations

import grpc


class HotswapError(Exception):
    """Base class: `code` is the gRPC status name, `details` the server's message."""

    code = "UNKNOWN"

    def __init__(self, details: str) -> None:
        super().__init__(f"{self.code}: {details}")
        self.details = details


class InvalidArgument(HotswapError):
    code = "INVALID_ARGUMENT"


class NotFound(HotswapError):
    code = "NOT_FOUND"


class AlreadyExists(HotswapError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(HotswapError):
    """E.g. the adapter does not fit the server's base model."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(HotswapError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(HotswapError):
    """Starting, draining or unreachable; the client already retried."""

    code = "UNAVAILABLE"


class Unauthenticated(HotswapError):
    code = "UNAUTHENTICATED"


class PermissionDenied(HotswapError):
    code = "PERMISSION_DENIED"


class Cancelled(HotswapError):
    code = "CANCELLED"


class DeadlineExceeded(HotswapError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(HotswapError):
    code = "UNIMPLEMENTED"


class Internal(HotswapError):
    code = "INTERNAL"


_BY_CODE = {cls.code: cls for cls in HotswapError.__subclasses__()}


def from_rpc_error(e: grpc.RpcError) -> HotswapError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    cls = _BY_CODE.get(code.name, HotswapError)
    err = cls(details)
    if cls is HotswapError:
        err.code = code.name
    return err
