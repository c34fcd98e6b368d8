"""Start the gateway and the three services as local processes, wait for SERVING, stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera_client import ClientTls

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("emotion", "engagement", "proxylabel")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)
    info: dict[str, int] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.info["port"]

    @property
    def metrics_port(self) -> int:
        return self.info["metrics_port"]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class SuiteError(RuntimeError):
    pass


class Suite:
    """The whole suite on loopback. Ports are chosen by the processes (port 0) and read back
    from their ready files, so parallel suites never race for a port."""

    def __init__(
        self,
        workdir: Path,
        *,
        repository: Path = ROOT / "model_repository",
        rules: Path = ROOT / "config" / "fusion_rules.yaml",
        gateway_port: int = 0,
        data_roots: tuple[Path, ...] = (ROOT / "data",),
        extra_env: dict[str, str] | None = None,
        config_files: dict[str, Path] | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self.workdir = workdir
        self.repository = repository
        self.rules = rules
        self.gateway_port = gateway_port
        self.data_roots = data_roots
        self.extra_env = extra_env or {}
        self.config_files = config_files or {}
        self.tls = tls
        self.processes: dict[str, Process] = {}

    # ------------------------------------------------------------------------------------------
    def _spawn(self, name: str, env: dict[str, str], port: int = 0, metrics_port: int = 0) -> Process:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_file = self.workdir / f"{name}.log"
        if log_file.exists():  # a restart: keep the previous run's log beside the new one
            log_file.replace(log_file.with_suffix(".previous.log"))
        # The process's stable command name, from the environment this launcher runs in.
        args = [
            command_path(f"tessera-{name}"),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--ready-file",
            str(ready),
        ]
        if name in self.config_files:
            args += ["--config", str(self.config_files[name])]
        with log_file.open("wb") as log:
            # The process stops by itself if this launcher dies (killed tests leave no orphans).
            popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**os.environ, **env, **self.extra_env, "TESSERA_PARENT_PID": str(os.getpid())},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = Process(name, popen, ready, log_file, env)
        self.processes[name] = proc
        return proc

    def _wait_ready(self, procs: list[Process], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            while not proc.ready_file.exists():
                if proc.popen.poll() is not None:
                    raise SuiteError(
                        f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise SuiteError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")
                time.sleep(0.05)
            proc.info = json.loads(proc.ready_file.read_text())

    def start(self, timeout: float = 60.0) -> Suite:
        roots = json.dumps([str(r) for r in self.data_roots])
        try:
            services = []
            for name in SERVICES:
                env = {f"TESSERA_{name.upper()}__MODEL_REPOSITORY": str(self.repository)}
                if name == "proxylabel":
                    env |= {
                        "TESSERA_PROXYLABEL__INPUT_ROOTS": roots,
                        "TESSERA_PROXYLABEL__OUTPUT_ROOTS": roots,
                    }
                services.append(self._spawn(name, env))
            self._wait_ready(services, timeout)
            env = {f"TESSERA_GATEWAY__TARGETS__{p.name.upper()}": p.target for p in services}
            env["TESSERA_GATEWAY__RULES_PATH"] = str(self.rules)
            gateway = self._spawn("gateway", env, self.gateway_port)
            self._wait_ready([gateway], timeout)
            for proc in self.processes.values():
                wait_serving(proc.target, timeout=timeout, tls=self.tls)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, name: str, timeout: float = 60.0) -> Process:
        """Start a process again on the port it had (its peers keep their targets), wait SERVING.
        A process still running is stopped first (SIGTERM, then SIGKILL after `timeout`)."""
        old = self.processes[name]
        if old.popen.poll() is None:
            old.popen.send_signal(signal.SIGTERM)
            try:
                old.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                old.popen.kill()
                old.popen.wait()
        proc = self._spawn(name, old.env, old.port, old.metrics_port)
        self._wait_ready([proc], timeout)
        wait_serving(proc.target, timeout=timeout, tls=self.tls)
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send a signal to one process (SIGKILL by default) and wait for it to end; its exit code."""
        proc = self.processes[name]
        proc.popen.send_signal(sig)
        return proc.popen.wait(30)

    @property
    def gateway(self) -> Process:
        return self.processes["gateway"]

    def stop(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every process (gateway first, so no new work reaches the services), then wait."""
        order = ["gateway", *SERVICES]
        procs = [self.processes[n] for n in order if n in self.processes]
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                codes[proc.name] = proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[proc.name] = proc.popen.wait()
        self.processes.clear()
        return codes

    def __enter__(self) -> Suite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def command_path(name: str) -> str:
    """A console script of this environment (beside its interpreter), or from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def wait_serving(target: str, service: str = "", timeout: float = 30.0, tls: ClientTls | None = None) -> None:
    """Poll grpc.health.v1 until the service says SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) if tls is None else tls.channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SuiteError(f"{target} did not report SERVING within {timeout:.0f}s")
            time.sleep(0.05)
