"""The dynamic batcher: pure merge/split/plan functions, then scheduling with plain callables.

Runs are gated with a threading.Event rather than timed, so nothing here depends on wall-clock
speed; the long queue delays only matter if a batch is not dispatched early (the test would hang).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.runtime.batch_rows import BatchOutputError, merge, signature, split
from services.runtime.batching import BatchPolicy, DynamicBatcher, batch_is_ready, plan_batch, row_count
from services.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.runtime.metrics import Metrics

W = np.arange(12, dtype=np.float32).reshape(4, 3)


def linear(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] @ W, "n": np.arange(len(inputs["x"]), dtype=np.int64)}


class Recorder:
    """A run callable that counts calls, records row counts, and can be held until released."""

    def __init__(self, fn=linear, hold: bool = False) -> None:
        self.fn = fn
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not hold:
            self.gate.set()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.gate.wait(timeout=30)
        self.calls.append(len(next(iter(inputs.values()))))
        return self.fn(inputs)


async def until(cond, what: str) -> None:
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def policy(**kw) -> BatchPolicy:
    base = dict(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_microseconds=5_000_000)
    return BatchPolicy(**(base | kw))


# ---------------------------------------------------------------- pure functions


def test_merge_and_split_round_trip() -> None:
    reqs = [{"x": np.full((n, 4), i, np.float32), "m": np.full((n,), i)} for i, n in enumerate((1, 3, 2))]
    merged = merge(reqs)
    assert merged["x"].shape == (6, 4) and merged["m"].tolist() == [0, 1, 1, 1, 2, 2]
    parts = split({"y": merged["x"] * 2}, [1, 3, 2])
    for req, part in zip(reqs, parts, strict=True):
        np.testing.assert_array_equal(part["y"], req["x"] * 2)


def test_split_checks_output_rows() -> None:
    with pytest.raises(BatchOutputError, match="'y' has 5 rows for 6"):
        split({"y": np.zeros((5, 2))}, [3, 3])
    with pytest.raises(BatchOutputError):
        split({"y": np.float32(1.0)}, [1])


def test_row_count_validation() -> None:
    assert row_count({"a": np.zeros((3, 2)), "b": np.zeros((3,))}) == 3
    with pytest.raises(InvalidArgument, match="disagree"):
        row_count({"a": np.zeros((3, 2)), "b": np.zeros((2,))})
    with pytest.raises(InvalidArgument, match="zero rows"):
        row_count({"a": np.zeros((0, 2))})
    with pytest.raises(InvalidArgument):
        row_count({})


def test_plan_batch_skips_what_cannot_join() -> None:
    a = signature({"x": np.zeros((1, 4), np.float32)})
    b = signature({"x": np.zeros((1, 5), np.float32)})
    c = signature({"x": np.zeros((1, 4), np.float64)})
    items = [(2, a), (1, b), (4, a), (3, a), (1, c), (2, a)]
    # head always goes; b and c differ; 3 rows would overflow 8 after 2+4; the last 2 fits.
    assert plan_batch(items, 8) == [0, 2, 5]
    assert plan_batch(items, 8, merge_allowed=False) == [0]
    assert plan_batch([], 8) == []


def test_batch_is_ready_rules() -> None:
    p = policy(preferred_batch_sizes=(4, 6))
    assert not batch_is_ready(3, p)
    assert batch_is_ready(4, p)
    assert not batch_is_ready(5, p)
    assert batch_is_ready(7, p)  # past the largest preferred size
    assert batch_is_ready(1, policy(dynamic=False))
    assert not batch_is_ready(7, policy(preferred_batch_sizes=()))
    assert batch_is_ready(8, policy(preferred_batch_sizes=()))


# ---------------------------------------------------------------- scheduling


async def test_concurrent_requests_are_merged_and_each_gets_its_own_result() -> None:
    metrics = Metrics("test")
    run = Recorder()
    batcher = DynamicBatcher("lin", run, policy(), metrics, version=1, backend="fake")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(32)]
    results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
    assert len(run.calls) < 32 and sum(run.calls) == 32
    assert max(run.calls) <= 8
    for x, got in zip(xs, results, strict=True):
        alone = linear({"x": x})
        np.testing.assert_allclose(got["y"], alone["y"], rtol=1e-5, atol=1e-5)
        assert got["y"].shape == (1, 3)
    reg = metrics.registry
    assert reg.get_sample_value("tessera_batch_size_count", {"model": "lin"}) == len(run.calls)
    assert reg.get_sample_value("tessera_batch_size_sum", {"model": "lin"}) == 32
    assert reg.get_sample_value(
        "tessera_model_inference_seconds_count", {"model": "lin", "version": "1", "backend": "fake"}
    ) == len(run.calls)
    assert (
        reg.get_sample_value("tessera_stage_duration_seconds_count", {"stage": "queue", "model": "lin"}) == 32
    )
    await batcher.close()


async def test_multi_row_requests_keep_their_rows_in_order() -> None:
    run = Recorder()
    batcher = DynamicBatcher("lin", run, policy(max_batch_size=16, preferred_batch_sizes=(16,)))
    xs = [np.full((n, 4), i, np.float32) for i, n in enumerate((3, 1, 5, 2, 4, 1))]
    results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
    assert len(run.calls) < len(xs)
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_array_equal(got["y"], x @ W)
    await batcher.close()


async def test_different_trailing_shapes_run_in_separate_batches() -> None:
    def sum_rows(inputs):
        return {"s": inputs["x"].sum(axis=1)}

    run = Recorder(sum_rows)
    batcher = DynamicBatcher("m", run, policy(max_batch_size=8, preferred_batch_sizes=(4,)))
    xs = [np.ones((1, 4 if i % 2 else 5), np.float32) for i in range(8)]
    results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
    assert [r["s"].tolist() for r in results] == [[5.0], [4.0]] * 4
    assert run.calls == [4, 4]
    await batcher.close()


async def test_full_queue_is_resource_exhausted() -> None:
    run = Recorder(hold=True)
    batcher = DynamicBatcher("lin", run, policy(max_batch_size=1, preferred_batch_sizes=(), max_queue_size=2))
    x = np.ones((1, 4), np.float32)
    first = asyncio.ensure_future(batcher.submit({"x": x}))
    await until(run.started.is_set, "first run started")
    queued = [asyncio.ensure_future(batcher.submit({"x": x})) for _ in range(2)]
    await until(lambda: batcher.queued == 2, "two queued")
    with pytest.raises(ResourceExhausted, match="queue of model 'lin' is full"):
        await batcher.submit({"x": x})
    run.gate.set()
    for r in await asyncio.gather(first, *queued):
        np.testing.assert_array_equal(r["y"], x @ W)
    await batcher.close()


async def test_one_failing_request_fails_only_itself() -> None:
    def picky(inputs):
        if np.isnan(inputs["x"]).any():
            raise ValueError("NaN in input")
        return linear(inputs)

    run = Recorder(picky)
    batcher = DynamicBatcher("lin", run, policy())
    xs = [np.full((1, 4), i, np.float32) for i in range(8)]
    xs[3] = np.full((1, 4), np.nan, np.float32)
    results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs), return_exceptions=True)
    assert isinstance(results[3], ValueError)
    for i, r in enumerate(results):
        if i != 3:
            np.testing.assert_array_equal(r["y"], xs[i] @ W)
    # The merged run failed, then each request ran alone.
    assert run.calls[0] == 8 and run.calls[1:] == [1] * 8
    # And the batcher still serves (a full batch, so it goes without waiting for the delay).
    again = await asyncio.gather(*(batcher.submit({"x": xs[0]}) for _ in range(8)))
    np.testing.assert_array_equal(again[0]["y"], xs[0] @ W)
    await batcher.close()


async def test_wrong_output_length_fails_the_run_not_the_batcher() -> None:
    run = Recorder(lambda inputs: {"y": np.zeros((1, 3), np.float32)})
    batcher = DynamicBatcher("lin", run, policy(preferred_batch_sizes=(2,)))
    x = np.ones((1, 4), np.float32)
    results = await asyncio.gather(batcher.submit({"x": x}), batcher.submit({"x": x}), return_exceptions=True)
    # Merged: 1 row for 2 fails; alone each gets its 1 row back.
    assert all(isinstance(r, dict) for r in results)
    with pytest.raises(BatchOutputError):
        await batcher.submit({"x": np.ones((2, 4), np.float32)})
    await batcher.close()


async def test_cancelled_callers_are_skipped_and_the_batcher_keeps_serving() -> None:
    run = Recorder(hold=True)
    batcher = DynamicBatcher("lin", run, policy(max_batch_size=1, preferred_batch_sizes=()))
    x = np.ones((1, 4), np.float32)
    in_flight = asyncio.ensure_future(batcher.submit({"x": x}))
    await until(run.started.is_set, "first run started")
    waiting = asyncio.ensure_future(batcher.submit({"x": x * 2}))
    survivor = asyncio.ensure_future(batcher.submit({"x": x * 3}))
    await until(lambda: batcher.queued == 2, "two queued")
    in_flight.cancel()
    waiting.cancel()
    run.gate.set()
    got = await survivor
    np.testing.assert_array_equal(got["y"], x * 3 @ W)
    assert in_flight.cancelled() and waiting.cancelled()
    assert run.calls == [1, 1]  # the cancelled queued request never ran
    later = await batcher.submit({"x": x})
    np.testing.assert_array_equal(later["y"], x @ W)
    await batcher.close()


async def test_oversized_request_is_refused_before_queueing() -> None:
    run = Recorder()
    batcher = DynamicBatcher("lin", run, policy())
    with pytest.raises(ResourceExhausted, match="9 rows"):
        await batcher.submit({"x": np.ones((9, 4), np.float32)})
    assert batcher.queued == 0 and run.calls == []
    await batcher.close()


async def test_without_dynamic_batching_each_request_runs_alone() -> None:
    run = Recorder()
    batcher = DynamicBatcher("lin", run, policy(dynamic=False))
    x = np.ones((2, 4), np.float32)
    await asyncio.gather(*(batcher.submit({"x": x}) for _ in range(5)))
    assert run.calls == [2] * 5
    await batcher.close()


async def test_close_drains_queued_requests_then_refuses() -> None:
    run = Recorder()
    # A long delay and no preferred size: only close() makes these go.
    batcher = DynamicBatcher(
        "lin", run, policy(preferred_batch_sizes=(), max_queue_delay_microseconds=60_000_000)
    )
    x = np.ones((1, 4), np.float32)
    pending = [asyncio.ensure_future(batcher.submit({"x": x})) for _ in range(3)]
    await until(lambda: batcher.queued == 3, "three queued")
    await batcher.close()
    assert all(p.done() and not p.exception() for p in pending)
    assert run.calls == [3]
    with pytest.raises(Unavailable):
        await batcher.submit({"x": x})


async def test_a_request_that_finds_the_model_idle_runs_at_once() -> None:
    """No waiting for company when the model has been idle; under load the queue delay holds."""
    run = Recorder()
    slow = policy(preferred_batch_sizes=(), max_queue_delay_microseconds=300_000)
    batcher = DynamicBatcher("lin", run, slow)
    x = np.ones((1, 4), np.float32)
    try:
        first = asyncio.ensure_future(batcher.submit({"x": x}))
        await until(lambda: run.calls == [1], "the idle model ran the lone request")
        await first
        # A run just ended: the next request waits the window, and one arriving meanwhile joins it.
        second = asyncio.ensure_future(batcher.submit({"x": x}))
        await asyncio.sleep(0.02)
        third = asyncio.ensure_future(batcher.submit({"x": x}))
        await asyncio.gather(second, third)
        assert run.calls == [1, 2]
    finally:
        await batcher.close()
    # With idle dispatch off, the lone request waits the window too, and the late one joins it.
    run = Recorder()
    batcher = DynamicBatcher("lin", run, slow.model_copy(update={"idle_dispatch": False}))
    try:
        first = asyncio.ensure_future(batcher.submit({"x": x}))
        await asyncio.sleep(0.02)
        await asyncio.gather(first, batcher.submit({"x": x}))
        assert run.calls == [2]
    finally:
        await batcher.close()
