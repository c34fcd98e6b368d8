"""Shard jobs: score a parquet shard into a directory of part files, resumable after a crash.

    <output>/part-00000.parquet …   one per part (a row group, or `batch_rows` rows), each written
                                    under a temporary name then renamed
    <output>/manifest.json          job id, input fingerprint, rules, parts committed (rows, id range,
                                    confusion counts), the job's state and runs; rewritten atomically
                                    after each part: the job's state lives here, not in a process
    <output>/.lock                  the lease of the process that runs the job, with its heartbeat
                                    (services/proxylabel/lease.py): one writer at a time
    <output>/.cancel                asks the job's owner to stop at the next part boundary

A part is committed once its file is renamed into place and the manifest names it, both under the
lease. A job killed at any point and run again resumes after the last committed part (an
uncommitted part file is overwritten), so the output holds every input id exactly once. Parts are
fixed row ranges of the input, so a rerun cuts them the same way. The shard is read by row group,
never whole.

The whole request is validated before any work or output (docs/operations.md#errors): the shard's
columns by their types, its embedder metadata, the paths; a problem with one row (NaN, zero,
underflowing or overflowing embedding, empty text, …) is written on that row with a reason, never
dropped. Messages name paths as the job's labels give them (relative to the service's roots), never
as absolute server paths.

    tessera-score-shard-offline --repo model_repository in.parquet out_dir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.fusion.proxylabel import final_labels, soft_vote
from services.fusion.rules import ProxyLabelRules
from services.proxylabel.access import Caller, may_access, started_by
from services.proxylabel.features import Conversations, from_messages, from_pairs, from_texts
from services.proxylabel.knn import NUM_CLASSES, EmbedderInfo, KnnOptions, knn_labels
from services.proxylabel.lease import Lease, LeaseBusy, LeaseLost
from services.proxylabel.pipeline import NO_NEIGHBOUR, ProxyLabelPipeline, embedding_problem
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServingError,
    status_of,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # fields added since are optional: older manifests still resume
CANCEL_FILE = ".cancel"
# The service's is configurable (job_lock_expiry_seconds); the offline CLI uses this.
DEFAULT_LOCK_EXPIRY_SECONDS = 30.0
EMBEDDER_METADATA_KEY = b"tessera.embedder"
ID, EMBEDDING, SCORES = "id", "embedding", "gpt_scores"
JOB_ID_LENGTH = 32  # hex digits
T = TypeVar("T")

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("label", pa.int8()),
    ("probabilities", pa.list_(pa.float32(), NUM_CLASSES)),
    ("confidence", pa.float32()),
    ("decided_by", pa.string()),
    ("knn_expected_score", pa.float32()),
    ("reason", pa.string()),
])


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Progress:
    rows_done: int
    rows_total: int
    rows_per_second: float
    rows_failed: int


@dataclass(frozen=True)
class Evaluation:
    rows_labelled: int
    accuracy: float
    macro_f1: float
    mean_absolute_error: float
    per_class_accuracy: list[float]


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


def evaluate(confusion: np.ndarray) -> Evaluation | None:
    """Figures of a confusion matrix (rows: known score, columns: proxy label), as scikit-learn
    computes them: macro-F1 over the scores present in either (F1 0 where undefined); per-class
    accuracy is the recall of each score, NaN for a score no labelled row has."""
    c = np.asarray(confusion, np.float64)
    n = c.sum()
    if n == 0:
        return None
    tp = np.diag(c)
    true, pred = c.sum(axis=1), c.sum(axis=0)
    present = (true + pred) > 0
    f1 = np.divide(2 * tp, true + pred, out=np.zeros_like(tp), where=(true + pred) > 0)
    distance = np.abs(np.arange(NUM_CLASSES)[:, None] - np.arange(NUM_CLASSES)[None, :])
    recall = np.divide(tp, true, out=np.full_like(tp, np.nan), where=true > 0)
    return Evaluation(int(n), float(tp.sum() / n), float(f1[present].mean()), float((c * distance).sum() / n),
                      recall.tolist())


def confusion_of(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    out = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(out, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    return out


# ---------------------------------------------------------------------------------------------
# Input: validation and reading


@dataclass(frozen=True)
class ShardJob:
    input_path: Path
    output_path: Path
    rules: ProxyLabelRules
    rules_version: str = ""
    batch_rows: int = 0
    # Who asks (services/proxylabel/access.py); None: no identity (an open gateway, the CLI).
    caller: Caller | None = None
    # How messages name the paths (relative to the service's roots); the paths themselves when unset.
    input_label: str = ""
    output_label: str = ""

    @property
    def shown_input(self) -> str:
        return self.input_label or str(self.input_path)

    @property
    def shown_output(self) -> str:
        return self.output_label or str(self.output_path)

    @property
    def job_id(self) -> str:
        """The same request makes the same id, so asking again re-attaches instead of starting
        twice. Paths are the server's resolved ones: replicas mount the shared volume alike."""
        key = {"input": str(self.input_path), "output": str(self.output_path), "batch_rows": self.batch_rows,
               "rules_version": self.rules_version, "rules": self.rules.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:JOB_ID_LENGTH]


