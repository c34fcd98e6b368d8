"""Admission control: overload is answered early, not by everyone timing out together.

Each process has gates — one for unary calls, one for streams (an hour-long live stream never
takes a unary slot), and optional per-method gates — each with a bound on calls running at once
and on calls waiting for a slot. A call that finds both full gets RESOURCE_EXHAUSTED at once. A
waiting call whose deadline passes, or can no longer be met (less time left than the method's
typical run), is dropped with DEADLINE_EXCEEDED without running. Health, reflection and status
calls pass freely. A server-wide `maximum_concurrent_rpcs` alone does none of this: it counts
streams with unary calls and answers only once the caller already waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from services.runtime.config import AdmissionConfig, Limit
from services.runtime.errors import DeadlineExceeded, ResourceExhausted
from services.runtime.metrics import Metrics


class Gate:
    """Slots and a FIFO of waiters for one class of calls."""

    def __init__(self, name: str, limit: Limit, metrics: Metrics) -> None:
        self.name = name
        self.limit = limit
        self.metrics = metrics
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def _free(self) -> bool:
        return self.limit.max_concurrent is None or self.running < self.limit.max_concurrent

    async def enter(self, method: str, deadline: float | None, typical: float) -> None:
        """Take a slot (waiting in line if allowed); raises ResourceExhausted or DeadlineExceeded."""
        if self._free() and not self.waiters:
            self.running += 1
            return
        if len(self.waiters) >= self.limit.max_queued:
            self.metrics.admission_rejected.labels(method, "full").inc()
            raise ResourceExhausted(
                f"{method}: server busy ({self.running} {self.name} calls running, {len(self.waiters)} waiting, "
                f"limits {self.limit.max_concurrent}/{self.limit.max_queued}); retry with backoff"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.metrics.admission_queued.labels(self.name).inc()
        granted = False
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            granted = True
        except TimeoutError:
            self.metrics.admission_rejected.labels(method, "deadline").inc()
            raise DeadlineExceeded(
                f"{method}: the deadline passed while waiting for a slot; not run"
            ) from None
        finally:
            self.metrics.admission_queued.labels(self.name).dec()
            if not granted:
                if waiter.done() and not waiter.cancelled():
                    self.leave()  # handed over just as this call gave up: pass it on
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(waiter)
        # The slot was handed over by leave(): running already counts it.
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < typical:
            self.leave()
            self.metrics.admission_rejected.labels(method, "deadline").inc()
            raise DeadlineExceeded(
                f"{method}: {left * 1e3:.0f} ms left after waiting, a run takes about "
                f"{typical * 1e3:.0f} ms; not run"
            )

    def leave(self) -> None:
        """Free a slot: the first live waiter takes it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # running stays: the slot passes to the waiter
                return
        self.running -= 1


class Admission:
    """The gates of one process and the typical run time of each method."""

    def __init__(self, config: AdmissionConfig, metrics: Metrics) -> None:
        self.config = config
        self.unary = Gate("unary", config.unary, metrics)
        self.streams = Gate("stream", config.streams, metrics)
        self.methods = {name: Gate(name, limit, metrics) for name, limit in config.methods.items()}
        self._typical: dict[str, float] = {}

    def gate(self, method: str, streaming: bool) -> Gate | None:
        if method in self.config.exempt:
            return None
        return self.methods.get(method) or (self.streams if streaming else self.unary)

    def typical(self, method: str) -> float:
        return self._typical.get(method, 0.0) if self.config.early_drop else 0.0

    def observe(self, method: str, seconds: float) -> None:
        """A successful run's duration (exponential average; the first one counts whole)."""
        old = self._typical.get(method)
        self._typical[method] = seconds if old is None else 0.8 * old + 0.2 * seconds
