"""Domain errors and their one mapping to gRPC status codes.

    ServingError                 base; never raised itself
    ├── InvalidArgument          INVALID_ARGUMENT    undecodable image, wrong dimension, bad schema, unknown mode
    ├── ResourceExhausted        RESOURCE_EXHAUSTED  too large, too many items, queue full
    ├── NotFound                 NOT_FOUND           unknown model or shard
    ├── FailedPrecondition       FAILED_PRECONDITION models of a mode absent, index of another embedder
    ├── Unavailable              UNAVAILABLE         a backend is down
    ├── DeadlineExceeded         DEADLINE_EXCEEDED
    └── Unauthenticated          UNAUTHENTICATED     missing or wrong token

Pipelines raise these; the server interceptor turns them into statuses (no servicer catches them).
Any other exception becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[ServingError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        ResourceExhausted,
        NotFound,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
    )
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a caller sees for an exception."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    if isinstance(exc, grpc.RpcError):
        # A downstream call failed: pass its status through unchanged.
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"


def error_for(code: grpc.StatusCode, message: str) -> ServingError:
    """The domain error for a status code (INTERNAL for codes without their own class)."""
    cls = _BY_CODE.get(code, ServingError)
    return cls(message)


def item_status(exc: BaseException | None) -> tuple[int, str]:
    """(google.rpc.Code value, message) for one item of a batch; (0, "") when it succeeded."""
    if exc is None:
        return 0, ""
    code, message = status_of(exc)
    return code.value[0], message
