"""Shard jobs the service runs: tasks of the process, independent of the calls that watch them.

`ShardJobs.score` starts a job, or re-attaches to it, and yields its events from where it is:

- running in this process: the stream watches the task (a watcher leaving does not stop it);
- running in another process (a replica, the offline CLI): the stream follows the job's manifest
  on the shared volume, and takes the job over if its owner dies while it watches;
- stopped (new, orphaned, cancelled, failed): the job starts (or resumes from its last finished
  part) as a task of this process;
- finished: the stream gets the progress and the summary at once.

The first event says which (`Attached`). A job ends on its own (summary), on a cancel request (at
the next part boundary, JobCancelled), on an error (recorded in its manifest), or when the service
stops (its lock is released; the next ScoreShard resumes it, here or on another replica).

A job belongs to the caller that started it (services/proxylabel/access.py): another caller may
neither watch, resume, see nor cancel it (an admin may).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from services.proxylabel import jobs
from services.proxylabel.access import Caller, may_access
from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.jobs import JobStatus
from services.proxylabel.lease import Lease, LeaseBusy, LeaseLost
from services.proxylabel.manifest import CANCELLED, FAILED, MANIFEST, SUCCEEDED, Manifest, read_manifest
from services.proxylabel.pipeline import ProxyLabelPipeline
from services.proxylabel.shard_plan import ShardJob, ShardPlan, plan_shard
from services.proxylabel.shard_run import JobCancelled, Progress, Summary, open_output, score_job, summary_of
from services.runtime.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ServingError,
    Unavailable,
    error_for,
)

log = logging.getLogger(__name__)

STARTED, RESUMED, REATTACHED = "started", "resumed", "reattached"


@dataclass(frozen=True)
class Attached:
    """A stream's first event: which job it watches and how it joined it."""

    job_id: str
    attachment: str  # started | resumed | reattached


@dataclass(frozen=True)
class _Ended:
    """A run that ended without a summary: an error, or the lock lost to another process."""

    error: BaseException | None = None
    lost: bool = False


def _as_error(exc: BaseException | None, job_id: str) -> ServingError:
    """A fresh error per watcher (one exception object must not be raised in several streams)."""
    if isinstance(exc, ServingError):
        return type(exc)(exc.message)
    return ServingError(f"shard job {job_id} failed: internal error (see the proxylabel log)")


def _changed(a: Progress | None, b: Progress) -> bool:
    return a is None or (a.rows_done, a.rows_failed, a.rows_total) != (
        b.rows_done,
        b.rows_failed,
        b.rows_total,
    )


class RunningJob:
    """A job running in this process: its task, its latest progress, and the streams watching it."""

    def __init__(self, plan: ShardPlan, lease: Lease, manifest: Manifest) -> None:
        self.plan = plan
        self.lease = lease
        self.manifest = manifest
        self.current = Progress(manifest.rows_done, plan.rows_total, 0.0, manifest.rows_failed)
        self.final: Summary | _Ended | None = None
        self.cancel_requested = False
        self.task: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Queue[Progress | Summary | _Ended]] = set()

    @property
    def job_id(self) -> str:
        return self.plan.job.job_id

    def watch(self) -> asyncio.Queue[Progress | Summary | _Ended]:
        """Events after `current`, for one stream (unbounded: a few per part)."""
        queue: asyncio.Queue[Progress | Summary | _Ended] = asyncio.Queue()
        if self.final is not None:
            queue.put_nowait(self.final)
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[Progress | Summary | _Ended]) -> None:
        self._watchers.discard(queue)

    def publish(self, event: Progress | Summary | _Ended) -> None:
        if isinstance(event, Progress):
            if not _changed(self.current, event):
                return  # the run's first event repeats where the job was: watchers have it
            self.current = event
        else:
            self.final = event
        for queue in self._watchers:
            queue.put_nowait(event)


