"""Shard jobs as their output directories record them: state, lookup by id, listing, cancel requests.

A job's state lives with its output (the manifest and the lock, services/proxylabel/manifest.py and
lease.py), never only in a process, so any replica answers about any job:

    RUNNING     the manifest says running and the lock's holder is alive
    SUCCEEDED / FAILED / CANCELLED   as the manifest records it
    CANCELLED   also: running by the manifest, no live holder, and a cancel was asked
    ORPHANED    running by the manifest and no live holder (it died, or stopped with its service):
                the next ScoreShard of the same request takes it over

Jobs are found by id through small index entries under each output root,

    <output root>/.shard-jobs/<job id>.json     {"output": <output directory, relative to the root>}

written when the service starts a job, so neither a lookup nor a listing walks the data.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.proxylabel.lease import read_lock
from services.proxylabel.manifest import (
    CANCEL_FILE,
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    read_manifest,
)
from services.proxylabel.shard_plan import JOB_ID_LENGTH
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.model_files import write_atomic

INDEX_DIR = ".shard-jobs"
ORPHANED = "orphaned"
_JOB_ID = re.compile(f"[0-9a-f]{{{JOB_ID_LENGTH}}}")


@dataclass(frozen=True)
class JobStatus:
    """One job, read from its output directory."""

    job_id: str
    state: str  # running | succeeded | failed | cancelled | orphaned
    input_path: Path
    output_path: Path
    rows_done: int
    rows_total: int
    rows_failed: int
    parts_done: int
    parts_total: int
    batch_rows: int
    rules_version: str
    error_code: str  # a grpc.StatusCode name, when FAILED
    error_message: str
    owner: str  # host:pid of the live holder, else of the last run
    started_by: str  # the caller that started the job ("" without one: services/proxylabel/access.py)
    updated: float  # wall clock of the manifest's last change
    heartbeat: float | None  # the holder's last heartbeat, if a lock was ever taken
    cancel_requested: bool
    owner_alive: bool  # a live process holds the job's lock (it may be restarting a stopped job)
    rows_per_second: float  # of the last run, over the parts it committed

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument(
            f"job_id {job_id!r} is not a shard job id ({JOB_ID_LENGTH} lowercase hex "
            "digits, as the first ScoreShard event names it)"
        )
    return job_id


def read_status(output: Path, expiry_seconds: float) -> JobStatus | None:
    """The job in an output directory, or None when it holds none (no or unreadable manifest)."""
    manifest = read_manifest(output)
    if manifest is None or "job_id" not in manifest:
        return None
    try:
        last = read_lock(output)
    except OSError:  # e.g. no permission: reported as not running rather than failing the call
        last = None
    holder = last if last is not None and last.owner else None
    alive = holder is not None and holder.alive(expiry_seconds)
    cancel_requested = (output / CANCEL_FILE).exists()
    recorded = manifest.get("state") or (SUCCEEDED if manifest.get("complete") else RUNNING)
    if recorded in TERMINAL:
        state = recorded
    elif alive:
        state = RUNNING
    else:
        state = CANCELLED if cancel_requested else ORPHANED
    error = manifest.get("error") or {}
    parts = manifest.get("parts", [])
    return JobStatus(
        job_id=manifest["job_id"],
        state=state,
        input_path=Path(manifest.get("input", {}).get("path", "")),
        output_path=output,
        rows_done=sum(p["rows"] for p in parts),
        rows_total=int(manifest.get("rows_total", 0)),
        rows_failed=sum(p["rows_failed"] for p in parts),
        parts_done=len(parts),
        parts_total=int(manifest.get("parts_total", len(parts))),
        batch_rows=int(manifest.get("batch_rows", 0)),
        rules_version=manifest.get("rules_version", ""),
        error_code=error.get("code", "") if state == FAILED else "",
        error_message=error.get("message", "") if state == FAILED else "",
        owner=holder.label if alive and holder else manifest.get("owner", ""),
        started_by=str(manifest.get("started_by") or ""),
        updated=float(manifest.get("updated", 0.0)),
        heartbeat=last.heartbeat if last is not None else None,
        cancel_requested=cancel_requested and state in (RUNNING, CANCELLED),
        owner_alive=alive,
        rows_per_second=float((manifest.get("runs") or [{}])[-1].get("rows_per_second", 0.0)),
    )


def relative_to_roots(path: Path, roots: Sequence[Path]) -> str:
    """A path as messages name it: relative to the configured root that holds it, never absolute
    (the server's layout is not the caller's business). A path under no root shows its name."""
    for root in roots:
        resolved = root.resolve()
        if path.is_relative_to(resolved):
            return path.relative_to(resolved).as_posix()
    return path.name


def root_of(path: Path, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        if path.is_relative_to(root.resolve()):
            return root.resolve()
    return None


def register(job_id: str, output: Path, roots: Sequence[Path]) -> None:
    """Index a job under the output root that holds it (idempotent)."""
    root = root_of(output, roots)
    if root is None:
        return
    entry = root / INDEX_DIR / f"{job_id}.json"
    data = json.dumps({"output": output.relative_to(root).as_posix()})
    try:
        if entry.exists() and entry.read_text() == data:
            return
        # No fsync on the shared volume for it: each start of the job writes it again.
        write_atomic(entry, data, durable=False)
    except OSError:
        pass  # the job runs all the same; only its lookup by id needs the entry


def _indexed(root: Path, entry: Path) -> Path | None:
    try:
        rel = json.loads(entry.read_text())["output"]
        output = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):  # RuntimeError: a symlink loop
        return None
    # An entry must not point outside its root (the index is data on a shared volume).
    return output if output.is_relative_to(root) else None


def find(job_id: str, roots: Sequence[Path], expiry_seconds: float) -> JobStatus:
    """The job with this id under the roots: INVALID_ARGUMENT for a malformed id, NOT_FOUND when no
    output directory under them holds it (any more)."""
    check_job_id(job_id)
    for root in roots:
        root = root.resolve()
        output = _indexed(root, root / INDEX_DIR / f"{job_id}.json")
        if output is None:
            continue
        status = read_status(output, expiry_seconds)
        if status is not None and status.job_id == job_id:
            return status
    raise not_found(job_id)


def not_found(job_id: str) -> NotFound:
    """The answer about a job that is not there, or not the caller's (the same: it does not say
    whether a job of another caller exists)."""
    return NotFound(f"no shard job {job_id} under the output roots")


def list_jobs(roots: Sequence[Path], expiry_seconds: float) -> list[JobStatus]:
    """Every indexed job whose output still holds it, most recently updated first."""
    found: dict[str, JobStatus] = {}
    for root in roots:
        root = root.resolve()
        try:
            entries = sorted((root / INDEX_DIR).glob("*.json"))
        except OSError:
            continue
        for entry in entries:
            if not _JOB_ID.fullmatch(entry.stem) or entry.stem in found:
                continue
            output = _indexed(root, entry)
            status = read_status(output, expiry_seconds) if output is not None else None
            if status is not None and status.job_id == entry.stem:
                found[entry.stem] = status
    return sorted(found.values(), key=lambda s: s.updated, reverse=True)


def request_cancel(output: Path) -> None:
    """Ask the job's owner, wherever it runs, to stop at its next part boundary."""
    marker = output / CANCEL_FILE
    if not marker.exists():
        marker.write_text(json.dumps({"requested": time.time()}))
