"""`build-index`: the kNN model from labelled shards (the rows that carry `gpt_scores`).

Writes `<repo>/proxylabel_knn/` (config.pbtxt, 1/index.faiss, 1/labels.npy, 1/index.json with the
embedder, class priors and default options). Shards are read by row group; only labelled rows
are kept.

    tessera-build-index --repo model_repository labelled-*.parquet [--k 50 --tau 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.features import Conversations
from services.proxylabel.knn import NUM_CLASSES, KnnIndex, KnnOptions, write_model
from services.proxylabel.shards import (
    EMBEDDER_METADATA_KEY,
    EMBEDDING,
    SCORES,
    conversations_of,
    open_shard,
    text_kind,
)


@dataclass(frozen=True)
class LabelledRows:
    embeddings: np.ndarray
    labels: np.ndarray
    conversations: Conversations
    embedder: EmbedderInfo


def labelled_rows(shards: Sequence[Path], embedder_name: str | None = None) -> LabelledRows:
    """Embeddings, scores and conversations of every labelled, usable row of the shards."""
    embeddings, labels, tables = [], [], []
    names: set[str] = set()
    kind = None
    for path in shards:
        pf = open_shard(Path(path))
        k, columns = text_kind(pf.schema_arrow)
        if kind is not None and k != kind:
            raise ValueError(f"{path}: conversation columns {columns} differ from the other shards'")
        kind = k
        meta = (pf.schema_arrow.metadata or {}).get(EMBEDDER_METADATA_KEY)
        if meta:
            names.add(json.loads(meta)["name"])
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=[*columns, EMBEDDING, SCORES])
            scores = t.column(SCORES).to_numpy(zero_copy_only=False).astype(np.float64)
            keep = np.isfinite(scores) & (scores >= 0) & (scores < NUM_CLASSES)
            keep &= (
                pc.fill_null(pc.list_value_length(t.column(EMBEDDING)), 0).to_numpy(zero_copy_only=False) > 0
            )
            if not keep.any():
                continue
            t = t.filter(pa.array(keep))
            x = np.stack([np.asarray(v, np.float32) for v in t.column(EMBEDDING).to_pylist()])
            good = np.isfinite(x).all(axis=1) & (np.linalg.norm(x, axis=1) > 0)
            embeddings.append(x[good])
            labels.append(np.rint(scores[keep][good]).astype(np.int64))
            tables.append(t.drop_columns([EMBEDDING]).filter(pa.array(good)))
    if not labels:
        raise ValueError("no labelled rows (gpt_scores) with an embedding in the shards")
    name = embedder_name or (names.pop() if len(names) == 1 else None)
    if name is None:
        raise ValueError(
            f"say which embedder made the embeddings (--embedder); the shards say {sorted(names) or 'nothing'}"
        )
    x = np.concatenate(embeddings)
    table = pa.concat_tables(tables).combine_chunks()
    return LabelledRows(
        x,
        np.concatenate(labels),
        conversations_of(table, kind or "messages"),
        EmbedderInfo(name=name, dimension=x.shape[1]),
    )


def build_index(
    shards: Sequence[Path],
    repo: Path,
    options: KnnOptions | None = None,
    embedder_name: str | None = None,
    demo: bool = False,
) -> Path:
    rows = labelled_rows(shards, embedder_name)
    index = KnnIndex.build(rows.embeddings, rows.labels, rows.embedder, options, demo=demo)
    return write_model(repo, index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-build-index", description=__doc__.splitlines()[0])
    p.add_argument("shards", nargs="+", type=Path)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--embedder", help="embedder name (default: the shards' tessera.embedder metadata)")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--weighting", choices=("softmax", "power", "uniform"), default="softmax")
    p.add_argument("--power-alpha", type=float, default=1.0)
    p.add_argument("--aggregation", choices=("vote", "regression"), default="vote")
    p.add_argument("--similarity-threshold", type=float)
    p.add_argument("--prior-calibration", action="store_true")
    p.add_argument("--demo", action="store_true")
    args = p.parse_args(argv)
    options = KnnOptions(
        k=args.k,
        tau=args.tau,
        weighting=args.weighting,
        power_alpha=args.power_alpha,
        aggregation=args.aggregation,
        similarity_threshold=args.similarity_threshold,
        prior_calibration=args.prior_calibration,
    )
    path = build_index(args.shards, args.repo, options, args.embedder, args.demo)
    meta = json.loads((path / "1" / "index.json").read_text())
    print(
        f"{path}: {meta['rows']} labelled rows, {meta['embedder']['name']} ({meta['embedder']['dimension']}-d)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
