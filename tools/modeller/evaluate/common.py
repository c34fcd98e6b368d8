"""What every ``tessera-evaluate`` command shares: errors, the progress line, the answer cache,
markdown tables and the output folder.

**The cache.** What a command fetched from the gateway is appended, batch by batch, to a JSON-lines
file named by a key over the manifest's content, the request (mode, ensemble, faces …) and the
versions of the models that answer (from ``GetStatus``). A second run of the same manifest
against the same models reads it instead of asking again (so ``search-weights`` and
``--fit-temperature`` refits cost no serving), and a run that was interrupted resumes where it
stopped. Each entry also records the sha256 of the file it was made from: an image or clip that
changed on disk is asked again. Transient failures (gateway busy or down, a file that could not be
read) are never cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TextIO

import grpc

CACHE_FORMAT = 1
DEFAULT_CACHE = Path(".cache") / "evaluate"
# gRPC codes of an item that may well be answered next time: never cached.
TRANSIENT = {
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNKNOWN",
    "INTERNAL",
    "ABORTED",
    "unreadable",
}


class ManifestError(ValueError):
    """The input cannot be used; the message names the file and the line. Nothing is sent."""


class EvaluationError(RuntimeError):
    """The evaluation failed (a whole request refused, nothing scored, …)."""


@dataclass(frozen=True)
class Skipped:
    """A row that was not scored, and why; the run goes on without it."""

    line: int
    path: str
    reason: str  # "unreadable", "no_face", "several_faces", "no_levels", or a gRPC code name
    message: str


class ManifestLine(Protocol):
    """A manifest's row, as a cache entry names it."""

    @property
    def key(self) -> str: ...
    @property
    def line(self) -> int: ...
    @property
    def path(self) -> str: ...


def skip_entry(row: ManifestLine, sha: str, reason: str, message: str) -> dict[str, Any]:
    """The cache entry of a row that was not scored (`reason`: as `Skipped.reason`)."""
    return {
        "row": row.key,
        "sha": sha,
        "line": row.line,
        "path": row.path,
        "status": "skip",
        "skip_reason": reason,
        "message": message,
    }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_folder(path: Path, files: Sequence[Path]) -> str:
    """A folder of frames: its files' names and contents, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# Progress ----------------------------------------------------------------------------------------
class Progress:
    """One progress line on stderr: rewritten in place on a terminal, else printed at most every
    ``every`` seconds (CI logs, ``| tee``); nothing when disabled."""

    def __init__(
        self,
        total: int,
        what: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        every: float = 10.0,
    ) -> None:
        self.total = total
        self.what = what
        self.done = 0
        self.cached = 0
        self.failed = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.start = time.monotonic()
        self._last = self.start  # the first line after `every` seconds (the last one always)

    def update(self, n: int = 1, *, cached: int = 0, failed: int = 0) -> None:
        self.done += n
        self.cached += cached
        self.failed += failed
        self._show()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.cached) / elapsed if elapsed > 0 else 0.0
        extra = f", {self.cached} from the cache" if self.cached else ""
        extra += f", {self.failed} not scored" if self.failed else ""
        return f"{self.what}: {self.done}/{self.total}{extra} ({rate:.1f}/s, {elapsed:.0f} s)"

    def _show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self._line() + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self._last >= self.every:
            self._last = now
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._show(final=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Cache ---------------------------------------------------------------------------------------------
class AnswerCache:
    """Entries by row key, in a JSON-lines file ``<dir>/<kind>-<key>.jsonl``: a header line (what
    the key was made of), then one entry per row answered; a later entry of a row wins. Appended
    and flushed per batch, so a killed run loses at most the batch in flight."""

    def __init__(self, directory: Path | None, kind: str, key_parts: Mapping[str, Any]) -> None:
        self.key = digest({"format": CACHE_FORMAT, "kind": kind, **key_parts})[:24]
        self.path = None if directory is None else Path(directory) / f"{kind}-{self.key}.jsonl"
        self.entries: dict[str, dict[str, Any]] = {}
        self.reused = 0
        if self.path is not None and self.path.exists():
            self._load()
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append([{"header": {"format": CACHE_FORMAT, "kind": kind, **key_parts}}])

    def _load(self) -> None:
        assert self.path is not None
        with self.path.open(encoding="utf-8") as f:
            for text in f:
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write: that row is asked again
                if isinstance(entry, dict) and "row" in entry:
                    self.entries[entry["row"]] = entry

    def _append(self, entries: Iterable[dict[str, Any]]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, row: str, sha: str, **match: Any) -> dict[str, Any] | None:
        """The entry of a row made from the same file (and the same ``match`` fields), or None."""
        e = self.entries.get(row)
        if e is None or e.get("sha") != sha or any(e.get(k) != v for k, v in match.items()):
            return None
        return e

    def put(self, entries: Sequence[dict[str, Any]]) -> None:
        """Entries with ``row`` and ``sha``; those of a transient failure are kept in memory only."""
        keep = [e for e in entries if e.get("skip_reason") not in TRANSIENT]
        for e in entries:
            self.entries[e["row"]] = e
        self._append(keep)


# Gateway helpers ---------------------------------------------------------------------------------
def rpc_error_text(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def model_versions(status: Any, service: str) -> dict[str, str]:
    """name → version of the models one service (emotion, engagement, proxylabel) reports in
    GetStatus."""
    out: dict[str, str] = {}
    for s in status.services:
        if s.name == service:
            out.update({m.name: m.version for m in s.models})
    return out


# Markdown and outputs --------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        text = f"{value:.{digits}f}"
        return f"{0.0:.{digits}f}" if float(text) == 0 else text  # no "-0.0000"
    return str(value)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; numbers right-aligned unless ``align`` ("l"/"r" per column) says."""
    rows = [[fmt(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def skipped_table(skipped: Sequence[Skipped], shown: int = 50) -> str:
    rows = [(s.line, s.path, s.reason, s.message) for s in skipped[:shown]]
    text = md_table(("line", "path", "reason", "message"), rows, "rlll")
    if len(skipped) > shown:
        text += f"\n\n… and {len(skipped) - shown} more (all of them in report.json)."
    return text


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
