"""`until_drained`: a long-lived stream's items until the drain cuts it, at no task per item."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.runtime.errors import Unavailable
from services.runtime.streams import Drain, until_drained


class Source:
    """An endless stream whose items come when released; it notes how it ended."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[int] = asyncio.Queue()
        self.asked = 0
        self.ended: str | None = None

    async def stream(self) -> AsyncIterator[int]:
        try:
            while True:
                self.asked += 1
                yield await self.items.get()
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        except GeneratorExit:
            self.ended = "closed"
            raise


async def test_items_pass_through_without_a_task_per_item() -> None:
    async def three() -> AsyncIterator[int]:
        for i in range(3):
            await asyncio.sleep(0)
            yield i

    tasks = len(asyncio.all_tasks())
    got = []
    async for item in until_drained(three(), Drain(), "test stream"):
        assert len(asyncio.all_tasks()) == tasks
        got.append(item)
    assert got == [0, 1, 2]


async def test_a_drain_started_before_refuses_the_stream() -> None:
    drain = Drain(after_seconds=10)
    drain.start()
    with pytest.raises(Unavailable, match="test stream: the server is shutting down; reconnect"):
        await anext(until_drained(Source().stream(), drain, "test stream"))


async def test_the_cut_ends_a_stream_waiting_for_its_next_item() -> None:
    source, drain = Source(), Drain(after_seconds=0.2)
    stream = until_drained(source.stream(), drain, "test stream")
    source.items.put_nowait(1)
    assert await anext(stream) == 1
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, drain.start)
    started = loop.time()
    with pytest.raises(Unavailable, match=r"test stream: .*shutting down \(drain\)"):
        await anext(stream)  # nothing comes: only the cut ends the wait
    assert 0.2 <= loop.time() - started < 2.0
    assert source.ended == "cancelled"


async def test_a_stream_goes_on_until_the_cut_then_ends_before_asking_its_source_again() -> None:
    source, drain = Source(), Drain(after_seconds=0.1)
    stream = until_drained(source.stream(), drain, "test stream")
    source.items.put_nowait(1)
    assert await anext(stream) == 1
    drain.start()
    source.items.put_nowait(2)
    assert await anext(stream) == 2  # the drain started, the cut is still to come
    await asyncio.sleep(0.15)  # the caller is busy with its item past the cut
    asked = source.asked
    source.items.put_nowait(3)
    with pytest.raises(Unavailable, match=r"\(drain\)"):
        await anext(stream)
    assert source.asked == asked and source.ended == "closed"


async def test_the_sources_own_timeout_is_not_taken_for_the_cut() -> None:
    async def timing_out() -> AsyncIterator[int]:
        yield 1
        raise TimeoutError("the source's own")

    stream = until_drained(timing_out(), Drain(), "test stream")
    assert await anext(stream) == 1
    with pytest.raises(TimeoutError, match="the source's own"):
        await anext(stream)


async def test_a_caller_leaving_mid_wait_stops_the_source() -> None:
    source = Source()

    async def consume() -> None:
        async for _ in until_drained(source.stream(), Drain(), "test stream"):
            pass

    task = asyncio.create_task(consume())
    while source.asked == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.ended == "cancelled"
