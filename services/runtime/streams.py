"""Long-lived streams and the process's drain.

A live stream may last hours, so a graceful stop cannot wait for it: when the drain starts
(SIGTERM), streams end with UNAVAILABLE and a message saying so, a short while later, and their
callers resume elsewhere (the Python client's `stream_video` does it by itself). Unary calls and
finite client streams keep the whole grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from services.runtime.errors import Unavailable

T = TypeVar("T")


class Drain:
    """Set once when the process starts draining; streams watch it. Streams are cut
    `after_seconds` later: a stream waiting for its next item then is interrupted at once."""

    def __init__(self, after_seconds: float = 1.0) -> None:
        self.after_seconds = after_seconds
        self._cut_at: float | None = None  # on the loop's clock, once started
        self._waits: set[asyncio.Timeout] = set()  # streams waiting for their next item

    def start(self) -> None:
        if self._cut_at is not None:
            return
        self._cut_at = asyncio.get_running_loop().time() + self.after_seconds
        for wait in self._waits:
            wait.reschedule(self._cut_at)

    @property
    def started(self) -> bool:
        return self._cut_at is not None

    @property
    def cut(self) -> bool:
        """Whether streams should be cut by now."""
        return self._cut_at is not None and asyncio.get_running_loop().time() >= self._cut_at


async def until_drained(items: AsyncIterator[T], drain: Drain, what: str) -> AsyncIterator[T]:
    """The items of a long-lived stream until the drain cuts it; then Unavailable naming `what`.

    The next item is awaited in the caller's own task under a timeout the drain sets when it
    starts (no task per item, none per stream): the cut cancels that wait, which ends the source
    as a cancelled `async for` would."""
    if drain.started:
        raise Unavailable(f"{what}: the server is shutting down; reconnect and resume")
    iterator = aiter(items)
    try:
        while not drain.cut:
            wait = asyncio.timeout(drain._cut_at)
            try:
                async with wait:
                    drain._waits.add(wait)
                    try:
                        item = await anext(iterator)
                    finally:
                        drain._waits.discard(wait)
            except StopAsyncIteration:
                if not wait.expired():
                    return
            except TimeoutError:
                if not wait.expired():
                    raise  # the source's own
            if wait.expired():
                break
            yield item
        raise Unavailable(
            f"{what}: the server is shutting down (drain); reconnect and resume the stream with the same id"
        )
    finally:
        closer = getattr(iterator, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()
