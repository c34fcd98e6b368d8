"""The lock of a shard job's output directory: a lease with a heartbeat, kept on the shared volume.

    <output>/.lock    {"owner": token, "host": …, "pid": …, "heartbeat": unix time, …}, padded

The holder rewrites the heartbeat every third of the expiry. Anyone may take the lease over when

- nobody holds it (never taken, or released),
- its heartbeat is older than the expiry (the holder died on another machine, or hangs), or
- the holder ran on this kernel in this PID namespace and its process is gone: a job killed on
  this machine is taken over at once, without waiting out the expiry (the process is recognised
  by its pid and start time, so a reused pid is not mistaken for it).

Every read-check-write of the file happens under a short flock of it, so two contenders never
both win (the Linux NFS client maps flock onto NFS locks, so this holds across machines that
share the volume). The file is rewritten in place at a fixed size, never replaced or removed:
the flock must always guard the same inode. A holder checks that it still holds the lease under
the same flock before it commits anything (`Lease.guard`), so a holder whose lease was taken
over while it hung writes nothing more. Heartbeats compare wall clocks across machines: keep
them synchronised (NTP) well within the expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from services.runtime.errors import Unavailable

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_SIZE = 1024  # every write is this long (space padded), so a shorter lease leaves no old tail
_FLOCK_WAIT_SECONDS = 10.0  # others hold the flock for one small read or write

# Tokens of the leases this process holds: a lease naming this process and a token not in here
# was left by a run of this process that ended without releasing it.
_HELD: set[str] = set()
_COUNTER = itertools.count()


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lease, as written in the lock file."""

    owner: str  # a token per holding: "" when released
    host: str
    kernel: str  # boot id: processes of one kernel can check each other's liveness directly
    pid_ns: str
    pid: int
    start: int  # the process's start time (clock ticks after boot): tells a reused pid apart
    heartbeat: float  # wall clock, seconds
    acquired: float

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}"

    def alive(self, expiry_seconds: float, now: float | None = None) -> bool:
        """Whether the holder still runs the job (a released lease has no live holder)."""
        if not self.owner:
            return False
        if (time.time() if now is None else now) - self.heartbeat >= expiry_seconds:
            return False  # stale, wherever it runs: dead, or hung
        me = _identity()
        if self.kernel and self.kernel == me["kernel"] and self.pid_ns == me["pid_ns"]:
            # On this machine a dead holder is known at once, without waiting out the expiry.
            if self.pid == os.getpid() and self.start == me["start"]:
                return self.owner in _HELD
            return process_start(self.pid) == self.start
        return True


class LeaseBusy(Exception):
    """A live holder has the lease."""

    def __init__(self, holder: Holder) -> None:
        super().__init__(f"held by {holder.label}")
        self.holder = holder


class LeaseLost(Exception):
    """The lease was taken over while we held it (we were stale): stop writing."""


