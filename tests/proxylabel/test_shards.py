"""Shard jobs on real parquet files, a real faiss index and a real ONNX MLP: evaluation against
scikit-learn, crash (SIGKILL) and resume, bad input with the documented status, per-row reasons."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, recall_score

from launcher.suite import ROOT
from services.fusion.rules import KnnRules, ProxyLabelRules
from services.proxylabel.evaluation import confusion_of, evaluate
from services.proxylabel.manifest import MANIFEST
from services.proxylabel.parts import read_output
from services.proxylabel.pipeline import local_pipeline
from services.proxylabel.shard_plan import ShardJob, plan_shard
from services.proxylabel.shard_run import Progress, Summary, run_shard
from services.runtime.errors import ServingError
from tests.proxylabel.helpers import DIM, build_repository
from tools.modeller.proxylabel.generate import SYNTHETIC_EMBEDDER, schema, write_shard

# `tessera-score-shard-offline` in a child process, whatever script the environment installed.
OFFLINE_CLI = (
    "import sys; from services.proxylabel.__main__ import score_shard_offline_main; "
    "sys.exit(score_shard_offline_main())"
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("shard-models"))


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shard(
        tmp_path_factory.mktemp("shards") / "in.parquet",
        1000,
        dimension=DIM,
        labelled_fraction=0.4,
        seed=12,
        row_group_rows=250,
    )


async def _job(
    repo: Path,
    source: Path,
    output: Path,
    rules: ProxyLabelRules,
    batch_rows: int = 0,
    version: str = "v-test",
) -> list[Progress | Summary]:
    async with local_pipeline(repo) as pipeline:
        plan = plan_shard(ShardJob(source, output, rules, version, batch_rows), pipeline)
        return [event async for event in run_shard(plan, pipeline)]


def run_job(
    repo: Path, source: Path, output: Path, rules: ProxyLabelRules | None = None, **kw: object
) -> list[Progress | Summary]:
    return asyncio.run(_job(repo, source, output, rules or ProxyLabelRules(), **kw))  # type: ignore[arg-type]


def status_of(
    repo: Path, source: Path, output: Path, rules: ProxyLabelRules | None = None, **kw: object
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ServingError) as err:
        run_job(repo, source, output, rules, **kw)
    return err.value.code, err.value.message


# ---------------------------------------------------------------------------------------------


def test_evaluation_equals_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        truth = rng.choice(6, size=200, p=[0.1, 0.2, 0.3, 0.3, 0.1, 0.0] if trial % 2 else None)
        pred = np.where(rng.random(200) < 0.5, truth, rng.choice(6, size=200))
        e = evaluate(confusion_of(truth, pred))
        assert e.accuracy == pytest.approx(accuracy_score(truth, pred))
        assert e.macro_f1 == pytest.approx(f1_score(truth, pred, average="macro"))
        assert e.mean_absolute_error == pytest.approx(mean_absolute_error(truth, pred))
        present = np.unique(truth)
        recall = recall_score(truth, pred, labels=present, average=None)
        np.testing.assert_allclose(np.asarray(e.per_class_accuracy)[present], recall)
        assert all(np.isnan(e.per_class_accuracy[c]) for c in range(6) if c not in present)
    assert evaluate(np.zeros((6, 6))) is None


def test_job_writes_parts_manifest_and_evaluation(repo: Path, shard: Path, tmp_path: Path) -> None:
    events = run_job(repo, shard, tmp_path / "out")
    progress, summary = events[:-1], events[-1]
    assert isinstance(summary, Summary) and all(isinstance(p, Progress) for p in progress)
    assert [p.rows_done for p in progress] == [0, 250, 500, 750, 1000]
    assert summary.rows_done == 1000 and summary.rows_failed == 0 and summary.rules_version == "v-test"
    out = read_output(tmp_path / "out")
    source = pq.read_table(shard)
    assert out.column("id").to_pylist() == source.column("id").to_pylist()
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == [
        f"part-0000{i}.parquet" for i in range(4)
    ]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] and [p["rows"] for p in manifest["parts"]] == [250] * 4
    assert (
        manifest["parts"][0]["first_id"] == "row-00000000"
        and manifest["parts"][3]["last_id"] == "row-00000999"
    )
    probs = np.stack(out.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    labels = out.column("label").to_numpy()
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))
    assert set(out.column("decided_by").to_pylist()) == {"ensemble"}
    # The summary's figures are scikit-learn's on the labelled rows.
    truth = source.column("gpt_scores").to_numpy(zero_copy_only=False)
    known = ~np.isnan(truth.astype(float))
    e = summary.evaluation
    assert e is not None and e.rows_labelled == known.sum()
    assert e.accuracy == pytest.approx(accuracy_score(truth[known], labels[known]))
    assert e.macro_f1 == pytest.approx(f1_score(truth[known], labels[known], average="macro"))
    assert e.mean_absolute_error == pytest.approx(mean_absolute_error(truth[known], labels[known]))
    assert e.accuracy > 0.4  # the generated data carries signal


def test_batch_rows_cut_parts_across_row_groups(repo: Path, shard: Path, tmp_path: Path) -> None:
    events = run_job(repo, shard, tmp_path / "out", batch_rows=300)
    assert [e.rows_done for e in events[:-1]] == [0, 300, 600, 900, 1000]
    whole = read_output(tmp_path / "out")
    reference = tmp_path / "ref"
    run_job(repo, shard, reference)
    ref = read_output(reference)
    assert whole.column("id").to_pylist() == ref.column("id").to_pylist()
    assert whole.column("label").to_pylist() == ref.column("label").to_pylist()


def test_knn_mode_and_regression(repo: Path, shard: Path, tmp_path: Path) -> None:
    vote = ProxyLabelRules(mode="knn", knn=KnnRules(weighting="uniform"))
    run_job(repo, shard, tmp_path / "vote", vote)
    regression = ProxyLabelRules(mode="knn", knn=KnnRules(weighting="uniform", aggregation="regression"))
    run_job(repo, shard, tmp_path / "regression", regression)
    v, r = read_output(tmp_path / "vote"), read_output(tmp_path / "regression")
    assert set(v.column("decided_by").to_pylist()) == {"knn"}
    # Same vote probabilities; regression labels are the rounded expected scores.
    np.testing.assert_allclose(
        np.stack(v.column("probabilities").to_numpy(zero_copy_only=False)),
        np.stack(r.column("probabilities").to_numpy(zero_copy_only=False)),
    )
    expected = r.column("knn_expected_score").to_numpy()
    np.testing.assert_array_equal(r.column("label").to_numpy(), np.ceil(expected - 0.5).astype(int))


def test_killed_job_resumes_with_every_id_once(repo: Path, shard: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run_job(repo, shard, reference, batch_rows=100, version="cli")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-c",
        OFFLINE_CLI,
        str(shard),
        str(out),
        "--repo",
        str(repo),
        "--batch-rows",
        "100",
    ]
    proc = subprocess.Popen(
        [*cmd, "--throttle-seconds", "0.3"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            try:
                parts = json.loads((out / MANIFEST).read_text())["parts"]
            except (OSError, ValueError):
                parts = []
            if len(parts) >= 2:
                break
            assert time.monotonic() < deadline, "the job committed no part in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"] and 2 <= len(manifest["parts"]) < 10
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])["summary"]
    assert summary["rows_resumed"] == 100 * len(manifest["parts"]) and summary["rows_done"] == 1000
    got, want = read_output(out), read_output(reference)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 1000 and ids == want.column("id").to_pylist()
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    np.testing.assert_allclose(
        np.stack(got.column("probabilities").to_numpy(zero_copy_only=False)),
        np.stack(want.column("probabilities").to_numpy(zero_copy_only=False)),
        atol=1e-6,
    )
    # Every file in the directory is a committed part (a killed part's temp file is gone).
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(10)]
    assert not list(out.glob(".part-*"))


def test_a_rerun_with_other_rules_is_refused(repo: Path, shard: Path, tmp_path: Path) -> None:
    run_job(repo, shard, tmp_path / "out", version="a")
    again = run_job(repo, shard, tmp_path / "out", version="a")
    assert again[-1].rows_resumed == 1000 and again[-1].rows_done == 1000
    code, message = status_of(repo, shard, tmp_path / "out", version="b")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rules_version" in message


def _write(path: Path, table: pa.Table, **kw: object) -> Path:
    pq.write_table(table, path, **kw)
    return path


def test_bad_shards_are_refused_before_any_work(repo: Path, shard: Path, tmp_path: Path) -> None:
    source = pq.read_table(shard).slice(0, 50)
    cases = {
        "missing": (tmp_path / "missing.parquet", grpc.StatusCode.NOT_FOUND, "does not exist"),
        "not parquet": (tmp_path / "notes.parquet", grpc.StatusCode.INVALID_ARGUMENT, "not a parquet file"),
        "no text": (
            _write(tmp_path / "notext.parquet", source.drop_columns(["messages"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no conversation column",
        ),
        "dimension": (
            _write(
                tmp_path / "dim.parquet",
                source.set_column(2, "embedding", pa.array([[0.1] * (DIM + 1)] * 50, pa.list_(pa.float32()))),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"dimension {DIM + 1}",
        ),
        "embedder": (
            _write(
                tmp_path / "other.parquet",
                source.replace_schema_metadata(
                    {b"tessera.embedder": json.dumps({"name": "BAAI/bge-large-en-v1.5", "dimension": DIM})}
                ),
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "BAAI/bge-large-en-v1.5",
        ),
        "no embedder for text-only rows": (
            _write(tmp_path / "textonly.parquet", source.drop_columns(["embedding"])),
            grpc.StatusCode.FAILED_PRECONDITION,
            "text_embedder",
        ),
    }
    (tmp_path / "notes.parquet").write_text("id,text\n1,hello\n")
    for name, (path, code, words) in cases.items():
        got, message = status_of(repo, path, tmp_path / f"out-{name}")
        assert got == code and words in message, (name, message)
        assert not (tmp_path / f"out-{name}").exists(), name  # nothing was written
    code, message = status_of(repo, shard, tmp_path / "out", ProxyLabelRules(mode="mlp"), batch_rows=-1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_rows_are_written_with_a_reason(repo: Path, shard: Path, tmp_path: Path) -> None:
    rows = pq.read_table(shard).slice(0, 6).to_pylist()
    rows[1]["embedding"] = [float("nan")] * DIM
    rows[2]["messages"] = [{"role": "user", "content": "   "}]
    rows[3]["embedding"] = None
    rows[4]["embedding"] = [0.0] * DIM
    path = _write(
        tmp_path / "bad.parquet", pa.Table.from_pylist(rows, schema=schema(SYNTHETIC_EMBEDDER, DIM))
    )
    events = run_job(repo, path, tmp_path / "out")
    assert events[-1].rows_done == 6 and events[-1].rows_failed == 4
    out = read_output(tmp_path / "out")
    assert out.column("id").to_pylist() == [r["id"] for r in rows]
    assert out.column("reason").to_pylist() == [
        None,
        "embedding has NaN or infinite values",
        "empty text",
        "no embedding",
        "embedding is all zeros",
        None,
    ]
    assert out.column("label").null_count == 4 and out.column("label")[0].is_valid


def test_empty_shard_is_a_success_with_zero_rows(repo: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.parquet", schema(SYNTHETIC_EMBEDDER, DIM).empty_table())
    events = run_job(repo, path, tmp_path / "out")
    assert events[-1].rows_done == 0 and events[-1].evaluation is None
    assert read_output(tmp_path / "out").num_rows == 0


def test_no_neighbour_above_the_threshold(repo: Path, shard: Path, tmp_path: Path) -> None:
    strict = KnnRules(similarity_threshold=0.999)
    run_job(repo, shard, tmp_path / "knn", ProxyLabelRules(mode="knn", knn=strict))
    knn = read_output(tmp_path / "knn")
    assert knn.column("label").null_count == 1000
    assert knn.column("reason")[0].as_py().startswith("no labelled neighbour")
    # In ensemble mode the MLP still decides; the row says the kNN had no neighbour.
    run_job(repo, shard, tmp_path / "ens", ProxyLabelRules(mode="ensemble", knn=strict))
    ens = read_output(tmp_path / "ens")
    assert ens.column("label").null_count == 0 and ens.column("reason")[0].as_py().startswith("no labelled")


def test_a_failed_job_is_recorded_and_resumes(
    repo: Path, shard: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure mid-job is written in the manifest (the job's state lives with its output), its
    finished parts stay, and a rerun resumes after them."""
    from services.proxylabel import jobs, shard_run

    real = shard_run.score_part

    async def failing(plan, pipeline, table, first_row):  # type: ignore[no-untyped-def]
        if first_row >= 300:
            raise RuntimeError("disk on fire")
        return await real(plan, pipeline, table, first_row)

    monkeypatch.setattr(shard_run, "score_part", failing)
    with pytest.raises(RuntimeError):
        run_job(repo, shard, tmp_path / "out", batch_rows=100)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["state"] == "failed" and manifest["error"]["code"] == "INTERNAL"
    assert len(manifest["parts"]) == 3 and not manifest["complete"]
    status = jobs.read_status(tmp_path / "out", 30.0)
    assert status.state == "failed" and status.error_code == "INTERNAL" and status.rows_done == 300
    assert status.job_id == ShardJob(shard, tmp_path / "out", ProxyLabelRules(), "v-test", 100).job_id
    monkeypatch.setattr(shard_run, "score_part", real)
    events = run_job(repo, shard, tmp_path / "out", batch_rows=100)
    assert events[0].rows_done == 300 and events[-1].rows_resumed == 300 and events[-1].rows_done == 1000
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["state"] == "succeeded" and manifest["error"] is None and len(manifest["runs"]) == 2
    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert ids == pq.read_table(shard).column("id").to_pylist()


def test_a_second_writer_of_the_same_output_is_refused(repo: Path, shard: Path, tmp_path: Path) -> None:
    async def both() -> tuple[grpc.StatusCode, str]:
        async with local_pipeline(repo) as pipeline:
            plan = plan_shard(ShardJob(shard, tmp_path / "out", ProxyLabelRules(), "v", 100), pipeline)
            first = run_shard(plan, pipeline)
            await anext(first)  # the first job holds the lock now
            try:
                with pytest.raises(ServingError) as err:
                    async for _ in run_shard(plan, pipeline):
                        pass
                return err.value.code, err.value.message
            finally:
                await first.aclose()

    code, message = asyncio.run(both())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another job is writing" in message
