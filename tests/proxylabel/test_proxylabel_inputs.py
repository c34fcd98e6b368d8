"""Hostile input to the proxylabel service, and who owns a shard job, on a real suite on loopback
whose gateway has tokens for two users and an admin:

- shards with wrongly typed columns or embedder metadata are refused with INVALID_ARGUMENT naming
  the column and the type expected, before any work or output (no event, manifest, lock or index
  entry);
- every path problem (a name too long, a symlink loop, a parent that is a file) is
  INVALID_ARGUMENT, and no message names an absolute server path;
- embeddings whose norm underflows or overflows are refused per row, never scored;
- a shard job belongs to the caller that started it: others do not see it (NOT_FOUND), may not
  cancel it (PERMISSION_DENIED) nor re-attach to it; the admin sees and cancels every job.

Every wait is a bounded poll on an outcome, never on time."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.suite import Suite
from services.proxylabel.jobs import INDEX_DIR
from services.proxylabel.knn import normalise
from services.proxylabel.manifest import MANIFEST
from services.proxylabel.parts import read_output
from services.proxylabel.pipeline import MAX_EMBEDDING_NORM, MIN_EMBEDDING_NORM, embedding_problem
from tessera.proxylabel.v1 import proxylabel_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc
from tessera_client import TesseraClient
from tests.proxylabel.helpers import DIM, start_job_suite, wait_for
from tools.modeller.proxylabel.generate import write_shard

T = TypeVar("T")
OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOKENS = """
tokens:
  - {token: alice-token-1, name: alice, scopes: [shard, classify]}
  - {token: bob-token-2, name: bob, scopes: [shard]}
  - {token: ops-token-3, name: ops, scopes: [admin]}
