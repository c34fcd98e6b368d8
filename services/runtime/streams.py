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
    """Set once when the process starts draining; streams watch it."""

    def __init__(self, after_seconds: float = 1.0) -> None:
        self.after_seconds = after_seconds
        self._event = asyncio.Event()

    def start(self) -> None:
        self._event.set()

    @property
    def started(self) -> bool:
        return self._event.is_set()

    async def wait_for_cut(self) -> None:
        """Returns when streams should be cut: `after_seconds` after the drain started."""
        await self._event.wait()
        await asyncio.sleep(self.after_seconds)


async def until_drained(items: AsyncIterator[T], drain: Drain, what: str) -> AsyncIterator[T]:
    """The items of a long-lived stream until the drain cuts it; then Unavailable naming `what`."""
    if drain.started:
        raise Unavailable(f"{what}: the server is shutting down; reconnect and resume")
    cut = asyncio.ensure_future(drain.wait_for_cut())
    iterator = aiter(items)
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({step, cut}, return_when=asyncio.FIRST_COMPLETED)
            if step in done:
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
                continue
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
            raise Unavailable(f"{what}: the server is shutting down (drain); reconnect and resume the stream "
                              "with the same id")
    finally:
        cut.cancel()
        if step is not None and not step.done():  # the caller left mid-wait: stop the pending step too
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
        closer = getattr(iterator, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()
