"""A local Triton Inference Server for development and tests, from the ``nvidia-pytriton`` wheel.

    tessera-triton-dev prepare --repo model_repository --cache .cache
    tessera-triton-dev start   --repo model_repository --cache .cache [--foreground]
    tessera-triton-dev stop    --cache .cache

The wheel ships the real ``tritonserver`` (2.51) with only the python backend, so this machine cannot
run the committed ``platform: "onnxruntime_onnx"`` configs as they are. ``prepare`` writes an
*overlay repository* under the cache that wraps each ONNX model in a small python-backend
``model.py`` (``tools/devtriton/backend_model.py``, copied) running ONNX Runtime on the original
file, with the original inputs, outputs, ``max_batch_size``, ``dynamic_batching`` and version policy. Production Triton serves the committed
configs with its onnxruntime backend; the overlay exists only on this machine.

Everything is cached under ``<cache>``:

    <cache>/wheels/nvidia_pytriton-0.7.0-*.whl      pip download --no-deps
    <cache>/triton/pytriton-0.7.0/                  the server, its bundled libs, backends/python
    <cache>/triton/site-packages/                   numpy 1.26 + onnxruntime for the backend stub
    <cache>/triton/overlays/<content hash>/         one overlay per repository content
    <cache>/triton/logs/                            server logs
    <cache>/triton/local.json                       the server ``start`` left running (for ``stop``)

The python-backend stub embeds the system's Python 3.11 in isolated mode: it ignores PYTHONPATH
and the suite's venv, and with numpy 2 it silently returns empty outputs. Hence the dedicated
site-packages, built by the system interpreter with ``pip install --target``, that each overlay
``model.py`` puts on ``sys.path`` itself (its path is in ``model.json`` beside it). pytriton itself
is never installed into the suite's venv (it pins numpy<2 and an old protobuf).

Over 500 lines on purpose: fetching the server, the overlay repository and the process lifecycle
share the cache layout above; the backend itself is a module of its own (backend_model.py).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Self

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.model_files import config_text, write_atomic
from services.runtime.repository import (
    CONFIG_FILE,
    ONNX_PLATFORM,
    ModelEntry,
    ModelRepository,
    numpy_dtype,
    onnx_signature,
)
from tools.builders.wheels import fetch_wheel

log = logging.getLogger(__name__)

PYTRITON_VERSION = "0.7.0"
STUB_PYTHON_VERSION = "3.11"
# numpy 1.x: the stub's pybind11 tensors come back empty with numpy 2. onnxruntime 1.20 is the
# newest that supports numpy 1.26 and reads our models (IR 8, opset 17).
STUB_REQUIREMENTS = ("numpy==1.26.4", "onnxruntime==1.20.1")
# InferenceSession needs only numpy; onnxruntime's other requirements (sympy, protobuf, flatbuffers,
# coloredlogs) serve its tools and would double the directory.
STUB_PIP_OPTIONS = ("--no-deps",)
# Overlays of other repository contents are deleted after this long unused.
OVERLAY_MAX_AGE_SECONDS = 7 * 24 * 3600
READY_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0
# Triton waits this long for in-flight requests on SIGTERM before it exits.
EXIT_TIMEOUT_SECONDS = 5
LOG_TAIL_LINES = 40
PORT_ATTEMPTS = 3
SERVABLE_KINDS = (ONNX_PLATFORM, "onnxruntime")

# The python-backend model every overlay version runs, copied as its model.py with its settings in
# model.json. Read as a file, never imported here: it imports what only the backend stub has.
BACKEND_MODEL = Path(__file__).with_name("backend_model.py")
# The batcher's merge/split, copied beside it (the stub imports nothing of the suite's packages).
BATCH_ROWS = Path(__file__).resolve().parents[2] / "services" / "runtime" / "batch_rows.py"
MODEL_PY = "model.py"
MODEL_SETTINGS = Path(MODEL_PY).with_suffix(".json").name  # model.py reads it under its own stem
OVERLAY_ONNX = "model.onnx"


class TritonPorts(NamedTuple):
    grpc: int
    http: int
    metrics: int


@dataclass(frozen=True)
class ServerFiles:
    """The unpacked server: the binary, the directory of its bundled libs, its backends."""

    binary: Path
    libs: Path
    backends: Path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise preparation between processes sharing a cache (e.g. two test runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _server_files(root: Path) -> ServerFiles:
    libs = next(root.glob("*.libs"), None)  # auditwheel's dir of bundled libs (nvidia_pytriton.libs)
    if libs is None:
        raise RuntimeError(f"{root}: no bundled libs directory (*.libs) in the unpacked wheel")
    server = root / "pytriton" / "tritonserver"
    return ServerFiles(server / "bin" / "tritonserver", libs, server / "backends")


def unpack_server(wheel: Path, dest: Path) -> ServerFiles:
    """Unpack the server and its libs from the wheel once; later calls reuse the directory."""
    stamp = dest / ".complete"
    if stamp.exists():
        return _server_files(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                continue  # the pytriton Python package itself is not wanted
            target = Path(zf.extract(info, tmp))
            mode = info.external_attr >> 16  # zip keeps the unix mode; extract() drops it
            if mode and not info.is_dir():
                target.chmod(stat.S_IMODE(mode) | stat.S_IRUSR)
    files = _server_files(tmp)
    stub = files.backends.parent / "python_backend_stubs" / STUB_PYTHON_VERSION / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"{wheel.name} has no python backend stub for Python {STUB_PYTHON_VERSION}")
    # The python backend looks for its stub in its own directory.
    shutil.copy2(stub, files.backends / "python" / stub.name)
    for exe in (files.binary, files.backends / "python" / stub.name):
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (tmp / ".complete").write_text(wheel.name + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return _server_files(dest)


def find_stub_python() -> str:
    """The system Python 3.11 that the backend stub embeds (TESSERA_TRITON_PYTHON overrides)."""
    candidates = [
        os.environ.get("TESSERA_TRITON_PYTHON"),
        f"/usr/bin/python{STUB_PYTHON_VERSION}",
        f"/usr/local/bin/python{STUB_PYTHON_VERSION}",
        shutil.which(f"python{STUB_PYTHON_VERSION}"),
    ]
    for python in filter(None, candidates):
        if not os.access(python, os.X_OK):
            continue
        probe = subprocess.run(
            [python, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == STUB_PYTHON_VERSION:
            return python
    raise RuntimeError(
        f"no Python {STUB_PYTHON_VERSION} with pip found for the Triton python backend "
        f"stub (tried {[c for c in candidates if c]}); set TESSERA_TRITON_PYTHON"
    )


def build_site_packages(dest: Path, python: str) -> Path:
    """The stub's own site-packages (numpy 1.x + onnxruntime), built once per requirement set."""
    wanted = "\n".join([f"python{STUB_PYTHON_VERSION}", *STUB_PIP_OPTIONS, *STUB_REQUIREMENTS]) + "\n"
    stamp = dest / ".tessera-requirements"
    if stamp.exists() and stamp.read_text() == wanted:
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_TARGET", "VIRTUAL_ENV"))}
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--quiet",
            *STUB_PIP_OPTIONS,
            "--target",
            str(tmp),
            *STUB_REQUIREMENTS,
        ],
        "building the python-backend site-packages",
        env=env,
    )
    # Import the packages the way the stub will (isolated mode) before trusting the directory.
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp)!r}); import numpy, onnxruntime; "
        "print(numpy.__version__, onnxruntime.__version__)"
    )
    versions = _run([python, "-I", "-c", probe], "checking the python-backend site-packages", env=env).split()
    if not versions or not versions[0].startswith("1."):
        raise RuntimeError(f"{tmp}: numpy {versions[:1]} is not 1.x; the backend stub needs numpy 1")
    stamp_tmp = tmp / stamp.name
    stamp_tmp.write_text(wanted)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def servable(entry: ModelEntry) -> bool:
    """Models the local Triton serves; the rest (faiss, xgboost, tokenizers) stay in process."""
    return entry.ok and entry.kind in SERVABLE_KINDS and entry.config is not None


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _config_type(dtype: np.dtype) -> int:
    for value in mc.DataType.values():
        with contextlib.suppress(ValueError):
            if numpy_dtype(value) == dtype:
                return value
    raise ValueError(f"dtype {dtype} has no Triton data type")


