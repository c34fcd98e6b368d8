"""What the proxylabel tests share: a small model repository over synthetic embeddings, a suite
whose proxylabel service notices dead shard jobs quickly, and bounded polls on an outcome."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from launcher.suite import Suite
from services.proxylabel.features import compute_features
from services.proxylabel.knn import KnnOptions
from tests.helpers.suites import start_suite
from tools.modeller.proxylabel.build_index import build_index, labelled_rows
from tools.modeller.proxylabel.generate import write_shard
from tools.modeller.proxylabel.train_mlp import train_mlp, write_mlp

DIM = 16
T = TypeVar("T")


def build_repository(root: Path, dim: int = DIM) -> Path:
    """A small kNN index and MLP over synthetic embeddings (fast: no text embedder)."""
    labelled = write_shard(
        root / "labelled.parquet", 1200, dimension=dim, labelled_fraction=1.0, seed=11, row_group_rows=400
    )
    repo = root / "repo"
    build_index([labelled], repo, KnnOptions(k=20), demo=True)
    rows = labelled_rows([labelled])
    model, meta = train_mlp(
        rows.embeddings,
        compute_features(rows.conversations),
        rows.labels,
        rows.embedder,
        hidden=(32,),
        max_iter=40,
        demo=True,
    )
    write_mlp(repo, model, meta)
    return repo


def start_job_suite(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, expiry: float, **env: str
) -> Suite:
    """A suite serving a new build_repository() with `data_root` as its shard roots, whose
    proxylabel service takes a lock without a heartbeat for `expiry` seconds as dead and polls jobs
    every 0.1 s."""
    repo = build_repository(tmp_path_factory.mktemp("models"))
    return start_suite(
        tmp_path_factory.mktemp("suite"),
        repo,
        data_roots=(data_root,),
        extra_env={
            "TESSERA_PROXYLABEL__JOB_LOCK_EXPIRY_SECONDS": str(expiry),
            "TESSERA_PROXYLABEL__JOB_POLL_SECONDS": "0.1",
            **env,
        },
    )


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 120.0, every: float = 0.05) -> T:
    """Poll until probe() returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
