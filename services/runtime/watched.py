"""Files re-read when they change (certificates, token files, secrets): one way to notice it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

Stamp = tuple[tuple[int, int], ...]


class WatchedFiles:
    """Tells when files changed (modification time and size), looking at most every `interval`
    seconds, so it can sit on a hot path (a handshake, every call). Thread-safe.

    `poll()` answers the files' new stamp when it differs from the one last `take`n (none yet at
    first); the caller takes it once it has used the files, or leaves it to be offered again."""

    def __init__(self, paths: Sequence[Path], interval: float) -> None:
        self.paths = list(paths)
        self.interval = interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self._seen: Stamp | None = None

    def stamp(self) -> Stamp:
        stamps = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((0, 0))  # missing: a later appearance is a change
        return tuple(stamps)

    def poll(self) -> Stamp | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.interval:
                return None
            self._checked = now
            stamp = self.stamp()
            return None if stamp == self._seen else stamp

    def take(self, stamp: Stamp) -> None:
        with self._lock:
            self._seen = stamp