def overlay_config(entry: ModelEntry, intra_op_threads: int) -> mc.ModelConfig:
    """The original config, served by the python backend: same tensors, batching and versions."""
    assert entry.config is not None
    config = mc.ModelConfig()
    config.CopyFrom(entry.config)
    config.ClearField("platform")
    config.backend = "python"
    config.ClearField("default_model_filename")
    config.ClearField("optimization")  # ORT execution accelerators mean nothing to the python backend
    config.ClearField("model_warmup")
    # GPU instance groups would not load here; one CPU instance, batching does the rest.
    config.ClearField("instance_group")
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["tessera_intra_op_threads"].string_value = str(intra_op_threads)
    if not config.input or not config.output:
        # The onnxruntime backend completes such configs from the model; the python one cannot.
        inputs, outputs = onnx_signature(entry.model_path())
        skip = 1 if config.max_batch_size > 0 else 0
        for declared, specs in ((config.input, inputs), (config.output, outputs)):
            if not declared:
                for spec in specs:
                    declared.add(
                        name=spec.name,
                        data_type=_config_type(spec.dtype),
                        dims=[-1 if d is None else d for d in spec.shape[skip:]],
                    )
    return config


def write_overlay(
    repository: ModelRepository, root: Path, site_packages: Path, intra_op_threads: int = 1
) -> tuple[Path, list[str]]:
    """The overlay repository for a model repository, under ``root/<content hash>``; reused when
    the repository's configs and model files have not changed."""
    entries = [e for e in repository.entries() if servable(e)]
    model_py = BACKEND_MODEL.read_text()
    batch_rows = BATCH_ROWS.read_text()
    settings = json.dumps({"site_packages": str(site_packages), "onnx": OVERLAY_ONNX}) + "\n"
    digest = hashlib.sha256(model_py.encode() + batch_rows.encode())
    digest.update(settings.encode())
    digest.update(f"threads={intra_op_threads}\n".encode())
    plans: list[tuple[ModelEntry, mc.ModelConfig, dict[int, Path]]] = []
    for entry in entries:
        config = overlay_config(entry, intra_op_threads)
        files = {
            v: (d / entry.model_filename).resolve()
            for v, d in entry.versions.items()
            if entry.model_filename and (d / entry.model_filename).is_file()
        }
        digest.update(f"\0{entry.name}\0".encode() + config_text(config).encode())
        for version, path in files.items():
            digest.update(f"\0{version}\0{path}\0".encode())
            _hash_file(digest, path)
        plans.append((entry, config, files))
    names = [e.name for e in entries]
    target = root / digest.hexdigest()[:16]
    _prune_overlays(root, keep=target)
    if (target / ".complete").exists():
        target.touch()  # in use: keeps it from pruning
        return target, names
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for entry, config, files in plans:
        model_dir = tmp / entry.name
        model_dir.mkdir(parents=True)
        # Not durable: the overlay is scratch, rebuilt from the repository when lost.
        write_atomic(model_dir / CONFIG_FILE, config_text(config), durable=False)
        for version, path in files.items():
            version_dir = model_dir / str(version)
            version_dir.mkdir()
            (version_dir / MODEL_PY).write_text(model_py)
            (version_dir / BATCH_ROWS.name).write_text(batch_rows)
            (version_dir / MODEL_SETTINGS).write_text(settings)
            # A link, not a copy: teachers weigh hundreds of MB. The hash above keys the content.
            (version_dir / OVERLAY_ONNX).symlink_to(path)
    (tmp / ".complete").write_text("\n".join(names) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target, names


def _prune_overlays(root: Path, keep: Path) -> None:
    """Delete overlays unused for a week (e.g. of test repositories in temporary directories)."""
    if not root.is_dir():
        return
    cutoff = time.time() - OVERLAY_MAX_AGE_SECONDS
    for overlay in root.iterdir():
        if overlay != keep and overlay.is_dir() and overlay.stat().st_mtime < cutoff:
            shutil.rmtree(overlay, ignore_errors=True)


def free_ports(host: str, count: int = 3) -> list[int]:
    """Ports free right now (all bound at once, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return "(no server log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: signal 0 would find them,
    and in a container whose init does not reap, orphaned backend stubs stay zombies."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stop_group(pgid: int, timeout: float, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM the server's process group (it and its backend stubs), SIGKILL what lingers.
    ``reap`` collects the leader when it is our child, so it does not linger as a zombie."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            if not _group_alive(pgid):
                return
            time.sleep(0.05)


class LocalTriton:
    """A tritonserver process over the overlay of ``repo``.

    ``prepare()`` is idempotent and cached; ``start()`` picks free ports (or reuses the last ones,
    so a test can restart the server where clients expect it) and returns once every model is
    ready; ``stop()`` always ends the server and its backend stubs.
    """

    def __init__(
        self,
        repo: Path | str,
        cache: Path | str,
        *,
        host: str = "127.0.0.1",
        intra_op_threads: int = 1,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.cache = Path(cache).resolve()
        self.root = self.cache / "triton"
        self.host = host
        self.intra_op_threads = intra_op_threads
        self.ready_timeout = ready_timeout
        self.ports: TritonPorts | None = None
        self.overlay: Path | None = None
        self.models: list[str] = []
        self.log_path: Path | None = None
        self._server: ServerFiles | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- preparation

    def prepare(self) -> Path:
        """Fetch and unpack the server, build the stub's site-packages, write the overlay."""
        with _file_lock(self.root / ".lock"):
            wheel = fetch_wheel(self.cache, "nvidia-pytriton", PYTRITON_VERSION)
            self._server = unpack_server(wheel, self.root / f"pytriton-{PYTRITON_VERSION}")
            site_packages = build_site_packages(self.root / "site-packages", find_stub_python())
            self.overlay, self.models = write_overlay(
                ModelRepository(self.repo), self.root / "overlays", site_packages, self.intra_op_threads
            )
        log.info("local triton: overlay %s serves %s", self.overlay, self.models)
        return self.overlay

    # -- process

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self._require_ports().grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self._require_ports().http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self._require_ports().metrics}/metrics"

    def _require_ports(self) -> TritonPorts:
        if self.ports is None:
            raise RuntimeError("the local Triton has not been started")
        return self.ports

    def start(self, ports: TritonPorts | Sequence[int] | None = None) -> TritonPorts:
        """Start the server and wait until it and every overlay model are ready.

        Ports: as given; else the ones of the previous start; else free ones (retried when another
        process takes one in between)."""
        if self.running:
            raise RuntimeError(f"the local Triton is already running (pid {self.pid})")
        if self.overlay is None or self._server is None:
            self.prepare()
        fixed = ports if ports is not None else self.ports
        attempts = 1 if fixed is not None else PORT_ATTEMPTS
        for attempt in range(attempts):
            chosen = TritonPorts(*(fixed if fixed is not None else free_ports(self.host)))
            try:
                self._launch(chosen)
                return chosen
            except _PortInUse:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"tritonserver could not bind {chosen}:\n{log_tail(self.log_path)}"
                    ) from None
        raise AssertionError("unreachable")

    def _launch(self, ports: TritonPorts) -> None:
        assert self._server is not None and self.overlay is not None
        server = self._server
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"tritonserver-{ports.grpc}.log"
        cmd = [
            str(server.binary),
            f"--model-repository={self.overlay}",
            f"--backend-directory={server.backends}",
            "--model-control-mode=explicit",
            *[f"--load-model={name}" for name in self.models],
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports.metrics}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
            # Unique shared-memory names: two local servers must not share the stubs' regions.
            f"--backend-config=python,shm-region-prefix-name=tessera_{os.getpid()}_{ports.grpc}",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(server.libs), os.environ.get("LD_LIBRARY_PATH")])
        )
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log_file.flush()
            # Own session: stop() signals the whole group, backend stubs included.
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.ports = ports
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        ready_url = f"{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                tail = log_tail(self.log_path)
                if "already in use" in tail or "Address in use" in tail:
                    raise _PortInUse()
                raise RuntimeError(
                    f"tritonserver exited with {code} before it was ready (log {self.log_path}):\n{tail}"
                )
            # Strict readiness (Triton's default): ready only once every loaded model is.
            if _http_ok(ready_url):
                log.info("local triton ready: grpc %s, pid %d", self.grpc_url, self._process.pid)
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"tritonserver not ready after {self.ready_timeout:.0f} s "
            f"(log {self.log_path}):\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop the server (graceful, then killed); safe to call twice. Ports are kept for restart."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None:
            return
        _stop_group(process.pid, timeout, process.poll)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1.0)

    def detach(self) -> None:
        """Leave the server running after this process exits (the CLI's ``start``)."""
        atexit.unregister(self.stop)
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortInUse(Exception):
    pass