@dataclass(frozen=True)
class ShardPlan:
    """A validated job: what to read, how to cut it, what the models need."""

    job: ShardJob
    text_kind: str  # messages | pairs | text
    columns: list[str]
    has_id: bool
    has_embedding: bool
    has_scores: bool
    embedder: EmbedderInfo
    parts: list[tuple[int, int]]
    row_group_starts: list[int]
    fingerprint: dict
    run_knn: bool
    run_mlp: bool
    options: KnnOptions

    @property
    def rows_total(self) -> int:
        return self.parts[-1][1] if self.parts else 0


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_text(t: pa.DataType) -> bool:
    """Strings (also dictionary-encoded, or a column of nulls only)."""
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return _is_string(t) or pa.types.is_null(t)


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t) or (pa.types.is_dictionary(t) and pa.types.is_integer(t.value_type))


def _column_type(schema: pa.Schema, name: str) -> pa.DataType:
    found = schema.get_all_field_indices(name)
    if len(found) > 1:
        raise InvalidArgument(f"the shard has {len(found)} columns named '{name}'; expected one")
    return schema.field(found[0]).type


def _expect(ok: bool, name: str, t: pa.DataType, expected: str) -> None:
    if not ok:
        raise InvalidArgument(f"column '{name}' has type {t}; expected {expected}")


def text_kind(schema: pa.Schema) -> tuple[str, list[str]]:
    """Which conversation columns a shard has, checked by type; INVALID_ARGUMENT when it has none,
    or when they hold something else than text."""
    names = set(schema.names)
    if "messages" in names:
        t = _column_type(schema, "messages")
        ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)
        fields = {f.name: f.type for f in t.value_type} if ok else {}
        ok = ok and {"role", "content"} <= set(fields) and all(
            _is_string(fields[k]) or pa.types.is_null(fields[k]) for k in ("role", "content"))
        _expect(ok, "messages", t, "list<struct<role: string, content: string>>")
        return "messages", ["messages"]
    if {"prompt", "response"} <= names:
        for name in ("prompt", "response"):
            t = _column_type(schema, name)
            _expect(_is_text(t), name, t, "string")
        return "pairs", ["prompt", "response"]
    if "text" in names:
        t = _column_type(schema, "text")
        _expect(_is_text(t), "text", t, "string")
        return "text", ["text"]
    raise InvalidArgument(f"the shard has no conversation column: expected 'messages' (list of {{role, content}}), "
                          f"'prompt' and 'response', or 'text'; it has {sorted(names)[:20]}")


