"""The part files of a shard job's output: their schema, names, writing and reading back.

    <output>/part-00000.parquet …   one per part (a row group, or `batch_rows` rows), each written
                                    under a temporary name of its writer's own, then renamed into
                                    place when the part is committed (services/proxylabel/shard_run.py)

A part file is a parquet table of OUTPUT_SCHEMA: one row per input row, in input order, with the
proxy label and probabilities, or null ones and the reason the row was not scored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from services.proxylabel.knn import NUM_CLASSES
from services.proxylabel.manifest import MANIFEST

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int8()),
        ("probabilities", pa.list_(pa.float32(), NUM_CLASSES)),
        ("confidence", pa.float32()),
        ("decided_by", pa.string()),
        ("knn_expected_score", pa.float32()),
        ("reason", pa.string()),
    ]
)
TEMPORARY_PARTS = ".part-*.tmp"  # what write_part leaves behind when its writer dies


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


def read_output(output: Path) -> pa.Table:
    """Every committed part of a job's output, in order (the manifest says which are committed)."""
    manifest = json.loads((Path(output) / MANIFEST).read_text())
    tables = [pq.read_table(Path(output) / p["file"]) for p in manifest["parts"]]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
