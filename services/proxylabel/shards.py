"""Shard jobs: score a parquet shard into a directory of part files, resumable after a crash.

    <output>/part-00000.parquet …   one per part (a row group, or `batch_rows` rows), each written
                                    under a temporary name then renamed
    <output>/manifest.json          input fingerprint, rules version, parts committed (rows, id range,
                                    confusion counts), rewritten atomically after each part
    <output>/.lock                  flock held while a job writes (a second job is refused)

A part is committed once its file is renamed and the manifest names it. A job killed at any point
and run again resumes after the last committed part (an uncommitted part file is overwritten), so
the output holds every input id exactly once. Parts are fixed row ranges of the input, so a rerun
cuts them the same way. The shard is read by row group, never whole.

The whole request is validated before any work (docs/operations.md#errors); a problem with one row (NaN
embedding, empty text, …) is written on that row with a reason, never dropped.

    tessera-score-shard-offline --repo model_repository in.parquet out_dir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.fusion.proxylabel import final_labels, soft_vote
from services.fusion.rules import ProxyLabelRules
from services.proxylabel.features import Conversations, from_messages, from_pairs, from_texts
from services.proxylabel.knn import NUM_CLASSES, EmbedderInfo, KnnOptions, knn_labels
from services.proxylabel.pipeline import NO_NEIGHBOUR, ProxyLabelPipeline, embedding_problem
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
EMBEDDER_METADATA_KEY = b"tessera.embedder"
ID, EMBEDDING, SCORES = "id", "embedding", "gpt_scores"
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


def text_kind(schema: pa.Schema) -> tuple[str, list[str]]:
    """Which conversation columns a shard has; INVALID_ARGUMENT when it has none."""
    names = set(schema.names)
    if "messages" in names:
        t = schema.field("messages").type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type) or \
                {"role", "content"} - {f.name for f in t.value_type}:
            raise InvalidArgument(f"column 'messages' has type {t}; expected list<struct<role, content>>")
        return "messages", ["messages"]
    if {"prompt", "response"} <= names:
        return "pairs", ["prompt", "response"]
    if "text" in names:
        return "text", ["text"]
    raise InvalidArgument(f"the shard has no conversation column: expected 'messages' (list of {{role, content}}), "
                          f"'prompt' and 'response', or 'text'; it has {sorted(names)}")


def conversations_of(table: pa.Table | pa.RecordBatch, kind: str) -> Conversations:
    if kind == "messages":
        return from_messages(table.column("messages"))
    if kind == "pairs":
        return from_pairs(table.column("prompt"), table.column("response"))
    return from_texts([t or "" for t in table.column("text").to_pylist()])


def _embedding_dimensions(pf: pq.ParquetFile) -> set[int]:
    """What the shard says its embedding width is: the type (fixed-size list), the file's metadata,
    and the first non-null row (read in a small batch, not a whole row group)."""
    found = set()
    t = pf.schema_arrow.field(EMBEDDING).type
    if pa.types.is_fixed_size_list(t):
        found.add(t.list_size)
    meta = _embedder_metadata(pf)
    if meta and meta.get("dimension"):
        found.add(int(meta["dimension"]))
    for batch in pf.iter_batches(batch_size=64, columns=[EMBEDDING]):
        lengths = pc.list_value_length(batch.column(0)).drop_null()
        if len(lengths):
            found.add(int(lengths[0].as_py()))
            break
    return found


def _embedder_metadata(pf: pq.ParquetFile) -> dict | None:
    raw = (pf.schema_arrow.metadata or {}).get(EMBEDDER_METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def open_shard(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise NotFound(f"shard {str(path)!r} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"shard {str(path)!r} is not a file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidArgument(f"shard {str(path)!r} is not a parquet file: {exc}") from None


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
    pf = open_shard(job.input_path)
    schema = pf.schema_arrow
    kind, text_columns = text_kind(schema)
    names = set(schema.names)
    columns = list(text_columns)
    has_id = ID in names
    has_embedding = EMBEDDING in names
    has_scores = SCORES in names
    if has_id:
        columns.insert(0, ID)
    if has_scores:
        t = schema.field(SCORES).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise InvalidArgument(f"column '{SCORES}' has type {t}; expected numbers 0-5")
        columns.append(SCORES)
    if has_embedding:
        t = schema.field(EMBEDDING).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or \
                not (pa.types.is_floating(t.value_type)):
            raise InvalidArgument(f"column '{EMBEDDING}' has type {t}; expected a list of floats")
        meta = _embedder_metadata(pf)
        if meta and meta.get("name") and meta["name"] != expected.name:
            raise FailedPrecondition(f"the shard's embeddings were made by {meta['name']}, the index by "
                                     f"{expected.name}: embeddings of different embedders cannot be compared")
        wrong = sorted(_embedding_dimensions(pf) - {expected.dimension})
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
    for batch in pf.iter_batches(batch_size=max(1, min(widest, 65_536)), row_groups=range(rg, pf.num_row_groups),
                                 columns=plan.columns, use_threads=True):
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


@dataclass
class Manifest:
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def open(cls, output: Path, plan: ShardPlan) -> Manifest:
        """The job's manifest: a new one, or the one of an interrupted run of the same job."""
        path = output / MANIFEST
        fresh = {"format": MANIFEST_FORMAT, "input": plan.fingerprint, "rules_version": plan.job.rules_version,
                 "mode": plan.job.rules.mode, "batch_rows": plan.job.batch_rows, "rows_total": plan.rows_total,
                 "parts_total": len(plan.parts), "parts": [], "complete": False}
        if not path.exists():
            others = [p.name for p in output.iterdir() if not p.name.startswith(".") and not p.name.startswith("part-")]
            if others:
                raise FailedPrecondition(f"output directory {output} is not empty and holds no shard job "
                                         f"({', '.join(sorted(others)[:5])})")
            return cls(path, fresh)
        try:
            old = json.loads(path.read_text())
        except ValueError as exc:
            raise FailedPrecondition(f"{path} is unreadable ({exc}); remove the output directory to start over") \
                from None
        for key in ("format", "input", "rules_version", "mode", "batch_rows", "rows_total"):
            if old.get(key) != fresh[key]:
                raise FailedPrecondition(
                    f"output directory {output} holds a job with another {key} ({old.get(key)!r}, now "
                    f"{fresh[key]!r}); resuming would mix them: remove it or choose another output_path")
        return cls(path, old)

    @property
    def parts(self) -> list[dict]:
        return self.data["parts"]

    def commit(self, part: dict | None = None, complete: bool = False) -> None:
        if part is not None:
            self.parts.append(part)
        self.data["complete"] = complete
        _atomic_write(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


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


def write_part(output: Path, index: int, table: pa.Table) -> None:
    tmp = output / f".{part_name(index)}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, output / part_name(index))


@contextlib.contextmanager
def job_lock(output: Path) -> Iterator[None]:
    """One job per output directory; the kernel drops the lock when a killed job's process dies."""
    fd = os.open(output / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(f"another job is writing {output}") from None
        yield
    finally:
        os.close(fd)


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
    ids = table.column(ID).cast(pa.string()) if plan.has_id else \
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
            emb[todo] = await pipeline.embed(texts)
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


async def run_shard(plan: ShardPlan, pipeline: ProxyLabelPipeline, *,
                    throttle_seconds: float = 0.0) -> AsyncIterator[Progress | Summary]:
    """Run a validated job: a progress event first and after every part, then the summary.

    `throttle_seconds` sleeps after each committed part (for tests that kill a job mid-shard).
    """
    output = plan.job.output_path
    if output.exists() and not output.is_dir():
        raise InvalidArgument(f"output_path {str(output)!r} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with job_lock(output):
        manifest = Manifest.open(output, plan)
        for stale in output.glob(".part-*.tmp"):
            stale.unlink(missing_ok=True)
        manifest.commit()  # the job is visible (and its input pinned) before the first part
        done = len(manifest.parts)
        resumed = sum(p["rows"] for p in manifest.parts)
        failed = sum(p["rows_failed"] for p in manifest.parts)
        rows_done = resumed
        yield Progress(rows_done, plan.rows_total, 0.0, failed)
        metrics = pipeline.metrics
        async for index, table in prefetched(read_parts(plan, done)):
            first_row = plan.parts[index][0]
            result = await score_part(plan, pipeline, table, first_row)
            await asyncio.to_thread(write_part, output, index, result.table)
            ids = result.table.column("id")
            manifest.commit({
                "index": index, "file": part_name(index), "rows": result.table.num_rows,
                "rows_failed": result.rows_failed, "start": first_row, "stop": plan.parts[index][1],
                "first_id": ids[0].as_py() if len(ids) else None, "last_id": ids[-1].as_py() if len(ids) else None,
                "confusion": result.confusion.tolist(),
            })
            rows_done += result.table.num_rows
            failed += result.rows_failed
            elapsed = time.perf_counter() - started
            rate = (rows_done - resumed) / elapsed if elapsed > 0 else 0.0
            metrics.rows_scored.inc(result.table.num_rows)
            metrics.rows_per_second.set(rate)
            yield Progress(rows_done, plan.rows_total, rate, failed)
            if throttle_seconds:
                await asyncio.sleep(throttle_seconds)
        manifest.commit(complete=True)
    confusion = np.sum([np.asarray(p["confusion"]) for p in manifest.parts], axis=0) if manifest.parts else \
        np.zeros((NUM_CLASSES, NUM_CLASSES))
    yield Summary(str(output), rows_done, failed, resumed, time.perf_counter() - started, plan.job.rules_version,
                  evaluate(confusion) if plan.has_scores else None)


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
    from services.runtime.errors import ServingError
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
    p.add_argument("--throttle-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    async def run() -> int:
        try:
            async with local_pipeline(args.repo, Metrics("proxylabel-cli")) as pipeline:
                rules = ProxyLabelRules(mode=args.mode, alpha=args.alpha, knn=KnnRules.model_validate_json(args.knn))
                job = ShardJob(args.input.resolve(), args.output.resolve(), rules, args.rules_version,
                               args.batch_rows)
                plan = plan_shard(job, pipeline)
                async for event in run_shard(plan, pipeline, throttle_seconds=args.throttle_seconds):
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
