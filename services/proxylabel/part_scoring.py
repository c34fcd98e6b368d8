"""Scoring one part of a shard: the rows' embeddings (given, or made by the text embedder), the
models' scores fused by the rules, and a reason on every row that could not be scored (NaN, zero,
underflowing or overflowing embedding, empty text, no id, no neighbour, …): written on that row,
never dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.fusion.proxylabel import final_labels, soft_vote
from services.proxylabel.evaluation import confusion_of
from services.proxylabel.knn import NUM_CLASSES, knn_labels
from services.proxylabel.parts import OUTPUT_SCHEMA
from services.proxylabel.pipeline import NO_NEIGHBOUR, ProxyLabelPipeline, embedding_problem
from services.proxylabel.shard_plan import ShardPlan
from services.proxylabel.shards import EMBEDDING, ID, SCORES, conversations_of, plain_column


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
        reasons[i] = (
            "no embedding" if lengths[i] < 0 else f"embedding has {lengths[i]} values, the index {dimension}"
        )
    return out, reasons


async def score_part(
    plan: ShardPlan, pipeline: ProxyLabelPipeline, table: pa.Table, first_row: int
) -> PartResult:
    n = table.num_rows
    rules = plan.job.rules
    ids = (
        plain_column(table.column(ID)).cast(pa.string())
        if plan.has_id
        else pa.array([str(first_row + i) for i in range(n)], pa.string())
    )
    conv = await asyncio.to_thread(conversations_of, table, plan.text_kind)
    reasons = ["" for _ in range(n)]
    blank = (
        pc.utf8_length(pc.utf8_trim_whitespace(conv.user)).to_numpy(zero_copy_only=False)
        + pc.utf8_length(pc.utf8_trim_whitespace(conv.assistant)).to_numpy(zero_copy_only=False)
    ) == 0
    for i in np.flatnonzero(blank):
        reasons[i] = "empty text"
    if plan.has_id:
        for i in np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False)):
            reasons[i] = reasons[i] or "no id"
    if plan.has_embedding:
        emb, emb_reasons = await asyncio.to_thread(
            _embedding_matrix, table.column(EMBEDDING), plan.embedder.dimension
        )
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
        scores = await pipeline.score(
            emb if len(idx) == n else emb[idx], sub, plan.options, plan.run_knn, plan.run_mlp
        )
        knn = scores.knn
        fused = soft_vote(knn.probabilities if knn else None, scores.mlp, rules)
        lab, conf = final_labels(fused, rules, knn_labels(knn, plan.options) if knn else None)
        labels[idx], probs[idx], confidence[idx] = lab, fused, conf
        if knn is not None:
            expected[idx] = knn.expected_score
            for k in np.flatnonzero(knn.no_neighbours):
                i = idx[k]
                if rules.mode == "knn":
                    labels[i] = -1
                    reasons[i] = (
                        f"no labelled neighbour with similarity >= {plan.options.similarity_threshold}"
                    )
                else:
                    reasons[i] = NO_NEIGHBOUR
    scored = labels >= 0
    table_out = pa.table(
        {
            "id": ids,
            "label": pa.array(labels.astype(np.int8), mask=~scored),
            "probabilities": pa.FixedSizeListArray.from_arrays(
                pa.array(probs.reshape(-1)), NUM_CLASSES, mask=pa.array(~scored)
            ),
            "confidence": pa.array(confidence, mask=~scored),
            "decided_by": pa.array([rules.mode if s else None for s in scored], pa.string()),
            "knn_expected_score": pa.array(expected, mask=np.isnan(expected)),
            "reason": pa.array([r or None for r in reasons], pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    if plan.has_scores:
        truth = table.column(SCORES).to_numpy(zero_copy_only=False).astype(np.float64)
        known = scored & np.isfinite(truth) & (truth >= 0) & (truth < NUM_CLASSES)
        confusion = confusion_of(np.rint(truth[known]), labels[known])
    return PartResult(table_out, int((~scored).sum()), confusion)
