"""Process logging: plain lines for people, JSON lines for log collectors."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from services.runtime.config import LoggingConfig


class _StderrHandler(logging.StreamHandler[TextIO]):
    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: LoggingConfig, process: str) -> None:
    # The handler looks sys.stderr up at each write (it may be re-pointed by NativeStderr).
    handler = _StderrHandler()
    if config.json_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)


# What C libraries print on fd 2 about an image they decoded anyway (or refused). A bad image is
# already reported on its own answer, so these lines are counted, not printed.
_NATIVE_LINES = (
    ("libpng", re.compile(r"^libpng (warning|error):")),
    (
        "libjpeg",
        re.compile(
            r"^(Corrupt JPEG data|Premature end of JPEG|Invalid JPEG|Bogus marker|"
            r"Unsupported marker|JPEG datastream|Not a JPEG file|Warning: unknown JFIF)"
        ),
    ),
)


def native_library(line: str) -> str | None:
    """The library a stderr line of native code comes from, if it is a decoder's warning."""
    return next((name for name, pattern in _NATIVE_LINES if pattern.match(line)), None)


class NativeStderr:
    """Routes what native code writes on file descriptor 2 through a pipe: decoder warnings are
    counted (`on_warning(library)`) and logged at DEBUG; every other line goes to the real stderr.

    Python's own `sys.stderr` (log lines, tracebacks) is pointed at the real stderr directly, so
    nothing a dying process prints depends on the reader thread."""

    def __init__(self, on_warning: Callable[[str], None]) -> None:
        self.on_warning = on_warning
        self._original = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._original = os.dup(2)
        sys.stderr.flush()
        sys.stderr = os.fdopen(os.dup(self._original), "w", buffering=1, errors="backslashreplace")
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(
            target=self._pump, args=(read_end,), name="native-stderr", daemon=True
        )
        self._thread.start()

    def _pump(self, read_end: int) -> None:
        log = logging.getLogger("native")
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode(errors="replace").rstrip("\n")
                library = native_library(line)
                if library is None:
                    os.write(self._original, raw)
                    continue
                self.on_warning(library)
                log.debug("%s: %s", library, line)