class ShardJobs:
    """The shard jobs of one service process (a Background of the process: stopped with it)."""

    def __init__(self, config: ProxyLabelConfig) -> None:
        self.config = config
        self.running: dict[str, RunningJob] = {}

    @property
    def expiry(self) -> float:
        return self.config.job_lock_expiry_seconds

    # -- starting and watching ----------------------------------------------------------------

    async def score(
        self, job: ShardJob, pipeline: ProxyLabelPipeline
    ) -> AsyncIterator[Attached | Progress | Summary]:
        """Start or re-attach; Attached, then progress from where the job is, then its summary.
        Request problems raise before the first event, with their documented status."""
        running = self.running.get(job.job_id)
        if running is not None:
            _check_access(job, str(running.manifest.data.get("started_by") or ""))
            yield Attached(job.job_id, REATTACHED)
            async for event in self._watch(running, pipeline):
                yield event
            return
        plan = plan_shard(job, pipeline)  # the whole request is validated before any work
        try:
            started = self._start(plan, pipeline)
        except LeaseBusy:
            other = jobs.read_status(job.output_path, self.expiry)
            if other is not None:
                _check_access(job, other.started_by)
            if other is not None and other.job_id != job.job_id:
                raise FailedPrecondition(
                    f"another shard job ({other.job_id}) is writing {job.shown_output!r}"
                ) from None
            yield Attached(job.job_id, REATTACHED)
            async for event in self._follow(plan, pipeline):
                yield event
            return
        if isinstance(started, Summary):
            yield Attached(job.job_id, REATTACHED)
            yield Progress(started.rows_done, plan.rows_total, 0.0, started.rows_failed)
            yield started
            return
        yield Attached(job.job_id, STARTED if started.manifest.fresh else RESUMED)
        async for event in self._watch(started, pipeline):
            yield event

    def _start(self, plan: ShardPlan, pipeline: ProxyLabelPipeline) -> RunningJob | Summary:
        """Take the job's lock and run it as a task of this process; a finished job's summary.
        Synchronous from the check to the registration, so two calls of this process never both
        start a job; LeaseBusy when another process runs it."""
        job_id = plan.job.job_id
        if job_id in self.running:
            return self.running[job_id]
        lease, manifest = open_output(plan, self.expiry)
        jobs.register(job_id, plan.job.output_path, self.config.output_roots)
        if manifest.complete:
            lease.release()
            return summary_of(manifest, rows_resumed=manifest.rows_done)
        if lease.took_over is not None:
            log.info("shard job %s: taking over from %s (stale lock)", job_id, lease.took_over.label)
        handle = RunningJob(plan, lease, manifest)
        self.running[job_id] = handle
        handle.task = asyncio.create_task(self._run(handle, pipeline), name=f"shard job {job_id}")
        return handle

    async def _run(self, handle: RunningJob, pipeline: ProxyLabelPipeline) -> None:
        try:
            async with handle.lease.kept_alive():
                async for event in score_job(
                    handle.plan,
                    pipeline,
                    handle.lease,
                    handle.manifest,
                    should_stop=lambda: handle.cancel_requested,
                ):
                    handle.publish(event)
        except LeaseLost:
            log.warning("shard job %s: lost its lock; another process runs it now", handle.job_id)
            handle.publish(_Ended(lost=True))
        except asyncio.CancelledError:
            handle.publish(
                _Ended(
                    Unavailable(
                        f"the proxylabel service stopped while running shard job "
                        f"{handle.job_id}; ask again to resume it"
                    )
                )
            )
            raise
        except Exception as exc:
            if not isinstance(exc, ServingError):
                log.exception("shard job %s failed", handle.job_id)
            handle.publish(_Ended(exc))
        finally:
            handle.lease.release()
            if self.running.get(handle.job_id) is handle:
                del self.running[handle.job_id]

    async def _watch(
        self,
        handle: RunningJob,
        pipeline: ProxyLabelPipeline,
        last: Progress | None = None,
        first_rows: int | None = None,
    ) -> AsyncIterator[Progress | Summary]:
        """A job of this process: where it is, then every change, then its summary. `last`: what
        the stream showed already (when it followed the job elsewhere before)."""
        queue = handle.watch()
        try:
            if first_rows is None:
                first_rows = handle.current.rows_done
            if _changed(last, handle.current):
                yield handle.current
            while True:
                event = await queue.get()
                if isinstance(event, Progress):
                    yield event
                elif isinstance(event, Summary):
                    # Resumed, for this stream: the rows that were done before it attached.
                    yield dataclasses.replace(event, rows_resumed=first_rows)
                    return
                elif event.lost:
                    async for later in self._follow(handle.plan, pipeline, handle.current, first_rows):
                        yield later
                    return
                else:
                    raise _as_error(event.error, handle.job_id)
        finally:
            handle.unwatch(queue)

    async def _follow(
        self,
        plan: ShardPlan,
        pipeline: ProxyLabelPipeline,
        last: Progress | None = None,
        first_rows: int | None = None,
    ) -> AsyncIterator[Progress | Summary]:
        """A job another process runs, from its manifest; taken over here when its owner dies."""
        job = plan.job
        while True:
            handle = self.running.get(job.job_id)
            if handle is not None:  # another call of this process took it over meanwhile
                async for event in self._watch(handle, pipeline, last, first_rows):
                    yield event
                return
            status = jobs.read_status(job.output_path, self.expiry)
            if status is not None:
                _check_access(job, status.started_by)
                if status.job_id != job.job_id:
                    raise FailedPrecondition(
                        f"shard job {job.job_id} was replaced by job {status.job_id} in its output directory"
                    )
                if first_rows is None:
                    first_rows = status.rows_done
                progress = Progress(
                    status.rows_done, status.rows_total, status.rows_per_second, status.rows_failed
                )
                if _changed(last, progress):
                    last = progress
                    yield progress
                if status.state == SUCCEEDED:
                    data = read_manifest(job.output_path)
                    if data is None:
                        raise NotFound(f"shard job {job.job_id}: its manifest went away")
                    yield summary_of(Manifest(job.output_path / MANIFEST, data), rows_resumed=first_rows)
                    return
                if status.state in (FAILED, CANCELLED) and not status.owner_alive:
                    raise _status_error(status)
            if status is None or status.state == jobs.ORPHANED:
                try:
                    started = self._start(plan_shard(job, pipeline), pipeline)
                except LeaseBusy:
                    pass  # someone else took it over first: follow them
                else:
                    if isinstance(started, Summary):
                        yield dataclasses.replace(started, rows_resumed=first_rows or 0)
                        return
                    async for event in self._watch(started, pipeline, last, first_rows):
                        yield event
                    return
            await asyncio.sleep(self.config.job_poll_seconds)

    # -- by id ----------------------------------------------------------------------------------

    def get(self, job_id: str, caller: Caller | None = None) -> JobStatus:
        """The job; NOT_FOUND for a job of another caller too (its existence is not revealed)."""
        status = jobs.find(job_id, self.config.output_roots, self.expiry)
        if not may_access(caller, status.started_by):
            raise jobs.not_found(job_id)
        return status

    def list_jobs(self, caller: Caller | None = None) -> list[JobStatus]:
        """The caller's jobs (every job for an admin, or without a caller)."""
        return [
            s
            for s in jobs.list_jobs(self.config.output_roots, self.expiry)
            if may_access(caller, s.started_by)
        ]

    def cancel(self, job_id: str, caller: Caller | None = None) -> JobStatus:
        """Ask the job to stop at its next part boundary, wherever it runs; a job nobody runs is
        marked cancelled at once. A finished job is returned unchanged. Only the caller that
        started the job, or an admin, may (PERMISSION_DENIED)."""
        status = self.get(job_id)
        if not may_access(caller, status.started_by):
            raise PermissionDenied(
                f"shard job {job_id} was started by another caller: only that caller or an "
                "admin may cancel it"
            )
        handle = self.running.get(job_id)
        if handle is not None:
            handle.cancel_requested = True
            jobs.request_cancel(status.output_path)  # so other replicas report it
            return self.get(job_id)
        if status.terminal:
            return status
        jobs.request_cancel(status.output_path)  # its owner, on another replica, sees it
        if not status.owner_alive:
            # Nobody runs it: record it cancelled now rather than leave it to the next reader.
            try:
                lease = Lease.acquire(status.output_path, self.expiry)
            except LeaseBusy:
                pass  # taken over meanwhile: its new owner sees the cancel file
            else:
                try:
                    data = read_manifest(status.output_path)
                    if (
                        data is not None
                        and data.get("job_id") == job_id
                        and data.get("state") not in (SUCCEEDED, FAILED, CANCELLED)
                    ):
                        with lease.guard():
                            Manifest(status.output_path / MANIFEST, data).finish(CANCELLED)
                finally:
                    lease.release()
        return self.get(job_id)

    # -- the process's lifetime -------------------------------------------------------------------

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        """The service stops: its jobs stop where they are and their locks are released, so the
        next ScoreShard (on any replica) resumes them without waiting for the lock to expire."""
        tasks = [h.task for h in self.running.values() if h.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _check_access(job: ShardJob, started_by: str) -> None:
    if not may_access(job.caller, started_by):
        raise PermissionDenied(
            f"output directory {job.shown_output!r} holds a shard job of another caller; "
            "choose another output_path"
        )


def _status_error(status: JobStatus) -> ServingError:
    if status.state == CANCELLED:
        return JobCancelled(
            f"shard job {status.job_id} was cancelled after {status.rows_done} of "
            f"{status.rows_total} rows; its finished parts stay"
        )
    code = grpc.StatusCode.__members__.get(status.error_code, grpc.StatusCode.INTERNAL)
    return error_for(code, status.error_message or f"shard job {status.job_id} failed")
