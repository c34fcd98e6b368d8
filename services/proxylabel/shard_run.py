"""Running a shard job in this process: score a parquet shard into a directory of part files,
resumable after a crash.

    <output>/part-*.parquet     the parts (services/proxylabel/parts.py)
    <output>/manifest.json      the job's state and the parts committed (services/proxylabel/manifest.py)
    <output>/.lock              the lease of the process that runs the job, with its heartbeat
                                (services/proxylabel/lease.py): one writer at a time
    <output>/.cancel            asks the job's owner to stop at the next part boundary

A part is committed once its file is renamed into place and the manifest names it, both under the
lease. A job killed at any point and run again resumes after the last committed part (an
uncommitted part file is overwritten), so the output holds every input id exactly once.

The whole request is validated before any work or output (services/proxylabel/shard_plan.py,
docs/operations.md#errors). Messages name paths as the job's labels give them (relative to the
service's roots), never as absolute server paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pyarrow as pa

from services.proxylabel.evaluation import Evaluation, evaluate
from services.proxylabel.knn import NUM_CLASSES
from services.proxylabel.lease import Lease, LeaseBusy, LeaseLost
from services.proxylabel.manifest import CANCEL_FILE, CANCELLED, FAILED, SUCCEEDED, Manifest
from services.proxylabel.part_scoring import score_part
from services.proxylabel.parts import TEMPORARY_PARTS, part_name, write_part
from services.proxylabel.pipeline import ProxyLabelPipeline
from services.proxylabel.shard_plan import ShardPlan, read_parts
from services.runtime.errors import FailedPrecondition, InvalidArgument, ServingError, status_of

# The service's is configurable (job_lock_expiry_seconds); the offline CLI uses this.
DEFAULT_LOCK_EXPIRY_SECONDS = 30.0
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    rows_done: int
    rows_total: int
    rows_per_second: float
    rows_failed: int


@dataclass(frozen=True)
class Summary:
    output_path: str
    rows_done: int
    rows_failed: int
    rows_resumed: int
    seconds: float
    rules_version: str
    evaluation: Evaluation | None
    job_id: str = ""


class JobCancelled(ServingError):
    """The job stopped at a part boundary because it was asked to (CancelShardJob)."""

    code = grpc.StatusCode.CANCELLED


def open_output(
    plan: ShardPlan, lock_expiry_seconds: float = DEFAULT_LOCK_EXPIRY_SECONDS
) -> tuple[Lease, Manifest]:
    """Take the output directory's lock and open the job's manifest, the run recorded in it.

    Raises LeaseBusy when a live process runs the job, FailedPrecondition when the directory holds
    something else. A complete job's manifest is returned untouched.
    """
    output = plan.job.output_path
    shown = plan.job.shown_output
    try:
        if output.exists() and not output.is_dir():
            raise InvalidArgument(f"output_path {shown!r} exists and is not a directory")
        output.mkdir(parents=True, exist_ok=True)
        lease = Lease.acquire(output, lock_expiry_seconds)
    except OSError as exc:
        raise InvalidArgument(
            f"output_path {shown!r} cannot be written: {(exc.strerror or type(exc).__name__).lower()}"
        ) from None
    try:
        manifest = Manifest.open(output, plan)
        if not manifest.complete:
            with lease.guard():
                for stale in output.glob(TEMPORARY_PARTS):
                    stale.unlink(missing_ok=True)
                # Asked to run again: a cancel of an earlier run no longer applies.
                (output / CANCEL_FILE).unlink(missing_ok=True)
                manifest.start_run(lease.holder.label)
                manifest.commit()  # the job is visible (and its input pinned) before the first part
    except BaseException:
        lease.release()
        raise
    return lease, manifest


def summary_of(manifest: Manifest, rows_resumed: int, seconds: float | None = None) -> Summary:
    """The summary of a complete job (seconds: those of its last run, unless given)."""
    parts = manifest.parts
    confusion = (
        np.sum([np.asarray(p["confusion"]) for p in parts], axis=0)
        if parts
        else np.zeros((NUM_CLASSES, NUM_CLASSES))
    )
    runs = manifest.data.get("runs") or [{}]
    data = manifest.data
    return Summary(
        str(manifest.path.parent),
        manifest.rows_done,
        manifest.rows_failed,
        rows_resumed,
        runs[-1].get("seconds", 0.0) if seconds is None else seconds,
        data["rules_version"],
        evaluate(confusion) if data.get("has_scores") else None,
        data.get("job_id", ""),
    )


async def prefetched(items: Iterator[T]) -> AsyncIterator[T]:
    """The items of a blocking iterator, the next one produced in a worker thread while the
    caller works on the current one (so reading part i+1 overlaps scoring part i)."""
    done = object()
    ahead = asyncio.ensure_future(asyncio.to_thread(next, items, done))
    try:
        while (item := await ahead) is not done:
            ahead = asyncio.ensure_future(asyncio.to_thread(next, items, done))
            yield item  # type: ignore[misc]
    finally:
        # A generator cannot be closed while a thread runs it: let the read in flight finish.
        if not ahead.done():
            await asyncio.wait([ahead])
        if not ahead.cancelled():
            ahead.exception()  # retrieved: a read failing after the caller stopped is no news
        if hasattr(items, "close"):
            items.close()


async def _written(output: Path, index: int, table: pa.Table, owner: str) -> Path:
    """write_part in a worker thread. Stopped meanwhile (the service stops), the job waits for
    the write to end and removes its file before it lets the lock go: a thread finishing later
    would leave it behind a new owner's back."""
    writing = asyncio.ensure_future(asyncio.to_thread(write_part, output, index, table, owner))
    try:
        return await asyncio.shield(writing)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            (await writing).unlink(missing_ok=True)
        raise