# -- command line


def _state_path(cache: Path) -> Path:
    return cache.resolve() / "triton" / "local.json"


def _is_tritonserver(pid: int) -> bool:
    """Whether pid is still our server (not a recycled pid of something else)."""
    try:
        return b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _cmd_stop(cache: Path) -> int:
    state_path = _state_path(cache)
    if not state_path.exists():
        print("no local Triton recorded in", state_path)
        return 0
    state = json.loads(state_path.read_text())
    pid = int(state["pid"])
    if _is_tritonserver(pid):
        _stop_group(pid, STOP_TIMEOUT_SECONDS)
        print(f"stopped tritonserver pid {pid}")
    else:
        print(f"tritonserver pid {pid} is not running")
    state_path.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera-triton-dev", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["prepare", "start", "stop"])
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--grpc-port", type=int, default=0, help="0: the three ports are picked free")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--foreground", action="store_true", help="start: run until Ctrl-C")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "stop":
        return _cmd_stop(args.cache)
    triton = LocalTriton(args.repo, args.cache)
    started = time.monotonic()
    overlay = triton.prepare()
    print(
        f"overlay {overlay}: {', '.join(triton.models) or 'no models'} "
        f"(prepared in {time.monotonic() - started:.1f} s)"
    )
    if args.command == "prepare":
        return 0

    state_path = _state_path(args.cache)
    if state_path.exists():
        pid = json.loads(state_path.read_text()).get("pid", 0)
        if _is_tritonserver(int(pid)):
            print(f"a local Triton already runs (pid {pid}); stop it first", file=sys.stderr)
            return 1
    given = (args.grpc_port, args.http_port, args.metrics_port)
    ports = triton.start(TritonPorts(*given) if all(given) else None)
    print(
        f"tritonserver pid {triton.pid} ready: grpc {triton.grpc_url}  http {triton.http_url}  "
        f"metrics {triton.metrics_url}  log {triton.log_path}"
    )
    if args.foreground:
        try:
            while triton.running:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            triton.stop()
        return 0
    state_path.write_text(
        json.dumps(
            {
                "pid": triton.pid,
                "ports": list(ports),
                "repo": str(triton.repo),
                "overlay": str(overlay),
                "log": str(triton.log_path),
            }
        )
    )
    triton.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