"""
ALICE, BOB, OPS = "alice-token-1", "bob-token-2", "ops-token-3"
ROWS, BATCH = 20_000, 100  # a long job of small parts: still running when a test acts on it

# A slash that starts a path (not one inside `input_roots[0]/x` or `a/b`): an absolute path.
ABSOLUTE = re.compile(r"(?<![\w\].])/")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("input-data")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[Suite]:
    tokens = tmp_path_factory.mktemp("input-auth") / "tokens.yaml"
    tokens.write_text(TOKENS)
    s = start_job_suite(tmp_path_factory, data_root, 2.0, TESSERA_GATEWAY__AUTH__TOKEN_FILE=str(tokens))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def base(data_root: Path) -> pa.Table:
    return pq.read_table(
        write_shard(
            data_root / "base.parquet", 40, dimension=DIM, labelled_fraction=0.5, seed=5, row_group_rows=20
        )
    )


def client(suite: Suite, token: str) -> TesseraClient:
    return TesseraClient(suite.gateway.target, token=token, timeout=60)


def outcome(call: Iterator[T]) -> tuple[list[T], grpc.StatusCode, str]:
    """The events of a stream and how it ended."""
    events: list[T] = []
    try:
        for event in call:
            events.append(event)
    except grpc.RpcError as exc:
        return events, exc.code(), exc.details() or ""
    return events, grpc.StatusCode.OK, ""


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def index_entries(data_root: Path) -> set[str]:
    return {p.name for p in (data_root / INDEX_DIR).glob("*.json")}


def assert_no_absolute_path(message: str, data_root: Path) -> None:
    for root in {str(data_root), str(data_root.resolve())}:
        assert root not in message, message
    assert not ABSOLUTE.search(message), message


# ---------------------------------------------------------------------------------------------
# A. Shards with wrongly typed columns


def _with(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _metadata(table: pa.Table, meta: object) -> pa.Table:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return table.replace_schema_metadata({b"tessera.embedder": raw})


def hostile_shards(base: pa.Table) -> dict[str, tuple[pa.Table, list[str]]]:
    """name -> (the shard, words its refusal must name)."""
    n = base.num_rows
    emb = base.column("embedding")
    meta = base.schema.metadata
    text = pa.array(["hello"] * n)
    binary = pa.array([b"\xff\xfe"] * n, pa.binary())
    return {
        "text int64": (
            pa.table({"text": pa.array(range(n), pa.int64()), "embedding": emb}).replace_schema_metadata(
                meta
            ),
            ["'text'", "int64", "expected string"],
        ),
        "id struct": (
            _with(base, "id", pa.array([{"a": i} for i in range(n)])),
            ["'id'", "struct", "strings or integers"],
        ),
        "id list": (
            _with(base, "id", pa.array([[i] for i in range(n)])),
            ["'id'", "list", "strings or integers"],
        ),
        "id binary": (_with(base, "id", binary), ["'id'", "binary", "strings or integers"]),
        "messages int fields": (
            _with(base, "messages", pa.array([[{"role": 1, "content": 2}]] * n)),
            ["'messages'", "int64", "list<struct<role: string, content: string>>"],
        ),
        "prompt binary": (
            pa.table({"prompt": binary, "response": text, "embedding": emb}).replace_schema_metadata(meta),
            ["'prompt'", "binary", "expected string"],
        ),
        "response binary": (
            pa.table({"prompt": text, "response": binary, "embedding": emb}).replace_schema_metadata(meta),
            ["'response'", "binary", "expected string"],
        ),
        "dimension abc": (
            _metadata(base, {"name": "synthetic", "dimension": "abc"}),
            ["dimension", "'abc'", "positive whole number"],
        ),
        "dimension negative": (
            _metadata(base, {"name": "synthetic", "dimension": -3}),
            ["dimension", "-3", "positive whole number"],
        ),
        "embedder name a number": (
            _metadata(base, {"name": 7, "dimension": DIM}),
            ["name", "7", "expected a string"],
        ),
        "embedder metadata not json": (_metadata(base, b"{not json"), ["tessera.embedder", "not JSON"]),
        "gpt_scores strings": (
            _with(base, "gpt_scores", pa.array(["5"] * n)),
            ["'gpt_scores'", "string", "numbers"],
        ),
        "embedding strings": (
            _with(base, "embedding", pa.array([["0.1"] * DIM] * n)),
            ["'embedding'", "list of floats"],
        ),
        "two text columns": (
            pa.Table.from_arrays(
                [text, text, emb], names=["text", "text", "embedding"]
            ).replace_schema_metadata(meta),
            ["2 columns named 'text'"],
        ),
    }


def test_wrongly_typed_shards_are_refused_before_any_work_or_output(
    suite: Suite, base: pa.Table, data_root: Path
) -> None:
    folder = data_root / "hostile"
    folder.mkdir()
    with client(suite, ALICE) as alice:
        for name, (table, words) in hostile_shards(base).items():
            slug = name.replace(" ", "-")
            shard = folder / f"{slug}.parquet"
            pq.write_table(table, shard)
            out = folder / f"out-{slug}"
            before = index_entries(data_root)
            events, code, message = outcome(alice.score_shard(shard, out, batch_rows=10))
            assert (code, events) == (INVALID, []), (name, code, message, events)
            for word in words:
                assert word in message, (name, message)
            assert_no_absolute_path(message, data_root)
            # Nothing was written: no output directory (so no manifest, no lock), no index entry.
            assert not out.exists(), (name, sorted(p.name for p in out.iterdir()))
            assert index_entries(data_root) == before, name


def test_unusual_but_valid_columns_are_scored(suite: Suite, base: pa.Table, data_root: Path) -> None:
    """What the type checks let through is scored (or reported on its rows), never INTERNAL."""
    n = base.num_rows
    emb, meta = base.column("embedding"), base.schema.metadata
    struct = pa.struct([("role", pa.large_string()), ("content", pa.large_string())])
    cases = {
        "integer ids": (_with(base, "id", pa.array(range(n), pa.int64())), 0),
        "dictionary text": (
            pa.table(
                {"text": pa.array(["What is rain?"] * n).dictionary_encode(), "embedding": emb}
            ).replace_schema_metadata(meta),
            0,
        ),
        "large strings": (_with(base, "messages", base.column("messages").cast(pa.large_list(struct))), 0),
        "null ids": (_with(base, "id", pa.nulls(n)), n),
        "null text": (pa.table({"text": pa.nulls(n), "embedding": emb}).replace_schema_metadata(meta), n),
    }
    folder = data_root / "unusual"
    folder.mkdir()
    with client(suite, ALICE) as alice:
        for name, (table, failed) in cases.items():
            slug = name.replace(" ", "-")
            pq.write_table(table, folder / f"{slug}.parquet")
            events, code, message = outcome(
                alice.score_shard(folder / f"{slug}.parquet", folder / f"out-{slug}")
            )
            assert code == grpc.StatusCode.OK, (name, code, message)
            summary = events[-1].summary
            assert (summary.rows_done, summary.rows_failed) == (n, failed), name


# ---------------------------------------------------------------------------------------------
# A. Paths


def test_every_path_problem_is_invalid_argument(suite: Suite, base: pa.Table, data_root: Path) -> None:
    folder = data_root / "paths"
    folder.mkdir()
    shard = folder / "ok.parquet"
    pq.write_table(base, shard)
    os.symlink("loop", folder / "loop")  # a symlink to itself
    os.symlink(folder / "ping", folder / "pong")
    os.symlink(folder / "pong", folder / "ping")
    (folder / "a-file").write_text("not a directory")
    long_name = "x" * 300
    cases = {
        "input name too long": (folder / f"{long_name}.parquet", folder / "out-1"),
        "input path too long": (folder / (("d" * 200 + "/") * 25) / "s.parquet", folder / "out-2"),
        "input through a symlink loop": (folder / "loop" / "s.parquet", folder / "out-3"),
        "input is a symlink loop": (folder / "ping", folder / "out-4"),
        "output name too long": (shard, folder / long_name),
        "output through a symlink loop": (shard, folder / "pong" / "out"),
        "output under a file": (shard, folder / "a-file" / "out"),
        "output is a file": (shard, folder / "a-file"),
        "input is a directory": (folder, folder / "out-5"),
    }
    with client(suite, ALICE) as alice:
        for name, (source, out) in cases.items():
            before = index_entries(data_root)
            events, code, message = outcome(alice.score_shard(source, out))
            assert (code, events) == (INVALID, []), (name, code, message)
            assert ("input_path" if name.startswith("input") else "output_path") in message, (name, message)
            assert_no_absolute_path(message, data_root)
            assert index_entries(data_root) == before, name
        assert not any(p.name.startswith("out") for p in folder.iterdir())
        # The service is still well.
        events, code, _ = outcome(alice.score_shard(shard, folder / "fine"))
        assert code == grpc.StatusCode.OK and events[-1].summary.rows_done == base.num_rows


def test_messages_name_paths_relative_to_the_roots(suite: Suite, base: pa.Table, data_root: Path) -> None:
    folder = data_root / "messages"
    folder.mkdir()
    shard, other = folder / "a.parquet", folder / "b.parquet"
    pq.write_table(base, shard)
    pq.write_table(base.slice(0, 30), other)
    (folder / "notes.parquet").write_text("id,text\n1,hello\n")
    (folder / "busy").mkdir()
    (folder / "busy" / "keep.txt").write_text("someone's")
    with client(suite, ALICE) as alice:
        events, code, _ = outcome(alice.score_shard(shard, folder / "scored"))
        assert code == grpc.StatusCode.OK
        # The summary names the output as ShardJob does: relative to the output roots.
        assert events[-1].summary.output_path == "messages/scored"
        job = alice.get_shard_job(events[-1].summary.job_id)
        assert (job.input_path, job.output_path) == ("messages/a.parquet", "messages/scored")
        refusals = {
            "missing": (
                folder / "missing.parquet",
                folder / "o1",
                grpc.StatusCode.NOT_FOUND,
                "shard 'input_roots[0]/messages/missing.parquet' does not exist",
            ),
            "not parquet": (
                folder / "notes.parquet",
                folder / "o2",
                INVALID,
                "'input_roots[0]/messages/notes.parquet' is not a parquet file",
            ),
            "outside the roots": (
                "/etc/passwd",
                folder / "o3",
                INVALID,
                "outside the proxylabel service's input_roots",
            ),
            "output outside the roots": (shard, "/tmp/elsewhere", INVALID, "output_roots"),
            "relative outside": ("relative/shard.parquet", folder / "o4", INVALID, "outside"),
            "a directory of something else": (
                shard,
                folder / "busy",
                grpc.StatusCode.FAILED_PRECONDITION,
                "'output_roots[0]/messages/busy' is not empty",
            ),
            "another input": (
                other,
                folder / "scored",
                grpc.StatusCode.FAILED_PRECONDITION,
                "'output_roots[0]/messages/scored' holds a job with another input shard",
            ),
        }
        for name, (source, out, want, words) in refusals.items():
            events, code, message = outcome(alice.score_shard(source, out))
            assert (code, events) == (want, []), (name, code, message)
            assert words in message, (name, message)
            assert_no_absolute_path(message, data_root)
            assert "/etc" not in message and "/tmp" not in message, (name, message)


# ---------------------------------------------------------------------------------------------
# A. Degenerate embeddings


DEGENERATE = {
    "subnormal": [1e-45] * DIM,
    "underflowing": [1e-30] * DIM,
    "tiny": [1e-20] * DIM,
    "overflowing": [3e38] * DIM,
    "one huge value": [0.0] * (DIM - 1) + [3.4e38],
}


def test_degenerate_embeddings_are_refused_per_row(suite: Suite) -> None:
    rows = [
        {"id": name, "text": "How do plants make food?", "embedding": values}
        for name, values in DEGENERATE.items()
    ]
    rows.append({"id": "fine", "text": "How do plants make food?", "embedding": [0.3] * DIM})
    with client(suite, ALICE) as alice:
        got = {r.id: r for r in alice.score_texts(rows).rows}
    assert got["fine"].status.code == OK and 0 <= got["fine"].label <= 5
    for name in DEGENERATE:
        assert got[name].status.code == INVALID.value[0], (name, got[name])
        assert "norm" in got[name].status.message and not got[name].probabilities, (name, got[name])


def test_degenerate_embeddings_in_a_shard_get_a_reason(suite: Suite, base: pa.Table, data_root: Path) -> None:
    n = len(DEGENERATE)
    table = base.slice(0, n + 1)
    values = [*DEGENERATE.values(), [0.3] * DIM]
    table = _with(table, "embedding", pa.array(values, pa.list_(pa.float32())))
    shard = data_root / "degenerate.parquet"
    pq.write_table(table, shard)
    with client(suite, ALICE) as alice:
        events, code, message = outcome(alice.score_shard(shard, data_root / "degenerate"))
    assert code == grpc.StatusCode.OK, message
    assert (events[-1].summary.rows_done, events[-1].summary.rows_failed) == (n + 1, n)
    out = read_output(data_root / "degenerate")
    reasons = out.column("reason").to_pylist()
    assert all("norm" in r for r in reasons[:n]) and reasons[n] is None, reasons
    assert out.column("label").null_count == n


def test_the_norm_bounds_are_inside_what_normalisation_handles() -> None:
    """Within the bounds float32 normalisation gives unit vectors; beyond them, a reason."""
    for dim in (16, 1024):

        def vector(norm: float) -> np.ndarray:
            return np.full((1, dim), norm / np.sqrt(dim), np.float32)

        for norm in (MIN_EMBEDDING_NORM * 1.01, 1.0, MAX_EMBEDDING_NORM * 0.99):
            assert embedding_problem(vector(norm), dim) == [""], norm
            assert np.linalg.norm(normalise(vector(norm)).astype(np.float64)) == pytest.approx(1.0, abs=1e-5)
        for norm in (MIN_EMBEDDING_NORM / 2, 1e-30, MAX_EMBEDDING_NORM * 2, 1e38):
            assert "norm" in embedding_problem(vector(norm), dim)[0], norm


# ---------------------------------------------------------------------------------------------
# B. Shard jobs belong to who started them


def _direct(suite: Suite) -> tuple[grpc.Channel, pb_grpc.ProxyLabelServiceStub]:
    channel = grpc.insecure_channel(suite.processes["proxylabel"].target)
    return channel, pb_grpc.ProxyLabelServiceStub(channel)


def test_a_finished_job_is_its_starters_and_the_admins(suite: Suite, base: pa.Table, data_root: Path) -> None:
    shard = data_root / "owned.parquet"
    pq.write_table(base, shard)
    out = data_root / "owned"
    with client(suite, ALICE) as alice, client(suite, BOB) as bob, client(suite, OPS) as ops:
        events, code, _ = outcome(alice.score_shard(shard, out))
        assert code == grpc.StatusCode.OK
        job_id = events[-1].summary.job_id
        assert json.loads((out / MANIFEST).read_text())["started_by"] == "alice"
        assert alice.get_shard_job(job_id).started_by == "alice"
        # Bob's own job, for the listings.
        events, code, _ = outcome(bob.score_shard(shard, data_root / "bobs"))
        bobs = events[-1].summary.job_id
        assert {j.job_id for j in alice.list_shard_jobs()} >= {job_id} and bobs not in {
            j.job_id for j in alice.list_shard_jobs()
        }
        assert {j.job_id for j in bob.list_shard_jobs()} == {bobs}
        assert all(j.started_by == "alice" for j in alice.list_shard_jobs())
        assert {job_id, bobs} <= {j.job_id for j in ops.list_shard_jobs()}
        # Another caller's job is not found (as an unknown one), nor cancelled, nor re-attached to.
        unknown = "f" * 32
        code, message = status(lambda: bob.get_shard_job(unknown))
        assert code == grpc.StatusCode.NOT_FOUND
        assert status(lambda: bob.get_shard_job(job_id)) == (code, message.replace(unknown, job_id))
        code, message = status(lambda: bob.cancel_shard_job(job_id))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "another caller" in message
        runs = json.loads((out / MANIFEST).read_text())["runs"]
        events, code, message = outcome(bob.score_shard(shard, out))
        assert (code, events) == (grpc.StatusCode.PERMISSION_DENIED, []) and "another caller" in message
        assert job_id not in message  # not even its id
        assert json.loads((out / MANIFEST).read_text())["runs"] == runs  # nothing was run for bob
        # The admin sees and may act on every job.
        assert ops.get_shard_job(job_id).state == pb.SHARD_JOB_STATE_SUCCEEDED
        assert ops.cancel_shard_job(job_id).state == pb.SHARD_JOB_STATE_SUCCEEDED  # finished: unchanged
        events, code, _ = outcome(ops.score_shard(shard, out))
        assert code == grpc.StatusCode.OK and events[-1].summary.job_id == job_id
        assert alice.cancel_shard_job(job_id).state == pb.SHARD_JOB_STATE_SUCCEEDED


def test_a_running_job_is_cancelled_only_by_its_starter_or_the_admin(suite: Suite, data_root: Path) -> None:
    shard = write_shard(
        data_root / "long.parquet", ROWS, dimension=DIM, labelled_fraction=0.4, seed=8, row_group_rows=2000
    )
    with client(suite, ALICE) as alice, client(suite, BOB) as bob, client(suite, OPS) as ops:
        for canceller in (alice, ops):
            out = data_root / f"long-{'alice' if canceller is alice else 'ops'}"
            watch = alice.score_shard(shard, out, batch_rows=BATCH)
            first = next(watch)
            job_id = first.progress.job.job_id
            wait_for(lambda: alice.get_shard_job(job_id).rows_done >= 3 * BATCH, "progress")
            # Bob may neither watch it, nor see it, nor stop it; it goes on.
            events, code, _ = outcome(bob.score_shard(shard, out, batch_rows=BATCH))
            assert (code, events) == (grpc.StatusCode.PERMISSION_DENIED, [])
            assert status(lambda: bob.get_shard_job(job_id))[0] == grpc.StatusCode.NOT_FOUND
            assert status(lambda: bob.cancel_shard_job(job_id))[0] == grpc.StatusCode.PERMISSION_DENIED
            assert job_id not in {j.job_id for j in bob.list_shard_jobs()}
            job = alice.get_shard_job(job_id)
            assert job.state == pb.SHARD_JOB_STATE_RUNNING and not job.cancel_requested
            # Its starter, or the admin, may: the watcher hears CANCELLED.
            asked = canceller.cancel_shard_job(job_id)
            assert asked.state == pb.SHARD_JOB_STATE_CANCELLED or asked.cancel_requested
            _, code, message = outcome(watch)
            assert code == grpc.StatusCode.CANCELLED and "cancelled" in message
            done = wait_for(
                lambda: (j := alice.get_shard_job(job_id)).state == pb.SHARD_JOB_STATE_CANCELLED and j,
                "the job to stop",
            )
            assert done.rows_done < ROWS and done.started_by == "alice"


def test_a_job_started_without_a_caller_is_the_admins(suite: Suite, base: pa.Table, data_root: Path) -> None:
    """A job started on an open gateway (no caller: here, on the service directly) is nobody's:
    once the gateway has tokens only an admin sees it; callers without one see every job."""
    shard = data_root / "anonymous.parquet"
    pq.write_table(base, shard)
    channel, stub = _direct(suite)
    with channel, client(suite, ALICE) as alice, client(suite, OPS) as ops:
        request = pb.ScoreShardRequest(
            input_path=str(shard),
            output_path=str(data_root / "anonymous"),
            rules=pb.FusionRules(version="v", mode=pb.PROXY_MODE_ENSEMBLE, alpha=0.8),
        )
        events = list(stub.ScoreShard(request, timeout=60))
        job_id = events[-1].summary.job_id
        assert stub.GetShardJob(pb.GetShardJobRequest(job_id=job_id), timeout=10).job.started_by == ""
        assert status(lambda: alice.get_shard_job(job_id))[0] == grpc.StatusCode.NOT_FOUND
        assert job_id not in {j.job_id for j in alice.list_shard_jobs()}
        assert ops.get_shard_job(job_id).job_id == job_id
        # Without a caller the service answers about every job (the open gateway's view).
        everyone = {j.job_id for j in stub.ListShardJobs(pb.ListShardJobsRequest(), timeout=10).jobs}
        assert job_id in everyone and {j.job_id for j in alice.list_shard_jobs()} <= everyone
        # The caller field is what the service goes by (it trusts the gateway alone to set it).
        as_bob = pb.Caller(name="bob")
        code, _ = status(
            lambda: stub.GetShardJob(pb.GetShardJobRequest(job_id=job_id, caller=as_bob), timeout=10)
        )
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = status(
            lambda: stub.CancelShardJob(pb.CancelShardJobRequest(job_id=job_id, caller=as_bob), timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
