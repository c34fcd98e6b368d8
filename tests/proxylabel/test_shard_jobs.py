"""Shard jobs detached from their RPC, on real processes on loopback (the suite, the shard CLI):
re-attaching to the same job, a job going on without its watcher, cancel and resume, lookups by
id, and the gateway or the proxylabel service killed mid-job and restarted while the CLI waits.
Every wait is a bounded poll; jobs are cut into many small parts so they are still running when
a test acts on them (it waits for progress first, never for time)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher.suite import ROOT, Suite, command_path
from services.proxylabel import jobs
from services.proxylabel.lease import (
    LOCK_FILE,
    Holder,
    Lease,
    LeaseBusy,
    LeaseLost,
    process_start,
    read_lock,
    write_lock,
)
from services.proxylabel.manifest import CANCEL_FILE, MANIFEST
from services.proxylabel.parts import part_name, read_output
from tessera.proxylabel.v1 import proxylabel_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc
from tessera_client import TesseraClient
from tests.proxylabel.helpers import DIM, start_job_suite, wait_for
from tools.modeller.proxylabel.generate import write_shard

ROWS = 20_000
BATCH = 100  # 200 parts of ~35 ms: a job runs for seconds, and acts land between parts
PARTS = ROWS // BATCH
EXPIRY = 2.0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("job-data")


@pytest.fixture(scope="module")
def shard(data_root: Path) -> Path:
    return write_shard(
        data_root / "in.parquet", ROWS, dimension=DIM, labelled_fraction=0.4, seed=21, row_group_rows=2000
    )


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[Suite]:
    s = start_job_suite(tmp_path_factory, data_root, EXPIRY)
    yield s
    s.stop()


@pytest.fixture()
def client(suite: Suite) -> Iterator[TesseraClient]:
    with TesseraClient(suite.gateway.target) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# Helpers


def metric(suite: Suite, name: str, **labels: str) -> float:
    """A sample of the proxylabel process's /metrics (0 when absent)."""
    url = f"http://127.0.0.1:{suite.processes['proxylabel'].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def rows_scored(suite: Suite) -> float:
    return metric(suite, "tessera_shard_rows_scored_total")


def assert_every_id_once(output: Path, shard: Path) -> None:
    ids = read_output(output).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and ids == pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    manifest = json.loads((output / MANIFEST).read_text())
    assert [p["index"] for p in manifest["parts"]] == list(range(manifest["parts_total"]))
    parts = [part_name(i) for i in range(manifest["parts_total"])]
    assert sorted(p.name for p in output.glob("*.parquet")) == parts
    assert not list(output.glob(".part-*")), "a temporary part was left behind"


def progress_until(events: Iterator[pb.ScoreShardResponse], rows: int) -> tuple[str, list[pb.ShardProgress]]:
    """Read a stream until the job has done `rows`; the job id its first event names."""
    seen: list[pb.ShardProgress] = []
    for event in events:
        assert event.WhichOneof("event") == "progress", event
        seen.append(event.progress)
        if event.progress.rows_done >= rows:
            break
    assert seen and seen[0].HasField("job") and all(not p.HasField("job") for p in seen[1:])
    return seen[0].job.job_id, seen


