"""Admission gates, alone (asyncio, no server) and on a real server: full gates answer
RESOURCE_EXHAUSTED at once, queued calls whose deadline passes never run, slots pass in order,
streams never take unary slots, status calls pass freely."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.runtime.admission import Admission, Gate
from services.runtime.config import AdmissionConfig, Limit
from services.runtime.errors import DeadlineExceeded, ResourceExhausted
from services.runtime.metrics import Metrics


def _gate(concurrent: int, queued: int) -> Gate:
    return Gate("unary", Limit(max_concurrent=concurrent, max_queued=queued), Metrics("test"))


async def test_full_gate_refuses_at_once() -> None:
    gate = _gate(1, 1)
    await gate.enter("M", None, 0.0)
    waiting = asyncio.ensure_future(gate.enter("M", None, 0.0))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="server busy"):
        await gate.enter("M", None, 0.0)
    gate.leave()
    await waiting  # the queued call got the slot
    assert gate.running == 1 and not gate.waiters
    gate.leave()
    assert gate.running == 0


async def test_slots_pass_in_arrival_order() -> None:
    gate = _gate(1, 5)
    order: list[int] = []

    async def worker(i: int) -> None:
        await gate.enter("M", None, 0.0)
        order.append(i)
        await asyncio.sleep(0)
        gate.leave()

    await gate.enter("M", None, 0.0)
    tasks = [asyncio.ensure_future(worker(i)) for i in range(5)]
    await asyncio.sleep(0)
    gate.leave()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert gate.running == 0


async def test_a_queued_call_whose_deadline_passes_never_runs() -> None:
    gate = _gate(1, 5)
    await gate.enter("M", None, 0.0)
    with pytest.raises(DeadlineExceeded, match="not run"):
        await gate.enter("M", time.monotonic() + 0.05, 0.0)
    assert not gate.waiters
    gate.leave()
    assert gate.running == 0  # the expired waiter took no slot


async def test_a_call_that_cannot_finish_in_time_is_dropped_when_its_turn_comes() -> None:
    gate = _gate(1, 5)
    await gate.enter("M", None, 0.0)
    late = asyncio.ensure_future(gate.enter("M", time.monotonic() + 5.0, typical=10.0))
    await asyncio.sleep(0)
    gate.leave()
    with pytest.raises(DeadlineExceeded, match="a run takes about"):
        await late
    assert gate.running == 0


async def test_a_cancelled_waiter_gives_its_place_up() -> None:
    gate = _gate(1, 1)
    await gate.enter("M", None, 0.0)
    waiter = asyncio.ensure_future(gate.enter("M", None, 0.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not gate.waiters
    follower = asyncio.ensure_future(gate.enter("M", None, 0.0))  # the queue has room again
    await asyncio.sleep(0)
    gate.leave()
    await follower
    gate.leave()
    assert gate.running == 0


def test_streams_status_and_methods_have_their_own_gates() -> None:
    admission = Admission(AdmissionConfig(methods={"ClassifyEmotion": Limit(max_concurrent=2)}), Metrics("t"))
    assert admission.gate("StreamVideo", streaming=True) is admission.streams
    assert admission.gate("ScoreTexts", streaming=False) is admission.unary
    assert admission.gate("ClassifyEmotion", streaming=False) is admission.methods["ClassifyEmotion"]
    assert admission.gate("GetStatus", streaming=False) is None
    admission.observe("M", 1.0)
    admission.observe("M", 2.0)
    assert admission.typical("M") == pytest.approx(1.2)


def test_a_busy_gateway_sheds_unary_calls_but_not_streams_or_status(
    tmp_path, model_repository, astronaut_jpeg: bytes
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from tessera_client import TesseraClient
    from tests.helpers.suites import start_suite

    env = {
        "TESSERA_GATEWAY__SERVER__ADMISSION__UNARY__MAX_CONCURRENT": "1",
        "TESSERA_GATEWAY__SERVER__ADMISSION__UNARY__MAX_QUEUED": "0",
    }
    with (
        start_suite(tmp_path, model_repository, extra_env=env) as suite,
        TesseraClient(suite.gateway.target, timeout=60) as client,
    ):
        # A live stream holds a stream slot for as long as it lasts, never the only unary slot.
        first_answer, stop = threading.Event(), threading.Event()

        def frames():
            for _ in range(600):
                if stop.is_set():
                    return
                time.sleep(0.05)
                yield astronaut_jpeg

        def watch() -> None:
            for _ in client.stream_video(frames(), fps=20, reconnect_seconds=0):
                first_answer.set()

        streamer = threading.Thread(target=watch)
        streamer.start()
        assert first_answer.wait(60)
        assert [f.label for f in client.classify_image(astronaut_jpeg)] == ["Happy"]

        def classify() -> str:
            try:
                client.classify([astronaut_jpeg] * 4)
                return "OK"
            except grpc.RpcError as exc:
                assert "server busy" in (exc.details() or ""), exc.details()
                return exc.code().name

        with ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(classify) for _ in range(8)]
            status = client.status()  # operators see the gateway while it sheds load
            codes = [p.result() for p in pending]
        assert status.rules_version
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes
        stop.set()
        streamer.join(60)
