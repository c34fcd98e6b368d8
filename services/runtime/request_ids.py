"""Request ids: one per call, taken from the caller's `x-request-id` metadata or made here, carried
to downstream calls, and written on every log line about the call (gateway and service alike)."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc

METADATA_KEY = "x-request-id"
MAX_LENGTH = 64  # a caller's id is echoed into logs: bounded, printable

_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current() -> str:
    """The id of the call this code runs for ("" outside a call)."""
    return _current.get()


def _acceptable(value: str) -> bool:
    return 0 < len(value) <= MAX_LENGTH and value.isprintable() and " " not in value


def begin(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """Set (and return) the current call's id: the caller's, when it sent a sane one, else a new one."""
    given = next((str(v) for k, v in (metadata or ()) if k == METADATA_KEY), "")
    rid = given if _acceptable(given) else uuid.uuid4().hex[:16]
    _current.set(rid)
    return rid


Extra = Callable[[], Sequence[tuple[str, str]]]


def _with_id(details: grpc.aio.ClientCallDetails, extra: Extra | None) -> grpc.aio.ClientCallDetails:
    added = list(extra()) if extra is not None else []
    rid = current()
    if rid:
        added.append((METADATA_KEY, rid))
    if not added:
        return details
    keys = {k for k, _ in added}
    metadata = [(k, v) for k, v in (details.metadata or ()) if k not in keys] + added
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:  # generic in grpc-stubs only
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor


class _Adds:
    def __init__(self, extra: Extra | None) -> None:
        self.extra = extra


class _UnaryUnary(_Adds, _UnaryUnaryBase):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_id(details, self.extra), request)


class _UnaryStream(_Adds, _UnaryStreamBase):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_id(details, self.extra), request)


class _StreamUnary(_Adds, _StreamUnaryBase):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_id(details, self.extra), request_iterator)


class _StreamStream(_Adds, _StreamStreamBase):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_id(details, self.extra), request_iterator)


def client_interceptors(extra: Extra | None = None) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a channel to downstream services: each call carries the current request id,
    and whatever `extra` returns at call time (e.g. the gateway's bearer token for the services)."""
    # One object per kind: grpc.aio files an interceptor under the first kind it is an instance of.
    interceptors = [_UnaryUnary(extra), _UnaryStream(extra), _StreamUnary(extra), _StreamStream(extra)]
    # grpc-stubs spells ClientInterceptor as a placeholder type that only a cast can produce.
    return cast("list[grpc.aio.ClientInterceptor]", interceptors)