@functools.cache
def _identity() -> dict:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return {
        "host": socket.gethostname(),
        "kernel": read("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
        "start": process_start(os.getpid()),
    }


def process_start(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces); -1 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    fields = stat[stat.rindex(")") + 2 :].split()
    state = fields[0]
    return -1 if state in ("Z", "X") else int(fields[19])


def _parse(raw: bytes) -> Holder | None:
    text = raw.decode(errors="replace").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[int]:
    """The lock file open and flocked; the wait is bounded (holders keep it for one small write)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + _FLOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    # The directory's name only: messages do not show the server's paths.
                    raise Unavailable(
                        f"the lock of shard output {path.parent.name!r} stayed locked for "
                        f"{_FLOCK_WAIT_SECONDS:.0f}s"
                    ) from None
                time.sleep(0.002)
        yield fd
    finally:
        os.close(fd)  # drops the flock


def _read(fd: int) -> Holder | None:
    return _parse(os.pread(fd, _SIZE * 2, 0))


def _write(fd: int, holder: Holder | None) -> None:
    data = json.dumps(asdict(holder)).encode() if holder is not None else b""
    os.pwrite(fd, data.ljust(_SIZE), 0)
    os.fsync(fd)


def write_lock(directory: Path, holder: Holder) -> None:
    """Record `holder` in the directory's lock as its own process would: under the flock."""
    with _locked(directory / LOCK_FILE, exclusive=True) as fd:
        _write(fd, holder)


def read_lock(directory: Path) -> Holder | None:
    """The lock's last holder as recorded, released (owner "") or not; None when there never was one."""
    path = directory / LOCK_FILE
    if not path.exists():
        return None
    with _locked(path, exclusive=False) as fd:
        return _read(fd)


class Lease:
    """A lease this process holds on one directory."""

    def __init__(self, directory: Path, holder: Holder, expiry_seconds: float) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self.holder = holder
        self.expiry_seconds = expiry_seconds
        self.lost = False
        self.took_over: Holder | None = None  # the stale holder this lease replaced, if any

    @property
    def owner(self) -> str:
        return self.holder.owner

    @classmethod
    def acquire(cls, directory: Path, expiry_seconds: float) -> Lease:
        """Take the lease, or raise LeaseBusy naming its live holder."""
        me = _identity()
        now = time.time()
        token = f"{uuid.uuid4().hex[:12]}-{next(_COUNTER)}"
        holder = Holder(token, me["host"], me["kernel"], me["pid_ns"], os.getpid(), me["start"], now, now)
        path = directory / LOCK_FILE
        with _locked(path, exclusive=True) as fd:
            current = _read(fd)
            if current is not None and current.owner and current.alive(expiry_seconds, now):
                raise LeaseBusy(current)
            _write(fd, holder)
            _HELD.add(token)
        lease = cls(directory, holder, expiry_seconds)
        if current is not None and current.owner:
            lease.took_over = current
            log.info("took over the stale lock of %s from %s", directory, current.label)
        return lease

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Hold the lock file while committing: raises LeaseLost unless we still hold the lease."""
        with _locked(self.path, exclusive=True) as fd:
            current = _read(fd)
            if self.lost or current is None or current.owner != self.owner:
                self._lose(current)
                raise LeaseLost(
                    f"the lock of {self.directory} was taken over by "
                    f"{current.label if current and current.owner else 'nobody'}"
                )
            yield

    def beat(self) -> None:
        """Refresh the heartbeat (raises LeaseLost when someone took the lease over)."""
        with _locked(self.path, exclusive=True) as fd:
            current = _read(fd)
            if self.lost or current is None or current.owner != self.owner:
                self._lose(current)
                raise LeaseLost(f"the lock of {self.directory} was taken over")
            self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            _write(fd, self.holder)

    def _lose(self, current: Holder | None) -> None:
        if not self.lost:
            log.warning(
                "lost the lock of %s to %s",
                self.directory,
                current.label if current and current.owner else "nobody",
            )
        self.lost = True
        _HELD.discard(self.owner)

    def release(self) -> None:
        """Give the lease up (if still ours): the next taker needs not wait for the expiry."""
        if self.lost:
            return
        try:
            with _locked(self.path, exclusive=True) as fd:
                current = _read(fd)
                if current is not None and current.owner == self.owner:
                    _write(fd, Holder(**{**asdict(self.holder), "owner": "", "heartbeat": time.time()}))
        except OSError as exc:  # the directory went away: nothing to release
            log.warning("could not release the lock of %s: %s", self.directory, exc)
        finally:
            self.lost = True
            _HELD.discard(self.owner)

    @contextlib.asynccontextmanager
    async def kept_alive(self) -> AsyncIterator[Lease]:
        """Refresh the heartbeat in the background while the body runs."""
        task = asyncio.create_task(self._beat_forever(), name=f"heartbeat {self.directory}")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _beat_forever(self) -> None:
        interval = max(0.05, self.expiry_seconds / 3)
        while not self.lost:
            await asyncio.sleep(interval)
            try:
                # In a thread: on a slow shared volume the flock and fsync must not stall the loop.
                await asyncio.to_thread(self.beat)
            except LeaseLost:
                return
            except OSError as exc:  # a transient volume error: the next beat may succeed
                log.warning("heartbeat of %s failed: %s", self.directory, exc)
