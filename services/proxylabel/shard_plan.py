"""A shard job's request and its plan: the job as asked (paths, rules, how to cut it), validated
whole before any work or output, and the reading of its input part by part.

Parts are fixed row ranges of the input (its row groups, or runs of `batch_rows` rows across
them), so a rerun cuts them the same way and resumes after the last committed one. The shard is
read by row group from the first part wanted, never whole.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.fusion.rules import ProxyLabelRules
from services.proxylabel.access import Caller
from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.knn import KnnOptions
from services.proxylabel.pipeline import ProxyLabelPipeline
from services.proxylabel.shards import (
    embedder_metadata,
    embedding_dimensions,
    fingerprint,
    open_shard,
    scrubbed,
    shard_columns,
)
from services.runtime.errors import FailedPrecondition, InvalidArgument

JOB_ID_LENGTH = 32  # hex digits


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
        key = {
            "input": str(self.input_path),
            "output": str(self.output_path),
            "batch_rows": self.batch_rows,
            "rules_version": self.rules_version,
            "rules": self.rules.model_dump(mode="json"),
        }
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
    # Every column the job reads is checked by type here, before anything is written.
    columns = shard_columns(pf.schema_arrow)
    if columns.has_embedding:
        meta = embedder_metadata(pf)
        if meta and meta.get("name") and meta["name"] != expected.name:
            raise FailedPrecondition(
                f"the shard's embeddings were made by {meta['name']}, the index by "
                f"{expected.name}: embeddings of different embedders cannot be compared"
            )
        try:
            dimensions = embedding_dimensions(pf)
        except (pa.ArrowException, OSError) as exc:
            raise InvalidArgument(
                f"shard {job.shown_input!r}: its embeddings cannot be read: "
                f"{scrubbed(exc, job.input_path, job.shown_input)}"
            ) from None
        wrong = sorted(dimensions - {expected.dimension})
        if wrong:
            raise InvalidArgument(
                f"the shard's embeddings have dimension {wrong[0]}, the index {expected.dimension}"
            )
    else:
        problem = pipeline.embedder_problem(expected)
        if problem:
            raise FailedPrecondition(problem.replace("the row has", "the shard has"))
    rg_rows = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(rg_rows)]).astype(int).tolist()
    return ShardPlan(
        job,
        columns.text_kind,
        columns.names,
        columns.has_id,
        columns.has_embedding,
        columns.has_scores,
        expected,
        cut_parts(rg_rows, job.batch_rows),
        starts,
        fingerprint(job.input_path),
        run_knn,
        run_mlp,
        pipeline.knn_options(job.rules.knn),
    )


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
    batches = pf.iter_batches(
        batch_size=max(1, min(widest, 65_536)),
        row_groups=range(rg, pf.num_row_groups),
        columns=plan.columns,
        use_threads=True,
    )
    for batch in _readable(batches, plan, lambda: position):  # noqa: B023 - the row reached so far, read late
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
            table = pa.Table.from_batches(buffer).combine_chunks()  # parts are never empty: rows are buffered
            yield i, table.slice(0, b - a)
            rest = table.slice(b - a)
            buffer, buffered, start = rest.to_batches(), len(rest), b
            i += 1


def _readable(
    batches: Iterator[pa.RecordBatch], plan: ShardPlan, where: Callable[[], int]
) -> Iterator[pa.RecordBatch]:
    """The batches; data the reader cannot decode (a corrupt page) is INVALID_ARGUMENT naming where."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            job = plan.job
            raise InvalidArgument(
                f"shard {job.shown_input!r} cannot be read from row {where()}: "
                f"{scrubbed(exc, job.input_path, job.shown_input)}"
            ) from None
        yield batch
