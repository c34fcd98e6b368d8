"""Request ids: one per call, taken from the caller's `x-request-id` metadata or made here, carried
to downstream calls, and written on every log line about the call (gateway and service alike)."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

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


def outgoing(extra: Extra | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call to a downstream service: the current request id, and whatever `extra`
    returns at call time (e.g. the gateway's bearer token for the services). Passed with each call
    rather than by a client interceptor: grpc.aio runs an interceptor chain as a task of its own
    per call, which costs more than the call's own Python work."""
    added = tuple(extra()) if extra is not None else ()
    rid = current()
    return (*added, (METADATA_KEY, rid)) if rid else added
