"""When a call's work should stop: its caller went away or its deadline passed.

gRPC cancels the handler's coroutine when the caller cancels or the deadline passes, so the
pipeline's awaits stop by themselves. Work already handed to a worker thread does not: a thread
cannot be cancelled, and it would go on decoding, detecting and cropping for a caller that has
gone, holding CPU the next call needs. So the servicer passes a `StopSignal` down; worker threads
check it between stages, and the coroutine checks it before each thread hand-off and each model
run (so a call whose deadline passed while it waited for a thread or a batch slot starts nothing
more either).
"""

from __future__ import annotations

import threading
import time

import grpc

from services.runtime.errors import ServingError


class CallStopped(ServingError):
    """The call was cancelled or its deadline passed: its remaining work is dropped. Never an
    item's status: it ends the whole call (whose caller, usually, no longer listens)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StopSignal:
    """Thread-safe: `cancel()` from the event loop, `check(stage)` from anywhere."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline  # time.monotonic() seconds; None: no deadline
        self._cancelled = threading.Event()

    @classmethod
    def for_call(cls, context: grpc.aio.ServicerContext) -> StopSignal:
        """The call's deadline (None when the caller set none)."""
        remaining = context.time_remaining()
        return cls(None if remaining is None else time.monotonic() + remaining)

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self, stage: str) -> None:
        """Raise CallStopped (naming the stage not started) when the work should stop."""
        if self._cancelled.is_set():
            raise CallStopped(grpc.StatusCode.CANCELLED, f"the call ended before {stage}")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise CallStopped(grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed before {stage}")
