"""Dynamic batching for in-process backends.

Scheduling (``DynamicBatcher._collect``: when to dispatch and which queued requests go together)
is kept apart from merging and splitting (``plan_batch``, ``merge``, ``split``: pure functions over
numpy arrays, unit-tested alone). Rows are counted, not requests: axis 0 of every input array is
that request's rows, and a request is never split across runs.

What keeps the batcher from hanging (lost futures, unbounded queues, one run failing everyone): the queue is bounded and a
full queue is an explicit RESOURCE_EXHAUSTED; every run is guarded, so a failing run fails only its
own requests (each is retried alone, so one bad request fails only itself); futures already done
(cancelled callers) are skipped; the output length is checked against the rows sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from services.runtime.batch_rows import Signature, Tensors, merge, signature, split
from services.runtime.config import StrictModel
from services.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.runtime.metrics import Metrics

log = logging.getLogger(__name__)

RunFn = Callable[[Tensors], Mapping[str, np.ndarray]]


class BatchPolicy(StrictModel):
    """How one model's requests are batched (from its config.pbtxt)."""

    max_batch_size: int = Field(
        1, ge=0, description="Most rows in one run; 0 = the model has no batch axis (runs alone)."
    )
    dynamic: bool = Field(True, description="Merge queued requests; False runs each alone.")
    preferred_batch_sizes: tuple[int, ...] = Field(
        (), description="Row counts at which a batch is dispatched without waiting longer."
    )
    max_queue_delay_microseconds: int = Field(
        0, ge=0, description="Longest wait for more requests once the first one is queued."
    )
    max_queue_size: int = Field(1024, gt=0, description="Queued requests beyond which submit fails.")
    idle_dispatch: bool = Field(
        True,
        description="A request that finds the model idle (no run for longer than the queue delay, "
        "nothing else queued) runs at once: waiting for company that is not coming only adds latency. "
        "Under load, runs follow each other and the queue delay applies as configured.",
    )

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


# ---------------------------------------------------------------- rows of one request