def _plain(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array; dictionary-encoded values decoded, a column of nulls only as strings."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        arr = arr.cast(pa.string())
    return arr


def conversations_of(table: pa.Table | pa.RecordBatch, kind: str) -> Conversations:
    if kind == "messages":
        return from_messages(table.column("messages"))
    if kind == "pairs":
        return from_pairs(_plain(table.column("prompt")), _plain(table.column("response")))
    return from_texts([t or "" for t in _plain(table.column("text")).to_pylist()])


def _embedding_dimensions(pf: pq.ParquetFile) -> set[int]:
    """What the shard says its embedding width is: the type (fixed-size list), the file's metadata,
    and the first non-null row (read in a small batch, not a whole row group)."""
    found = set()
    t = pf.schema_arrow.field(EMBEDDING).type
    if pa.types.is_fixed_size_list(t):
        found.add(t.list_size)
    meta = _embedder_metadata(pf)
    if meta and meta.get("dimension") is not None:
        found.add(meta["dimension"])
    for batch in pf.iter_batches(batch_size=64, columns=[EMBEDDING]):
        lengths = pc.list_value_length(batch.column(0)).drop_null()
        if len(lengths):
            found.add(int(lengths[0].as_py()))
            break
    return found


def _embedder_metadata(pf: pq.ParquetFile) -> dict | None:
    """The shard's `tessera.embedder` metadata, checked: a JSON object whose `name` is a string and
    whose `dimension` a positive whole number (INVALID_ARGUMENT otherwise); None without it."""
    raw = (pf.schema_arrow.metadata or {}).get(EMBEDDER_METADATA_KEY)
    if not raw:
        return None
    key = EMBEDDER_METADATA_KEY.decode()
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"the shard's '{key}' metadata is not JSON; expected an object "
                              '{"name": <embedder>, "dimension": <width>}') from None
    if not isinstance(meta, dict):
        raise InvalidArgument(f"the shard's '{key}' metadata is a {type(meta).__name__}; expected an object "
                              '{"name": <embedder>, "dimension": <width>}')
    name, dimension = meta.get("name"), meta.get("dimension")
    if name is not None and not isinstance(name, str):
        raise InvalidArgument(f"the shard's '{key}' metadata has name {_brief(name)} "
                              f"({type(name).__name__}); expected a string")
    if isinstance(dimension, str) and dimension.strip().isdigit():
        dimension = int(dimension)
    if dimension is not None and (isinstance(dimension, bool) or not isinstance(dimension, int) or dimension <= 0):
        raise InvalidArgument(f"the shard's '{key}' metadata has dimension {_brief(dimension)} "
                              f"({type(dimension).__name__}); expected a positive whole number")
    return {**meta, "dimension": dimension}