def code_of(call: Callable[..., object], *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code()


class ShardCli:
    """`tessera-score-shard` as a subprocess; stderr is collected by a thread (it names the job)."""

    def __init__(self, gateway: str, shard: Path, output: Path) -> None:
        self.proc = subprocess.Popen(
            [
                command_path("tessera-score-shard"),
                "--gateway",
                gateway,
                str(shard),
                str(output),
                "--batch-rows",
                str(BATCH),
                "--reconnect-seconds",
                "90",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(line)

    def job_id(self) -> str | None:
        for line in self.stderr:
            if m := re.match(r"shard job ([0-9a-f]{32}): ", line):
                return m.group(1)
        assert self.proc.poll() is None, "".join(self.stderr)
        return None

    def finish(self, timeout: float = 180.0) -> tuple[int, str, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        self._reader.join(10)
        return self.proc.returncode, out, "".join(self.stderr)


def proxylabel_stub(suite: Suite) -> tuple[grpc.Channel, pb_grpc.ProxyLabelServiceStub]:
    channel = grpc.insecure_channel(suite.processes["proxylabel"].target)
    return channel, pb_grpc.ProxyLabelServiceStub(channel)


def get_direct(suite: Suite, job_id: str) -> pb.ShardJob:
    channel, stub = proxylabel_stub(suite)
    with channel:
        return stub.GetShardJob(pb.GetShardJobRequest(job_id=job_id), timeout=10).job


# ---------------------------------------------------------------------------------------------
# The lock and the state, without the service


def _foreign(owner: str = "someone-else", heartbeat: float | None = None) -> Holder:
    now = time.time()
    return Holder(
        owner,
        "elsewhere",
        "another-machine",
        "pid:[1]",
        4242,
        1,
        now if heartbeat is None else heartbeat,
        now,
    )


def test_the_lock_is_taken_over_only_when_stale(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).touch()
    write_lock(tmp_path, _foreign())  # another machine's holder, heartbeat fresh
    with pytest.raises(LeaseBusy) as busy:
        Lease.acquire(tmp_path, EXPIRY)
    assert busy.value.holder.label == "elsewhere:4242"
    write_lock(tmp_path, _foreign(heartbeat=time.time() - EXPIRY - 0.1))  # its heartbeat stopped
    lease = Lease.acquire(tmp_path, EXPIRY)
    assert lease.took_over is not None and lease.took_over.label == "elsewhere:4242"
    assert read_lock(tmp_path).owner == lease.owner
    with lease.guard():
        pass
    lease.beat()
    # Someone took it over from us (we were too slow): we may commit nothing more.
    write_lock(tmp_path, _foreign())
    with pytest.raises(LeaseLost), lease.guard():
        pytest.fail("committed under a lost lock")
    with pytest.raises(LeaseLost):
        lease.beat()
    lease.release()  # not ours any more: left alone
    assert read_lock(tmp_path).owner == "someone-else"


def test_a_dead_holder_on_this_machine_is_stale_at_once(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).touch()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        mine = Lease.acquire(tmp_path, EXPIRY)
        mine.release()
        this_machine = read_lock(tmp_path)
        assert this_machine is not None
        alive = replace(
            this_machine, owner="x", pid=sleeper.pid, start=process_start(sleeper.pid), heartbeat=time.time()
        )
        write_lock(tmp_path, alive)
        with pytest.raises(LeaseBusy):
            Lease.acquire(tmp_path, 3600)
        sleeper.kill()
        sleeper.wait()
        Lease.acquire(tmp_path, 3600).release()  # its heartbeat is fresh, but its process is gone
        # A hung holder (process alive, heartbeat stopped) is stale after the expiry all the same.
        write_lock(
            tmp_path,
            replace(
                alive, pid=os.getpid(), start=process_start(os.getpid()), heartbeat=time.time() - EXPIRY - 0.1
            ),
        )
        Lease.acquire(tmp_path, EXPIRY).release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_job_state_comes_from_the_manifest_and_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "job"
    out.mkdir()
    job_id = "ab" * 16
    (out / MANIFEST).write_text(
        json.dumps(
            {
                "job_id": job_id,
                "input": {"path": str(tmp_path / "in.parquet")},
                "rows_total": 20,
                "parts_total": 2,
                "parts": [{"rows": 10, "rows_failed": 1}],
                "state": "running",
                "updated": time.time(),
                "owner": "a:1",
            }
        )
    )
    (out / LOCK_FILE).touch()
    write_lock(out, _foreign())
    status = jobs.read_status(out, EXPIRY)
    assert (status.state, status.owner, status.rows_done, status.rows_failed, status.parts_done) == (
        "running",
        "elsewhere:4242",
        10,
        1,
        1,
    )
    write_lock(out, _foreign(heartbeat=time.time() - 10))
    assert jobs.read_status(out, EXPIRY).state == jobs.ORPHANED
    (out / CANCEL_FILE).touch()
    status = jobs.read_status(out, EXPIRY)
    assert status.state == "cancelled" and status.cancel_requested
    jobs.register(job_id, out, [tmp_path])
    assert jobs.find(job_id, [tmp_path], EXPIRY).output_path == out
    assert [s.job_id for s in jobs.list_jobs([tmp_path], EXPIRY)] == [job_id]
    assert jobs.relative_to_roots(out, [tmp_path]) == "job"


# ---------------------------------------------------------------------------------------------
# Through the suite


def test_the_same_request_twice_reattaches_and_scores_each_part_once(
    suite: Suite, client: TesseraClient, shard: Path, data_root: Path
) -> None:
    out = data_root / "twice"
    before = rows_scored(suite)
    first = client.score_shard(shard, out, batch_rows=BATCH)
    job_id, seen = progress_until(first, 3 * BATCH)
    assert seen[0].job.attachment == pb.SHARD_JOB_ATTACHMENT_STARTED and seen[0].rows_done == 0
    second = client.score_shard(shard, out, batch_rows=BATCH)
    again, seen2 = progress_until(second, 0)
    assert again == job_id and seen2[0].job.attachment == pb.SHARD_JOB_ATTACHMENT_REATTACHED
    assert 3 * BATCH <= seen2[0].rows_done < ROWS  # from where the job is, not from the start
    # Another job (other batch_rows: another id) may not write the same directory meanwhile.
    assert (
        code_of(lambda: list(client.score_shard(shard, out, batch_rows=BATCH + 1, timeout=30)))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    for stream in (first, second):
        events = list(stream)
        summary = events[-1].summary
        assert events[-1].WhichOneof("event") == "summary" and summary.job_id == job_id
        assert summary.rows_done == ROWS
        done = [e.progress.rows_done for e in events[:-1]]
        assert done == sorted(done) and done[-1] == ROWS
    assert_every_id_once(out, shard)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["state"] == "succeeded" and len(manifest["runs"]) == 1
    assert rows_scored(suite) - before == ROWS  # nothing was scored twice
    # Asked once more, the finished job answers at once.
    events = list(client.score_shard(shard, out, batch_rows=BATCH, timeout=60))
    assert events[0].progress.job.attachment == pb.SHARD_JOB_ATTACHMENT_REATTACHED
    assert events[-1].summary.rows_resumed == ROWS and rows_scored(suite) - before == ROWS


def test_the_job_goes_on_when_its_watcher_leaves(
    suite: Suite, client: TesseraClient, shard: Path, data_root: Path
) -> None:
    out = data_root / "jobs" / "detached"
    before = rows_scored(suite)
    call = client.score_shard(shard, out, batch_rows=BATCH)
    job_id, _ = progress_until(call, 3 * BATCH)
    call.cancel()  # the watcher leaves (the RPC is cancelled), not the job
    job = client.get_shard_job(job_id)
    assert job.state == pb.SHARD_JOB_STATE_RUNNING and job.rows_done < ROWS and job.owner
    # Paths relative to the configured roots, never the server's own.
    assert (job.input_path, job.output_path) == ("in.parquet", "jobs/detached")
    assert job.parts_total == PARTS and job.batch_rows == BATCH and job.rules_version
    assert job.update_time.seconds > 0 and job.heartbeat_time.seconds > 0
    done = wait_for(
        lambda: (j := client.get_shard_job(job_id)).state == pb.SHARD_JOB_STATE_SUCCEEDED and j,
        "the job to finish without its watcher",
    )
    assert (done.rows_done, done.parts_done, done.rows_total) == (ROWS, PARTS, ROWS)
    assert not done.HasField("error") and not done.cancel_requested
    assert_every_id_once(out, shard)
    assert rows_scored(suite) - before == ROWS


def test_cancel_keeps_finished_parts_and_the_same_request_resumes(
    suite: Suite, client: TesseraClient, shard: Path, data_root: Path
) -> None:
    out = data_root / "cancelled"
    before = rows_scored(suite)
    call = client.score_shard(shard, out, batch_rows=BATCH)
    job_id, _ = progress_until(call, 3 * BATCH)
    asked = client.cancel_shard_job(job_id)
    assert asked.job_id == job_id and (
        asked.state == pb.SHARD_JOB_STATE_CANCELLED
        or (asked.state == pb.SHARD_JOB_STATE_RUNNING and asked.cancel_requested)
    )
    with pytest.raises(grpc.RpcError) as err:  # its watcher hears it
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED and "cancelled" in err.value.details()
    job = wait_for(
        lambda: (j := client.get_shard_job(job_id)).state == pb.SHARD_JOB_STATE_CANCELLED and j,
        "the job to stop",
    )
    assert 3 <= job.parts_done < PARTS and job.rows_done == job.parts_done * BATCH
    # Its finished parts stay, committed: exactly the manifest's.
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [part_name(i) for i in range(job.parts_done)]
    assert client.cancel_shard_job(job_id).state == pb.SHARD_JOB_STATE_CANCELLED  # again: no change
    events = list(client.score_shard(shard, out, batch_rows=BATCH, timeout=120))
    assert events[0].progress.job.job_id == job_id
    assert events[0].progress.job.attachment == pb.SHARD_JOB_ATTACHMENT_RESUMED
    assert events[0].progress.rows_done == job.rows_done
    summary = events[-1].summary
    assert summary.rows_done == ROWS and summary.rows_resumed == job.rows_done
    assert_every_id_once(out, shard)
    assert rows_scored(suite) - before == ROWS  # the resumed run scored only what was missing
    finished = client.get_shard_job(job_id)
    assert finished.state == pb.SHARD_JOB_STATE_SUCCEEDED and not finished.cancel_requested
    assert client.cancel_shard_job(job_id).state == pb.SHARD_JOB_STATE_SUCCEEDED  # finished: unchanged


def test_bad_and_unknown_job_ids(suite: Suite, client: TesseraClient, shard: Path, data_root: Path) -> None:
    unknown = "0" * 32
    bad = ["", "nope", "../../etc/passwd", "A" * 32, "0" * 31, "0" * 33, unknown[:-1] + "/"]
    channel, stub = proxylabel_stub(suite)
    with channel:
        for name, gateway_call, service_call in [
            (
                "get",
                client.get_shard_job,
                lambda i: stub.GetShardJob(pb.GetShardJobRequest(job_id=i), timeout=10),
            ),
            (
                "cancel",
                client.cancel_shard_job,
                lambda i: stub.CancelShardJob(pb.CancelShardJobRequest(job_id=i), timeout=10),
            ),
        ]:
            for call in (gateway_call, service_call):
                for job_id in bad:
                    assert code_of(call, job_id) == grpc.StatusCode.INVALID_ARGUMENT, (name, job_id)
                assert code_of(call, unknown) == grpc.StatusCode.NOT_FOUND, name
    # A small job of its own, listed with paths relative to the roots.
    small = write_shard(
        data_root / "small.parquet", 300, dimension=DIM, labelled_fraction=0.4, seed=3, row_group_rows=100
    )
    out = data_root / "listed"
    events = list(client.score_shard(small, out, timeout=60))
    job_id = events[0].progress.job.job_id
    listed = {j.job_id: j for j in client.list_shard_jobs()}
    assert listed[job_id].state == pb.SHARD_JOB_STATE_SUCCEEDED
    assert (listed[job_id].input_path, listed[job_id].output_path) == ("small.parquet", "listed")
    assert all(not (j.output_path.startswith("/") or j.input_path.startswith("/")) for j in listed.values())
    updated = [j.update_time.ToNanoseconds() for j in client.list_shard_jobs()]
    assert updated == sorted(updated, reverse=True)
    # A job whose output was removed is gone.
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    assert code_of(client.get_shard_job, job_id) == grpc.StatusCode.NOT_FOUND
    assert job_id not in {j.job_id for j in client.list_shard_jobs()}


def test_the_cli_reattaches_across_a_gateway_restart(suite: Suite, shard: Path, data_root: Path) -> None:
    out = data_root / "gateway-restart"
    before = rows_scored(suite)
    cli = ShardCli(suite.gateway.target, shard, out)
    job_id = wait_for(cli.job_id, "the CLI to start the job")
    wait_for(lambda: get_direct(suite, job_id).rows_done >= 3 * BATCH, "progress")
    suite.kill("gateway")
    # The job goes on without the gateway (asked of the service directly).
    job = get_direct(suite, job_id)
    assert job.state == pb.SHARD_JOB_STATE_RUNNING and job.rows_done < ROWS
    suite.restart("gateway")
    code, stdout, stderr = cli.finish()
    assert code == 0, stderr
    assert f"job {job_id}, re-attached" in stdout, stdout
    assert "re-attaching" in stderr  # it said so on its progress line
    assert_every_id_once(out, shard)
    assert rows_scored(suite) - before == ROWS  # the service scored every row once
    assert get_direct(suite, job_id).state == pb.SHARD_JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("how", ["killed, on this machine", "killed, on another machine", "stopped"])
def test_the_cli_reattaches_across_a_proxylabel_restart(
    suite: Suite, shard: Path, data_root: Path, how: str
) -> None:
    """The proxylabel process goes away mid-job and starts again: the CLI re-attaches through the
    gateway and the new process takes the job over from its last finished part.

    - killed (SIGKILL), on this machine: the dead owner is known at once;
    - killed, on another machine (its lock as such a process leaves it): the new process watches
      the job while the owner's heartbeat is fresh, and takes it over once it is older than the
      expiry;
    - stopped (SIGTERM): the drain ends the watch, the job stops and releases its lock."""
    out = data_root / f"proxylabel-{how.split()[-2] if 'killed' in how else how}"
    cli = ShardCli(suite.gateway.target, shard, out)
    job_id = wait_for(cli.job_id, "the CLI to start the job")
    wait_for(lambda: get_direct(suite, job_id).rows_done >= 3 * BATCH, "progress")
    beating = threading.Event()
    if how == "stopped":
        suite.restart("proxylabel")
    else:
        suite.kill("proxylabel")
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["state"] == "running" and 3 * BATCH <= manifest["parts"][-1]["stop"] < ROWS
    if how == "killed, on another machine":
        dead = read_lock(out)
        assert dead is not None and dead.owner
        foreign = replace(dead, host="elsewhere", kernel="another-machine", heartbeat=time.time())
        write_lock(out, foreign)
        beating.set()

        def heartbeat() -> None:  # the other machine's owner, alive until the test lets it die
            while beating.is_set():
                write_lock(out, replace(foreign, heartbeat=time.time()))
                time.sleep(0.2)

        threading.Thread(target=heartbeat, daemon=True).start()
    try:
        if how.startswith("killed"):
            suite.restart("proxylabel")
        if how == "killed, on another machine":
            # The CLI's stream reaches the new process, which watches the job but may not take
            # it from its live owner.
            wait_for(
                lambda: metric(suite, "tessera_requests_in_flight", method="ScoreShard") >= 1,
                "the CLI to re-attach",
            )
            job = get_direct(suite, job_id)
            assert job.state == pb.SHARD_JOB_STATE_RUNNING and job.owner == f"elsewhere:{foreign.pid}"
            assert job.rows_done == sum(p["rows"] for p in manifest["parts"])  # nobody scores meanwhile
            beating.clear()  # the other machine dies: after the expiry the job is taken over
    finally:
        beating.clear()
    code, stdout, stderr = cli.finish()
    assert code == 0, stderr
    assert f"job {job_id}, re-attached" in stdout, stdout
    assert_every_id_once(out, shard)
    manifest = json.loads((out / MANIFEST).read_text())
    runs = manifest["runs"]
    assert len(runs) == 2 and runs[1]["owner"].endswith(f":{suite.processes['proxylabel'].popen.pid}")
    committed = runs[1]["first_part"] * BATCH  # when the new process took the job over
    assert 3 * BATCH <= committed < ROWS
    # The new process scored exactly what was not committed: no finished part twice.
    assert rows_scored(suite) == ROWS - committed
    assert get_direct(suite, job_id).state == pb.SHARD_JOB_STATE_SUCCEEDED