def row_count(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows of one request: axis 0, the same for every input."""
    if not inputs:
        raise InvalidArgument("request has no inputs")
    if any(a.ndim == 0 for a in inputs.values()):
        raise InvalidArgument(f"inputs need a batch axis; got scalars in {sorted(inputs)}")
    counts: dict[str, int] = {name: a.shape[0] for name, a in inputs.items()}
    if len(set(counts.values())) != 1:
        raise InvalidArgument(f"inputs disagree on the number of rows (axis 0): {counts}")
    n = next(iter(counts.values()))
    if n < 1:
        raise InvalidArgument("request has zero rows")
    return n


def plan_batch(
    items: Sequence[tuple[int, Signature]], max_rows: int, merge_allowed: bool = True
) -> list[int]:
    """Indices of queued items (rows, signature) that go in the next run, oldest first.

    The oldest item always goes; later ones join when they share its signature and still fit.
    Items that do not are skipped, not a stop: they stay queued for a later run, and since every
    run takes the head of the queue, none waits forever.
    """
    if not items:
        return []
    if not merge_allowed:
        return [0]
    rows, sig = items[0]
    chosen = [0]
    for i in range(1, len(items)):
        n, s = items[i]
        if s == sig and rows + n <= max_rows:
            chosen.append(i)
            rows += n
            if rows == max_rows:
                break
    return chosen


def batch_is_ready(rows: int, policy: BatchPolicy) -> bool:
    """Whether a planned batch should go now rather than wait for the queue delay."""
    if not policy.batched or not policy.dynamic or rows >= policy.max_batch_size:
        return True
    prefs = policy.preferred_batch_sizes
    return bool(prefs) and (rows in prefs or rows >= max(prefs))


# ---------------------------------------------------------------- scheduling


@dataclass(eq=False)
class _Request:
    inputs: Tensors
    rows: int
    signature: Signature
    future: asyncio.Future[Tensors]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Queues requests for one model version and runs them, merged, in one worker thread.

    One single-thread executor per batcher: ONNX Runtime has its own intra-op threads, and two
    runs side by side would oversubscribe the cores and starve the event loop. The next batch is
    collected only when the previous run has finished, so requests that arrive during a run are
    merged into the next one. Create it inside the running event loop; ``close()`` it when done.
    """

    def __init__(
        self,
        model: str,
        run: RunFn,
        policy: BatchPolicy,
        metrics: Metrics | None = None,
        version: int | str = "",
        backend: str = "",
    ) -> None:
        self.model = model
        self.version = str(version)
        self.backend = backend
        self.policy = policy
        self._run = run
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{model}")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{model}")
        self.runs = 0  # executions started, for tests and debugging
        self._last_run_end = float("-inf")

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run one request (rows on axis 0) and return its outputs, rows in the same order."""
        if self._closing:
            raise Unavailable(f"model '{self.model}' version {self.version} is unloading")
        if self.policy.batched:
            rows = row_count(inputs)
            if rows > self.policy.max_batch_size:
                raise ResourceExhausted(
                    f"request has {rows} rows; model '{self.model}' takes at most "
                    f"{self.policy.max_batch_size} per request"
                )
        else:
            rows = 1  # no batch axis: the request is one unit
        if len(self._queue) >= self.policy.max_queue_size:
            raise ResourceExhausted(
                f"queue of model '{self.model}' is full ({self.policy.max_queue_size} requests)"
            )
        # Enqueue before the first await, so a request that saw this batcher is always served by it.
        request = _Request(dict(inputs), rows, signature(inputs), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._wakeup.set()
        return await request.future  # a cancelled caller cancels the future; _collect skips it

    async def close(self) -> None:
        """Stop taking requests, run the ones queued, then stop the worker thread."""
        self._closing = True
        self._wakeup.set()
        try:
            await self._task
        finally:
            self._executor.shutdown(wait=False)

    # -- internals

    def _drop_done(self) -> None:
        if any(r.future.done() for r in self._queue):
            self._queue = deque(r for r in self._queue if not r.future.done())

    def _plan(self) -> tuple[list[int], int]:
        items = [(r.rows, r.signature) for r in self._queue]
        merge_allowed = self.policy.batched and self.policy.dynamic
        chosen = plan_batch(items, self.policy.max_batch_size, merge_allowed)
        return chosen, sum(items[i][0] for i in chosen)

    async def _collect(self) -> None:
        delay = self.policy.max_queue_delay_microseconds / 1e6
        while True:
            self._drop_done()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # The delay counts from the oldest request's arrival: one that waited behind a busy
            # run goes at once with whatever has queued meanwhile.
            deadline = self._queue[0].enqueued + delay
            idle = (
                self.policy.idle_dispatch
                and len(self._queue) == 1
                and self._queue[0].enqueued - self._last_run_end > delay
            )
            while True:
                chosen, rows = self._plan()
                remaining = deadline - time.perf_counter()
                if self._closing or idle or remaining <= 0 or batch_is_ready(rows, self.policy):
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                self._drop_done()
                if not self._queue:
                    break
            if not self._queue:
                continue
            chosen, _ = self._plan()
            taken = set(chosen)
            batch = [self._queue[i] for i in chosen]
            self._queue = deque(r for i, r in enumerate(self._queue) if i not in taken)
            try:
                await self._execute(batch)
            except Exception:  # the loop must survive anything a run does
                log.exception("batcher of model %s: unexpected error", self.model)
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(Unavailable(f"model '{self.model}' failed to run"))

    async def _execute(self, batch: list[_Request]) -> None:
        now = time.perf_counter()
        if self._metrics is not None:
            for r in batch:
                self._metrics.stage_duration.labels("queue", self.model).observe(now - r.enqueued)
        try:
            results = await self._run_rows(batch)
        except Exception as exc:  # reported to the callers, not raised here
            if len(batch) == 1:
                self._resolve(batch[0], exc)
                return
            # Which request broke the merged run is unknown: run each alone so only it fails.
            log.warning(
                "merged run of %d requests for model %s failed (%s); retrying each alone",
                len(batch),
                self.model,
                exc,
            )
            for r in batch:
                if r.future.done():
                    continue
                try:
                    (result,) = await self._run_rows([r])
                except Exception as single_exc:
                    self._resolve(r, single_exc)
                else:
                    self._resolve(r, result)
            return
        for r, result in zip(batch, results, strict=True):
            self._resolve(r, result)

    async def _run_rows(self, batch: list[_Request]) -> list[Tensors]:
        merged = merge([r.inputs for r in batch])
        rows = [r.rows for r in batch]
        loop = asyncio.get_running_loop()
        self.runs += 1
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run, merged)
        finally:  # failed runs cost time too: record them
            self._last_run_end = time.perf_counter()
            if self._metrics is not None:
                self._metrics.batch_size.labels(self.model).observe(sum(rows))
                self._metrics.inference_duration.labels(self.model, self.version, self.backend).observe(
                    time.perf_counter() - start
                )
        if not self.policy.batched:
            return [dict(outputs)]
        return split(outputs, rows)

    @staticmethod
    def _resolve(request: _Request, outcome: Tensors | BaseException) -> None:
        if request.future.done():  # the caller went away while its run was in flight
            return
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)