def _brief(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _scrubbed(exc: BaseException, path: Path, label: str) -> str:
    """An exception's text without the server's path in it."""
    return str(exc).replace(str(path), label)


def open_shard(path: Path, label: str | None = None) -> pq.ParquetFile:
    label = str(path) if label is None else label
    try:
        if not path.exists():
            raise NotFound(f"shard {label!r} does not exist")
        if not path.is_file():
            raise InvalidArgument(f"shard {label!r} is not a file")
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(f"shard {label!r} is not a parquet file: {_scrubbed(exc, path, label)}") from None


def cut_parts(row_group_rows: list[int], batch_rows: int) -> list[tuple[int, int]]:
    """Row ranges of the parts: the row groups, or fixed runs of batch_rows across them."""
    total = sum(row_group_rows)
    if batch_rows <= 0:
        starts = np.concatenate([[0], np.cumsum(row_group_rows)]).astype(int).tolist()
        return [(a, b) for a, b in itertools.pairwise(starts) if b > a]
    return [(a, min(a + batch_rows, total)) for a in range(0, total, batch_rows)]


def plan_shard(job: ShardJob, pipeline: ProxyLabelPipeline) -> ShardPlan:
    """Validate the whole job before any work; raises the documented status on a problem."""
    if job.batch_rows < 0:
        raise InvalidArgument(f"batch_rows must be >= 0, not {job.batch_rows}")
    mode = job.rules.mode
    run_knn, run_mlp = mode in ("knn", "ensemble"), mode in ("mlp", "ensemble")
    pipeline.require(run_knn, run_mlp, "shard scoring")
    expected = pipeline.expected_embedder(run_knn, run_mlp)
    pf = open_shard(job.input_path, job.shown_input)
    schema = pf.schema_arrow
    # Every column the job reads is checked by type here, before anything is written.
    kind, text_columns = text_kind(schema)
    names = set(schema.names)
    columns = list(text_columns)
    has_id = ID in names
    has_embedding = EMBEDDING in names
    has_scores = SCORES in names
    if has_id:
        t = _column_type(schema, ID)
        _expect(_is_id(t), ID, t, "strings or integers")
        columns.insert(0, ID)
    if has_scores:
        t = _column_type(schema, SCORES)
        _expect(pa.types.is_integer(t) or pa.types.is_floating(t), SCORES, t, "numbers 0-5")
        columns.append(SCORES)
    if has_embedding:
        t = _column_type(schema, EMBEDDING)
        _expect((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
                and pa.types.is_floating(t.value_type), EMBEDDING, t, "a list of floats")
        meta = _embedder_metadata(pf)
        if meta and meta.get("name") and meta["name"] != expected.name:
            raise FailedPrecondition(f"the shard's embeddings were made by {meta['name']}, the index by "
                                     f"{expected.name}: embeddings of different embedders cannot be compared")
        try:
            dimensions = _embedding_dimensions(pf)
        except (pa.ArrowException, OSError) as exc:
            raise InvalidArgument(f"shard {job.shown_input!r}: its embeddings cannot be read: "
                                  f"{_scrubbed(exc, job.input_path, job.shown_input)}") from None
        wrong = sorted(dimensions - {expected.dimension})
        if wrong:
            raise InvalidArgument(f"the shard's embeddings have dimension {wrong[0]}, the index {expected.dimension}")
        columns.append(EMBEDDING)
    else:
        problem = pipeline.embedder_problem(expected)
        if problem:
            raise FailedPrecondition(problem.replace("the row has", "the shard has"))
    rg_rows = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(rg_rows)]).astype(int).tolist()
    return ShardPlan(job, kind, columns, has_id, has_embedding, has_scores, expected,
                     cut_parts(rg_rows, job.batch_rows), starts, fingerprint(job.input_path), run_knn, run_mlp,
                     pipeline.knn_options(job.rules.knn))


def read_parts(plan: ShardPlan, first: int) -> Iterator[tuple[int, pa.Table]]:
    """(part index, rows) from part `first` on, reading only the row groups from there."""
    if first >= len(plan.parts):
        return
    # pre_buffer caches every requested row group's column chunks until the reader is done, so
    # memory would grow with the shard; without it the reader holds one batch at a time.
    pf = pq.ParquetFile(plan.job.input_path, pre_buffer=False)
    start = plan.parts[first][0]
    rg = int(np.searchsorted(plan.row_group_starts, start, side="right") - 1)
    position = plan.row_group_starts[rg]
    widest = max(b - a for a, b in plan.parts[first:])
    buffer: list[pa.RecordBatch] = []
    buffered = 0
    i = first
    batches = pf.iter_batches(batch_size=max(1, min(widest, 65_536)), row_groups=range(rg, pf.num_row_groups),
                              columns=plan.columns, use_threads=True)
    for batch in _readable(batches, plan, lambda: position):
        if position + len(batch) <= start:
            position += len(batch)
            continue
        if position < start:
            batch = batch.slice(start - position)
            position = start
        buffer.append(batch)
        buffered += len(batch)
        position += len(batch)
        while i < len(plan.parts) and start + buffered >= plan.parts[i][1]:
            a, b = plan.parts[i]
            table = pa.Table.from_batches(buffer).combine_chunks() if buffer else None
            yield i, table.slice(0, b - a)
            rest = table.slice(b - a)
            buffer, buffered, start = rest.to_batches(), len(rest), b
            i += 1