def _commit_part(lease: Lease, manifest: Manifest, tmp: Path, index: int, part: dict, run: dict) -> None:
    """Rename the part into place and name it in the manifest, both under the lease."""
    try:
        with lease.guard():
            os.replace(tmp, manifest.path.parent / part_name(index))
            manifest.commit(part, run=run)
    except LeaseLost:
        tmp.unlink(missing_ok=True)  # ours alone (its name has our token): nobody else removes it
        raise


def _error_record(exc: BaseException) -> dict:
    code, message = status_of(exc)
    return {"code": code.name, "message": message}


async def score_job(
    plan: ShardPlan,
    pipeline: ProxyLabelPipeline,
    lease: Lease,
    manifest: Manifest,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    throttle_seconds: float = 0.0,
) -> AsyncIterator[Progress | Summary]:
    """Score the parts the manifest lacks: a progress event first and after every part, then the
    summary. Stops at a part boundary when `should_stop()` says so or a cancel file appears
    (JobCancelled), and when the lock was lost (LeaseLost; nothing more is written). A failure is
    recorded in the manifest before it propagates."""
    output = plan.job.output_path
    started = time.perf_counter()
    resumed, failed = manifest.rows_done, manifest.rows_failed
    rows_done = resumed
    yield Progress(rows_done, plan.rows_total, 0.0, failed)
    if not manifest.complete:
        try:
            metrics = pipeline.metrics
            async for index, table in prefetched(read_parts(plan, len(manifest.parts))):
                if lease.lost:
                    raise LeaseLost(f"the lock of {output} was lost")
                if should_stop() or (output / CANCEL_FILE).exists():
                    with lease.guard():
                        manifest.finish(CANCELLED)
                    raise JobCancelled(
                        f"shard job {plan.job.job_id} was cancelled after {rows_done} of "
                        f"{plan.rows_total} rows; its finished parts stay"
                    )
                first_row = plan.parts[index][0]
                result = await score_part(plan, pipeline, table, first_row)
                tmp = await _written(output, index, result.table, lease.owner)
                ids = result.table.column("id")
                elapsed = time.perf_counter() - started
                rate = (rows_done + result.table.num_rows - resumed) / elapsed if elapsed > 0 else 0.0
                _commit_part(
                    lease,
                    manifest,
                    tmp,
                    index,
                    {
                        "index": index,
                        "file": part_name(index),
                        "rows": result.table.num_rows,
                        "rows_failed": result.rows_failed,
                        "start": first_row,
                        "stop": plan.parts[index][1],
                        "first_id": ids[0].as_py() if len(ids) else None,
                        "last_id": ids[-1].as_py() if len(ids) else None,
                        "confusion": result.confusion.tolist(),
                    },
                    run={"seconds": elapsed, "rows_per_second": rate},
                )
                rows_done += result.table.num_rows
                failed += result.rows_failed
                metrics.rows_scored.inc(result.table.num_rows)
                metrics.rows_per_second.set(rate)
                yield Progress(rows_done, plan.rows_total, rate, failed)
                if throttle_seconds:
                    await asyncio.sleep(throttle_seconds)
            with lease.guard():
                manifest.finish(SUCCEEDED, run={"seconds": time.perf_counter() - started})
        except (LeaseLost, JobCancelled):
            raise
        except Exception as exc:
            # Recorded for every reader (GetShardJob, other replicas); unless someone else holds
            # the job now, whose record this is not.
            with contextlib.suppress(LeaseLost, OSError, ServingError), lease.guard():
                manifest.finish(FAILED, _error_record(exc))
            raise
    yield summary_of(manifest, resumed, time.perf_counter() - started)


async def run_shard(
    plan: ShardPlan,
    pipeline: ProxyLabelPipeline,
    *,
    throttle_seconds: float = 0.0,
    lock_expiry_seconds: float = DEFAULT_LOCK_EXPIRY_SECONDS,
) -> AsyncIterator[Progress | Summary]:
    """Run a validated job in this process: a progress event first and after every part, then the
    summary. FAILED_PRECONDITION when a live process runs the same output.

    `throttle_seconds` sleeps after each committed part (for tests that kill a job mid-shard).
    """
    try:
        lease, manifest = open_output(plan, lock_expiry_seconds)
    except LeaseBusy as busy:
        raise FailedPrecondition(
            f"another job is writing {plan.job.shown_output} ({busy.holder.label})"
        ) from None
    try:
        async with lease.kept_alive():
            async for event in score_job(plan, pipeline, lease, manifest, throttle_seconds=throttle_seconds):
                yield event
    finally:
        lease.release()
