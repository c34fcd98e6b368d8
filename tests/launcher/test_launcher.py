"""`tessera-serve` supervises the suite: a process that dies is restarted on its port while the
others keep answering, the gateway serves it again without a restart of its own, and a crash loop
stops the launcher with a message that says so. Real processes; every wait is a bounded poll."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from launcher.suite import ROOT, command_path
from tessera_client import TesseraClient

SERVICES = ("emotion", "engagement", "proxylabel")


def _ready(workdir: Path, name: str) -> dict | None:
    try:
        return json.loads((workdir / f"{name}.ready.json").read_text())
    except (OSError, ValueError):
        return None


def _poll(what: str, check: Callable[[], object], seconds: float = 90.0) -> object:
    for _ in range(int(seconds / 0.2)):
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {seconds:.0f}s")


@pytest.fixture
def served(tmp_path: Path, model_repository: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    workdir, out = tmp_path / "suite", tmp_path / "serve.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [
                command_path("tessera-serve"),
                "--port",
                "0",
                "--workdir",
                str(workdir),
                "--repository",
                str(model_repository),
                "--max-restarts",
                "2",
                "--restart-window",
                "600",
            ],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        # Ready when the launcher says so (it has seen every process SERVING): a ready file alone
        # can come before the launcher's own checks, and a kill then fails its start, not a restart.
        _poll("suite ready", lambda: proc.poll() is not None or "gateway SERVING on" in out.read_text())
        assert proc.poll() is None, out.read_text()
        yield proc, workdir, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _call(client: TesseraClient, service: str, photo: bytes) -> None:
    if service == "emotion":
        client.classify_image(photo, timeout=10)
    elif service == "engagement":
        client.score_clip([photo] * 3, fps=3, timeout=30)
    else:
        client.score_texts([{"id": "a", "text": "How do plants make food?"}], timeout=30)


def _answers(client: TesseraClient, service: str, photo: bytes) -> bool:
    try:
        _call(client, service, photo)
        return True
    except grpc.RpcError:
        return False


def test_dead_services_come_back_on_their_ports_and_a_crash_loop_stops_the_suite(
    served: tuple[subprocess.Popen[str], Path, Path], astronaut_jpeg: bytes
) -> None:
    proc, workdir, out = served
    gateway = f"127.0.0.1:{_ready(workdir, 'gateway')['port']}"  # type: ignore[index]
    with TesseraClient(gateway, timeout=30) as client:
        for service in SERVICES:
            before = _ready(workdir, service)
            assert before is not None
            # SIGKILL is a crash; SIGTERM a clean exit 0 that nobody asked for: both are restarted.
            os.kill(before["pid"], signal.SIGTERM if service == "engagement" else signal.SIGKILL)
            for other in SERVICES:
                if other != service:
                    _call(client, other, astronaut_jpeg)  # the others answer while it is down
            after = _poll(
                f"{service} restarted",
                lambda s=service, b=before: (  # type: ignore[misc]
                    (r := _ready(workdir, s)) and r["pid"] != b["pid"] and r
                ),
            )
            assert after["port"] == before["port"]  # type: ignore[index]
            _poll(f"gateway serves {service} again", lambda s=service: _answers(client, s, astronaut_jpeg))
            assert proc.poll() is None
        assert f"emotion killed by signal {signal.SIGKILL}; restarting it on port" in out.read_text()
        assert "engagement exited with status 0; restarting it" in out.read_text()

        # emotion has one restart of the two allowed: kill it twice more.
        for round_ in range(2):
            pid = _ready(workdir, "emotion")["pid"]  # type: ignore[index]
            os.kill(pid, signal.SIGKILL)
            if round_ == 0:
                _poll("emotion restarted", lambda p=pid: (r := _ready(workdir, "emotion")) and r["pid"] != p)
    _poll("launcher stopped", lambda: proc.poll() is not None)
    assert proc.returncode == 1
    text = out.read_text()
    assert "emotion killed by signal 9 after 2 restarts within 600s: crash loop, stopping the suite" in text


def test_processes_stop_when_their_launcher_dies(tmp_path: Path, model_repository: Path) -> None:
    """A launcher killed outright (SIGKILL: no cleanup runs) leaves no orphans serving on."""
    import sys

    workdir = tmp_path / "suite"
    code = (
        "import sys, time; from pathlib import Path; from launcher.suite import Suite; "
        f"Suite(Path({str(workdir)!r}), repository=Path({str(model_repository)!r})).start(); "
        "print('up', flush=True); time.sleep(600)"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None and launcher.stdout.readline().strip() == "up"
        pids = [_ready(workdir, name)["pid"] for name in ("gateway", *SERVICES)]  # type: ignore[index]
    finally:
        launcher.kill()
        launcher.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    _poll("every process stopped", lambda: not any(running(pid) for pid in pids), seconds=60)