def _readable(batches: Iterator[pa.RecordBatch], plan: ShardPlan, where: Callable[[], int]
              ) -> Iterator[pa.RecordBatch]:
    """The batches; data the reader cannot decode (a corrupt page) is INVALID_ARGUMENT naming where."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            job = plan.job
            raise InvalidArgument(f"shard {job.shown_input!r} cannot be read from row {where()}: "
                                  f"{_scrubbed(exc, job.input_path, job.shown_input)}") from None
        yield batch


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


# ---------------------------------------------------------------------------------------------
# Output: manifest and parts


# What the manifest records of a job's state. A job the manifest calls running is only running
# while its lock's holder is alive (services/proxylabel/jobs.py derives the state readers see).
RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class Manifest:
    path: Path
    data: dict = field(default_factory=dict)
    fresh: bool = False  # made by this open: nothing of the job was written before

    @classmethod
    def open(cls, output: Path, plan: ShardPlan) -> Manifest:
        """The job's manifest: a new one, or the one of an interrupted run of the same job."""
        path = output / MANIFEST
        job = plan.job
        shown = job.shown_output
        fresh = {"format": MANIFEST_FORMAT, "job_id": job.job_id, "started_by": started_by(job.caller),
                 "input": plan.fingerprint,
                 "rules_version": job.rules_version, "mode": job.rules.mode,
                 "rules": job.rules.model_dump(mode="json"), "batch_rows": job.batch_rows,
                 "rows_total": plan.rows_total, "parts_total": len(plan.parts), "has_scores": plan.has_scores,
                 "parts": [], "complete": False, "state": RUNNING, "error": None, "owner": "",
                 "updated": time.time(), "runs": []}
        if not path.exists():
            others = [p.name for p in output.iterdir() if not p.name.startswith(".") and not p.name.startswith("part-")]
            if others:
                raise FailedPrecondition(f"output directory {shown!r} is not empty and holds no shard job "
                                         f"({', '.join(repr(o) for o in sorted(others)[:5])})")
            return cls(path, fresh, fresh=True)
        old = read_manifest(output)
        if old is None:
            raise FailedPrecondition(f"the manifest of output directory {shown!r} is unreadable; remove the "
                                     "directory to start over")
        if not may_access(job.caller, str(old.get("started_by") or "")):
            raise PermissionDenied(f"output directory {shown!r} holds a shard job of another caller; choose "
                                   "another output_path")
        keys = ["format", "input", "rules_version", "mode", "batch_rows", "rows_total"]
        if "rules" in old:  # manifests written before it was recorded are checked without it
            keys.append("rules")
        for key in keys:
            if old.get(key) != fresh[key]:
                if key == "input":  # the fingerprint holds the server's path: say what differs instead
                    what = ("another input shard" if old.get(key, {}).get("path") != fresh[key]["path"] else
                            "an input shard that changed since (size or modification time)")
                else:
                    what = f"another {key} ({old.get(key)!r}, now {fresh[key]!r})"
                raise FailedPrecondition(
                    f"output directory {shown!r} holds a job with {what}; resuming would mix them: remove it "
                    "or choose another output_path")
        # Fields a manifest of an older version lacks; the job id follows the request (a moved
        # output directory gets the id of its new place).
        for key in ("rules", "has_scores", "error", "owner", "runs"):
            old.setdefault(key, fresh[key])
        old.setdefault("started_by", "")  # a job of before ownership: nobody's (an admin's)
        old["job_id"] = job.job_id
        old.setdefault("state", SUCCEEDED if old.get("complete") else RUNNING)
        old.setdefault("updated", fresh["updated"])
        return cls(path, old)

    @property
    def parts(self) -> list[dict]:
        return self.data["parts"]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def rows_done(self) -> int:
        return sum(p["rows"] for p in self.parts)

    @property
    def rows_failed(self) -> int:
        return sum(p["rows_failed"] for p in self.parts)

    def start_run(self, owner: str) -> None:
        """A run begins (a new job, a resume, a take-over): who runs it, from which part."""
        self.data.update(state=RUNNING, error=None, owner=owner)
        self.data["runs"].append({"owner": owner, "started": time.time(), "first_part": len(self.parts),
                                  "seconds": 0.0, "rows_per_second": 0.0})

    def finish(self, state: str, error: dict | None = None, run: dict | None = None) -> None:
        self.data.update(state=state, error=error)
        self.commit(complete=state == SUCCEEDED, run=run)

    def commit(self, part: dict | None = None, complete: bool = False, run: dict | None = None) -> None:
        if part is not None:
            self.parts.append(part)
        if run is not None and self.data["runs"]:
            self.data["runs"][-1].update(run)
        self.data["complete"] = complete
        self.data["updated"] = time.time()
        _atomic_write(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


def read_manifest(output: Path) -> dict | None:
    """A job's manifest as written (None when there is none or it is unreadable)."""
    try:
        data = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_part(output: Path, index: int, table: pa.Table, owner: str) -> Path:
    """The part under a temporary name of its writer's own; it is renamed into place when it is
    committed, under the lock (a writer that lost the lock meanwhile never renames it)."""
    tmp = output / f".{part_name(index)}.{owner}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    return tmp


# ---------------------------------------------------------------------------------------------
# Scoring one part


@dataclass(frozen=True)
class PartResult:
    table: pa.Table
    rows_failed: int
    confusion: np.ndarray


def _embedding_matrix(column: pa.ChunkedArray | pa.Array, dimension: int) -> tuple[np.ndarray, list[str]]:
    """[n, dimension] float32 (zeros where unusable) and a reason per row ("" when usable)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(col)
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
    good = lengths == dimension
    if good.all():
        # The usual part: the list values are the matrix already (no copy for float32).
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        out = np.asarray(flat, np.float32).reshape(n, dimension)
    else:
        out = np.zeros((n, dimension), np.float32)
        if good.any():
            values = pc.list_flatten(col.filter(pa.array(good))).to_numpy(zero_copy_only=False)
            out[good] = values.astype(np.float32).reshape(-1, dimension)
    reasons = embedding_problem(out, dimension)
    for i in np.flatnonzero(~good):
        reasons[i] = "no embedding" if lengths[i] < 0 else f"embedding has {lengths[i]} values, the index {dimension}"
    return out, reasons


async def score_part(plan: ShardPlan, pipeline: ProxyLabelPipeline, table: pa.Table, first_row: int) -> PartResult:
    n = table.num_rows
    rules = plan.job.rules
    ids = _plain(table.column(ID)).cast(pa.string()) if plan.has_id else \
        pa.array([str(first_row + i) for i in range(n)], pa.string())
    conv = await asyncio.to_thread(conversations_of, table, plan.text_kind)
    reasons = ["" for _ in range(n)]
    blank = (pc.utf8_length(pc.utf8_trim_whitespace(conv.user)).to_numpy(zero_copy_only=False)
             + pc.utf8_length(pc.utf8_trim_whitespace(conv.assistant)).to_numpy(zero_copy_only=False)) == 0
    for i in np.flatnonzero(blank):
        reasons[i] = "empty text"
    if plan.has_id:
        for i in np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False)):
            reasons[i] = reasons[i] or "no id"
    if plan.has_embedding:
        emb, emb_reasons = await asyncio.to_thread(_embedding_matrix, table.column(EMBEDDING), plan.embedder.dimension)
        reasons = [r or e for r, e in zip(reasons, emb_reasons, strict=True)]
    else:
        emb = np.zeros((n, plan.embedder.dimension), np.float32)
        todo = [i for i in range(n) if not reasons[i]]
        if todo:
            texts = conversations_of(table.take(pa.array(todo)), plan.text_kind).rendered()
            vectors = await pipeline.embed(texts)
            emb[todo] = vectors
            # What the embedder made is checked like a given embedding: never scored when unusable.
            for j, problem in enumerate(embedding_problem(vectors, plan.embedder.dimension)):
                if problem:
                    reasons[todo[j]] = f"the text embedder's {problem}"
    ok = np.array([not r for r in reasons], bool)
    idx = np.flatnonzero(ok)
    labels = np.full(n, -1, np.int64)
    probs = np.zeros((n, NUM_CLASSES), np.float32)
    confidence = np.zeros(n, np.float32)
    expected = np.full(n, np.nan, np.float32)
    if len(idx):
        sub = conversations_of(table.take(pa.array(idx)), plan.text_kind) if plan.run_mlp else None
        scores = await pipeline.score(emb if len(idx) == n else emb[idx], sub, plan.options, plan.run_knn, plan.run_mlp)
        knn = scores.knn
        fused = soft_vote(knn.probabilities if knn else None, scores.mlp, rules)
        lab, conf = final_labels(fused, rules, knn_labels(knn, plan.options) if knn else None)
        labels[idx], probs[idx], confidence[idx] = lab, fused, conf
        if knn is not None:
            expected[idx] = knn.expected_score
            for j in np.flatnonzero(knn.no_neighbours):
                i = idx[j]
                if rules.mode == "knn":
                    labels[i] = -1
                    reasons[i] = f"no labelled neighbour with similarity >= {plan.options.similarity_threshold}"
                else:
                    reasons[i] = NO_NEIGHBOUR
    scored = labels >= 0
    table_out = pa.table({
        "id": ids,
        "label": pa.array(labels.astype(np.int8), mask=~scored),
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), NUM_CLASSES,
                                                           mask=pa.array(~scored)),
        "confidence": pa.array(confidence, mask=~scored),
        "decided_by": pa.array([rules.mode if s else None for s in scored], pa.string()),
        "knn_expected_score": pa.array(expected, mask=np.isnan(expected)),
        "reason": pa.array([r or None for r in reasons], pa.string()),
    }, schema=OUTPUT_SCHEMA)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    if plan.has_scores:
        truth = table.column(SCORES).to_numpy(zero_copy_only=False).astype(np.float64)
        known = scored & np.isfinite(truth) & (truth >= 0) & (truth < NUM_CLASSES)
        confusion = confusion_of(np.rint(truth[known]), labels[known])
    return PartResult(table_out, int((~scored).sum()), confusion)


# ---------------------------------------------------------------------------------------------
# The job


class JobCancelled(ServingError):
    """The job stopped at a part boundary because it was asked to (CancelShardJob)."""

    code = grpc.StatusCode.CANCELLED


def open_output(plan: ShardPlan, lock_expiry_seconds: float = DEFAULT_LOCK_EXPIRY_SECONDS
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
        raise InvalidArgument(f"output_path {shown!r} cannot be written: "
                              f"{(exc.strerror or type(exc).__name__).lower()}") from None
    try:
        manifest = Manifest.open(output, plan)
        if not manifest.complete:
            with lease.guard():
                for stale in output.glob(".part-*.tmp"):
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
    confusion = np.sum([np.asarray(p["confusion"]) for p in parts], axis=0) if parts else \
        np.zeros((NUM_CLASSES, NUM_CLASSES))
    runs = manifest.data.get("runs") or [{}]
    data = manifest.data
    return Summary(str(manifest.path.parent), manifest.rows_done, manifest.rows_failed, rows_resumed,
                   runs[-1].get("seconds", 0.0) if seconds is None else seconds, data["rules_version"],
                   evaluate(confusion) if data.get("has_scores") else None, data.get("job_id", ""))


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


async def score_job(plan: ShardPlan, pipeline: ProxyLabelPipeline, lease: Lease, manifest: Manifest, *,
                    should_stop: Callable[[], bool] = lambda: False,
                    throttle_seconds: float = 0.0) -> AsyncIterator[Progress | Summary]:
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
                    raise JobCancelled(f"shard job {plan.job.job_id} was cancelled after {rows_done} of "
                                       f"{plan.rows_total} rows; its finished parts stay")
                first_row = plan.parts[index][0]
                result = await score_part(plan, pipeline, table, first_row)
                tmp = await _written(output, index, result.table, lease.owner)
                ids = result.table.column("id")
                elapsed = time.perf_counter() - started
                rate = (rows_done + result.table.num_rows - resumed) / elapsed if elapsed > 0 else 0.0
                _commit_part(lease, manifest, tmp, index, {
                    "index": index, "file": part_name(index), "rows": result.table.num_rows,
                    "rows_failed": result.rows_failed, "start": first_row, "stop": plan.parts[index][1],
                    "first_id": ids[0].as_py() if len(ids) else None,
                    "last_id": ids[-1].as_py() if len(ids) else None,
                    "confusion": result.confusion.tolist(),
                }, run={"seconds": elapsed, "rows_per_second": rate})
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


async def run_shard(plan: ShardPlan, pipeline: ProxyLabelPipeline, *, throttle_seconds: float = 0.0,
                    lock_expiry_seconds: float = DEFAULT_LOCK_EXPIRY_SECONDS
                    ) -> AsyncIterator[Progress | Summary]:
    """Run a validated job in this process: a progress event first and after every part, then the
    summary. FAILED_PRECONDITION when a live process runs the same output.

    `throttle_seconds` sleeps after each committed part (for tests that kill a job mid-shard).
    """
    try:
        lease, manifest = open_output(plan, lock_expiry_seconds)
    except LeaseBusy as busy:
        raise FailedPrecondition(f"another job is writing {plan.job.shown_output} "
                                 f"({busy.holder.label})") from None
    try:
        async with lease.kept_alive():
            async for event in score_job(plan, pipeline, lease, manifest, throttle_seconds=throttle_seconds):
                yield event
    finally:
        lease.release()


def read_output(output: Path) -> pa.Table:
    """Every committed part of a job's output, in order (the manifest says which are committed)."""
    manifest = json.loads((Path(output) / MANIFEST).read_text())
    tables = [pq.read_table(Path(output) / p["file"]) for p in manifest["parts"]]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------
# CLI: a job in process, without gRPC (modellers; the crash tests)


def main(argv: list[str] | None = None) -> int:
    from services.fusion.rules import KnnRules
    from services.proxylabel.pipeline import local_pipeline
    from services.runtime.metrics import Metrics

    p = argparse.ArgumentParser(prog="tessera-score-shard-offline", description="Score a shard in process.")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--mode", choices=("knn", "mlp", "ensemble"), default="ensemble")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--knn", default="{}", help='kNN overrides as JSON, e.g. {"k": 20, "weighting": "power"}')
    p.add_argument("--rules-version", default="cli")
    p.add_argument("--batch-rows", type=int, default=0)
    p.add_argument("--lock-expiry-seconds", type=float, default=DEFAULT_LOCK_EXPIRY_SECONDS,
                   help="a lock whose heartbeat is older than this is stale: its job may be taken over")
    p.add_argument("--throttle-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    async def run() -> int:
        try:
            async with local_pipeline(args.repo, Metrics("proxylabel-cli")) as pipeline:
                rules = ProxyLabelRules(mode=args.mode, alpha=args.alpha, knn=KnnRules.model_validate_json(args.knn))
                job = ShardJob(args.input.resolve(), args.output.resolve(), rules, args.rules_version,
                               args.batch_rows)
                plan = plan_shard(job, pipeline)
                async for event in run_shard(plan, pipeline, throttle_seconds=args.throttle_seconds,
                                                 lock_expiry_seconds=args.lock_expiry_seconds):
                    print(json.dumps({type(event).__name__.lower(): _as_dict(event)}), flush=True)
        except ServingError as exc:
            print(f"{exc.code.name}: {exc.message}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(run())


def _as_dict(event: Progress | Summary) -> dict:
    from dataclasses import asdict

    return asdict(event)


if __name__ == "__main__":
    sys.exit(main())
