"""The proxylabel service through the real gateway, on a repository holding the demo models
(MiniLM text embedder, kNN index, Fusion MLP): ScoreTexts with and without embeddings, per-row
statuses, ScoreShard end to end, and the mode switched by editing the rules file."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from launcher.suite import ROOT, Suite
from services.proxylabel.embedder import embed_offline
from services.proxylabel.knn import INDEX_FILE, KnnIndex
from services.proxylabel.parts import read_output
from tessera.proxylabel.v1 import proxylabel_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc
from tessera_client import TesseraClient
from tests.helpers.suites import CACHE, start_suite
from tests.proxylabel.helpers import wait_for
from tools.builders.minilm import build_text_embedder
from tools.builders.proxylabel_demo import build_demo_models
from tools.modeller.proxylabel.generate import write_shard

# Fewer rows than `make models` builds, so a first run (MiniLM on CPU) stays short; cached after.
DEMO_ROWS = 300
OK = grpc.StatusCode.OK.value[0]

CONVERSATION = (
    "<|user|>\nCan you explain compound interest to me?\n<|assistant|>\n"
    "Compound interest rests on a precise principle: each period's interest is added to the principal.\n\n"
    "1. Define the goal and the constraints.\n2. Work through a small, concrete example."
)


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("proxylabel-repo")
    build_text_embedder(repo, CACHE)
    build_demo_models(repo, CACHE, rows=DEMO_ROWS)
    return repo


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxylabel-data")


@pytest.fixture(scope="module")
def rules_file(data_root: Path) -> Path:
    path = data_root / "fusion_rules.yaml"
    shutil.copy(ROOT / "config" / "fusion_rules.yaml", path)
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory, demo_repo: Path, data_root: Path, rules_file: Path) -> Iterator[Suite]:
    s = start_suite(
        tmp_path_factory.mktemp("suite"),
        demo_repo,
        rules=rules_file,
        data_roots=(data_root,),
        extra_env={"TESSERA_PROXYLABEL__REPOSITORY_POLL_SECONDS": "0.3"},
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(suite: Suite) -> Iterator[TesseraClient]:
    with TesseraClient(suite.gateway.target) as c:
        yield c


def _code(value: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == value)


def test_text_rows_are_embedded_and_scored(client: TesseraClient, demo_repo: Path) -> None:
    reply = client.score_texts([{"id": "a", "text": CONVERSATION}])
    (row,) = reply.rows
    assert row.status.code == OK, row.status.message
    assert 0 <= row.label <= 5 and row.decided_by == "ensemble"
    assert sum(row.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert row.confidence == pytest.approx(max(row.probabilities))
    models = {m.name: m for m in reply.models}
    assert {"proxylabel_knn", "proxylabel_mlp", "text_embedder"} <= set(models)
    assert models["proxylabel_knn"].demo and models["proxylabel_mlp"].demo
    assert models["proxylabel_knn"].backend == "faiss" and reply.rules_version
    # The same row with its embedding precomputed gets the same answer.
    embedding = embed_offline(demo_repo / "text_embedder", [CONVERSATION])[0]
    again = client.score_texts(
        [
            {
                "id": "b",
                "text": CONVERSATION,
                "embedding": embedding.tolist(),
                "embedder": "sentence-transformers/all-MiniLM-L6-v2",
            }
        ]
    ).rows[0]
    assert again.status.code == OK and again.label == row.label
    np.testing.assert_allclose(again.probabilities, row.probabilities, atol=1e-4)


def test_row_problems_are_reported_per_row(client: TesseraClient) -> None:
    rows = [
        {"id": "ok", "text": "How do I start a sourdough starter?", "response": "Mix flour and water daily."},
        {
            "id": "other-embedder",
            "text": "hi",
            "embedding": [0.1] * 384,
            "embedder": "BAAI/bge-large-en-v1.5",
        },
        {"id": "dimension", "text": "hi", "embedding": [0.1] * 10},
        {"id": "nan", "text": "hi", "embedding": [float("nan")] * 384},
        {"id": "empty", "text": "  "},
    ]
    got = {r.id: _code(r.status.code) for r in client.score_texts(rows).rows}
    assert got == {
        "ok": grpc.StatusCode.OK,
        "other-embedder": grpc.StatusCode.FAILED_PRECONDITION,
        "dimension": grpc.StatusCode.INVALID_ARGUMENT,
        "nan": grpc.StatusCode.INVALID_ARGUMENT,
        "empty": grpc.StatusCode.INVALID_ARGUMENT,
    }


def test_score_shard_end_to_end(client: TesseraClient, data_root: Path) -> None:
    # No embedding column: the service embeds the conversations with the text embedder.
    shard = write_shard(data_root / "text-only.parquet", 48, labelled_fraction=0.5, seed=3, row_group_rows=16)
    pq.write_table(pq.read_table(shard).drop_columns(["embedding"]), shard, row_group_size=16)
    events = list(client.score_shard(shard, data_root / "scored", timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 4 + ["summary"]
    assert [e.progress.rows_done for e in events[:-1]] == [0, 16, 32, 48]
    assert all(e.progress.rows_total == 48 for e in events[:-1])
    summary = events[-1].summary
    assert summary.rows_done == 48 and summary.rows_failed == 0 and summary.rules_version
    assert summary.evaluation.rows_labelled > 0 and 0 <= summary.evaluation.accuracy <= 1
    assert any(m.name == "proxylabel_knn" and m.demo for m in summary.models)
    out = read_output(data_root / "scored")
    assert out.column("id").to_pylist() == pq.read_table(shard).column("id").to_pylist()
    # Rerun: everything is already committed.
    rerun = list(client.score_shard(shard, data_root / "scored", timeout=60))
    assert rerun[-1].summary.rows_resumed == 48


def test_mode_follows_the_rules_file(client: TesseraClient, rules_file: Path) -> None:
    original = rules_file.read_text()
    try:
        rules_file.write_text(original.replace("mode: ensemble", "mode: knn"))
        row = wait_for(
            lambda: (
                (r := client.score_texts([{"id": "a", "text": CONVERSATION}]).rows[0]).decided_by == "knn"
                and r
            ),
            "the rules edit to be picked up",
            timeout=15,
            every=0.2,
        )
        assert row.status.code == OK and sum(row.probabilities) == pytest.approx(1.0, abs=1e-5)
    finally:
        rules_file.write_text(original)


def _knn_version_and_votes(stub: pb_grpc.ProxyLabelServiceStub) -> tuple[str, list[float]]:
    reply = stub.ScoreTexts(
        pb.ScoreTextsRequest(rows=[pb.TextRow(id="a", text=CONVERSATION)], run_knn=True), timeout=30
    )
    (row,) = reply.rows
    assert row.status.code == OK, row.status.message
    version = next(m.version for m in reply.models if m.name == "proxylabel_knn")
    return version, list(row.knn_probabilities)


def test_new_index_version_is_served_without_restart(suite: Suite, demo_repo: Path) -> None:
    """A v2 index written beside v1 is picked up by the running service; a broken v3 is refused
    and v2 keeps serving. (Last in the module: it changes the repository.)"""
    model_dir = demo_repo / "proxylabel_knn"
    v1 = KnnIndex.load(model_dir / "1", 1)
    with grpc.insecure_channel(suite.processes["proxylabel"].target) as channel:
        stub = pb_grpc.ProxyLabelServiceStub(channel)
        assert _knn_version_and_votes(stub)[0] == "1"
        # Same vectors, every neighbour now says 5: the vote moves all its mass there.
        KnnIndex(v1.index, np.full(v1.size, 5), v1.meta).save(model_dir / "2")
        got = wait_for(
            lambda: (v := _knn_version_and_votes(stub))[0] == "2" and v,
            "version 2 to be picked up",
            timeout=20,
            every=0.2,
        )
        assert got[1][5] == pytest.approx(1.0) and sum(got[1]) == pytest.approx(1.0)
        log = suite.processes["proxylabel"].log_file
        refused = "the new files are not loaded"  # what the service logs when it keeps the old index
        before = log.read_text(errors="replace").count(refused)
        (model_dir / "3").mkdir()
        shutil.copy(model_dir / "2" / "index.json", model_dir / "3")
        (model_dir / "3" / INDEX_FILE).write_bytes(b"not a faiss index")
        wait_for(
            lambda: log.read_text(errors="replace").count(refused) > before,
            "v3 to be tried and refused",
            timeout=20,
        )
        assert _knn_version_and_votes(stub) == got
        assert suite.processes["proxylabel"].popen.poll() is None
