"""In-process ONNX Runtime backend: one session and one dynamic batcher per served model version.

Hot reload swaps a model's (session, batcher) pair in one assignment: requests already queued on
the old pair finish on it and report the old version, later ones go to the new pair, and the old
pair is closed once drained. A new version that fails to load leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import Field

from services.runtime.backends.base import InferResult, ModelStatus
from services.runtime.batching import BatchPolicy, DynamicBatcher
from services.runtime.config import StrictModel
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.metrics import Metrics
from services.runtime.repository import (
    ONNX_PLATFORM,
    ModelEntry,
    ModelRepository,
    TensorSpec,
    check_signature,
    numpy_dtype,
)

log = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_GRAPH_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}

_ORT_TYPES: Mapping[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(np.object_),
}


class OnnxConfig(StrictModel):
    intra_op_threads: int = Field(
        2, ge=0, description="Threads inside one operator (0 = ORT picks: all cores).")
    inter_op_threads: int = Field(1, ge=0, description="Threads across operators (sequential mode: 1).")
    allow_spinning: bool = Field(
        False, description="Let idle ORT threads spin; off so they leave the cores to the event loop.")
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    use_gpu: Literal["auto", "never", "require"] = Field(
        "auto", description="auto: CUDA when a driver is really present; require: fail without one.")
    max_queue_size: int = Field(
        1024, gt=0, description="Queued requests per model beyond which requests are refused "
        "(the config's default_queue_policy.max_queue_size wins when set).")


def cuda_driver_present() -> bool:
    """Whether the CUDA driver loads. The onnxruntime-gpu wheel lists CUDA as available anyway."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def select_providers(
    use_gpu: str,
    available: Sequence[str] | None = None,
    driver_present: Callable[[], bool] = cuda_driver_present,
) -> list[str]:
    """Execution providers to ask for, best first; only the CPU one when no GPU is really there
    (a session asked for CUDA without a driver logs errors on every load)."""
    if use_gpu == "never":
        return [CPU]
    available = ort.get_available_providers() if available is None else list(available)
    has_gpu = CUDA in available and driver_present()
    if not has_gpu:
        if use_gpu == "require":
            raise FailedPrecondition(
                "use_gpu is 'require' but no usable GPU: the CUDA driver (libcuda.so.1) does not "
                f"load or onnxruntime lacks {CUDA} (available: {available})")
        return [CPU]
    providers = [CUDA, CPU]
    if TENSORRT in available and ctypes.util.find_library("nvinfer"):
        providers.insert(0, TENSORRT)
    return providers


def session_options(config: OnnxConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.intra_op_threads
    opts.inter_op_num_threads = config.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _GRAPH_LEVELS[config.graph_optimization]
    spin = "1" if config.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts


def session_signature(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def specs(args: Sequence) -> list[TensorSpec]:
        return [TensorSpec(a.name, _ORT_TYPES.get(a.type, np.dtype(np.void)),
                           tuple(d if isinstance(d, int) else None for d in a.shape)) for a in args]

    return specs(session.get_inputs()), specs(session.get_outputs())


def batch_policy(entry: ModelEntry, default_queue_size: int) -> BatchPolicy:
    """The batching a model's config asks for: none without ``dynamic_batching``."""
    config = entry.config
    assert config is not None
    dynamic = config.HasField("dynamic_batching") and config.max_batch_size > 0
    db = config.dynamic_batching
    queue_size = db.default_queue_policy.max_queue_size if dynamic else 0
    return BatchPolicy(
        max_batch_size=config.max_batch_size,
        dynamic=dynamic,
        preferred_batch_sizes=tuple(p for p in db.preferred_batch_size if p <= config.max_batch_size),
        max_queue_delay_microseconds=db.max_queue_delay_microseconds if dynamic else 0,
        max_queue_size=queue_size or default_queue_size,
    )


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # -1 = any; includes the batch axis (as -1) when the model batches
    optional: bool


@dataclass(frozen=True)
class _Served:
    entry: ModelEntry
    version: int
    session: ort.InferenceSession
    batcher: DynamicBatcher
    inputs: tuple[_InputSpec, ...]


def _input_specs(entry: ModelEntry, session: ort.InferenceSession) -> tuple[_InputSpec, ...]:
    config = entry.config
    assert config is not None
    batched = config.max_batch_size > 0
    if config.input:
        return tuple(_InputSpec(
            t.name, numpy_dtype(t.data_type),
            tuple([-1, *t.dims] if batched else t.dims) if not t.HasField("reshape") else (),
            t.optional) for t in config.input)
    inputs, _ = session_signature(session)  # config without inputs: trust the model
    return tuple(_InputSpec(s.name, s.dtype, tuple(-1 if d is None else d for d in s.shape), False)
                 for s in inputs)


def check_request(model: str, specs: Sequence[_InputSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Validate a request against the model's inputs before it is queued (InvalidArgument)."""
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise InvalidArgument(f"model '{model}' has no inputs {unknown}; it takes {sorted(known)}")
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            if spec.optional:
                continue
            raise InvalidArgument(f"model '{model}' needs input '{spec.name}'")
        if not isinstance(array, np.ndarray):
            raise InvalidArgument(f"input '{spec.name}' of model '{model}' is not a numpy array")
        if array.dtype != spec.dtype:
            raise InvalidArgument(
                f"input '{spec.name}' of model '{model}' must be {spec.dtype}, got {array.dtype}")
        if not spec.dims:
            continue  # reshaped input: its shape is checked by the model
        if array.ndim != len(spec.dims) or any(
                d != -1 and d != s for d, s in zip(spec.dims, array.shape, strict=True)):
            raise InvalidArgument(
                f"input '{spec.name}' of model '{model}' has shape {list(array.shape)}, "
                f"expected {list(spec.dims)} (-1 = any)")


def is_onnx_entry(entry: ModelEntry) -> bool:
    """Models this backend serves; an unreadable config counts when its directory holds ONNX files."""
    if entry.config is None:
        return any(entry.path.glob("*/model.onnx"))
    return entry.config.platform == ONNX_PLATFORM or entry.config.backend == "onnxruntime"


class OnnxBackend:
    """Serves every ``onnxruntime_onnx`` model of a repository with ONNX Runtime, in process."""

    name = BACKEND_NAME

    def __init__(self, repository: ModelRepository, config: OnnxConfig, metrics: Metrics) -> None:
        self.repository = repository
        self.config = config
        self.metrics = metrics
        self.providers = select_providers(config.use_gpu)
        self._options = session_options(config)
        self._served: dict[str, _Served] = {}
        self._errors: dict[str, str] = {}  # why a model (or its newest version) is not served
        self._applied: dict[str, tuple] = {}  # repository fingerprint each model was loaded from
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            for entry in self.repository.entries():
                if is_onnx_entry(entry):
                    await self._apply(entry)
        log.info("onnxruntime backend: %d models ready, %d broken, providers %s",
                 len(self._served), len(set(self._errors) - set(self._served)), self.providers)

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferResult:
        served = self._served.get(model)
        if served is None:
            if model in self._errors:
                raise FailedPrecondition(f"model '{model}' is not loaded: {self._errors[model]}")
            raise NotFound(f"model '{model}' is not an ONNX model of the repository "
                           f"{self.repository.root}")
        check_request(model, served.inputs, inputs)
        # `served` is bound before the await: this request finishes on this version even if a
        # reload swaps in a newer one meanwhile.
        outputs = await served.batcher.submit(inputs)
        return InferResult(outputs, model, served.version, BACKEND_NAME)

    def models(self) -> list[ModelStatus]:
        out = []
        for name in sorted(set(self._served) | set(self._errors)):
            served = self._served.get(name)
            if served is not None:
                out.append(ModelStatus(name, served.version, BACKEND_NAME, True, self._errors.get(name),
                                       tuple(served.entry.versions)))
            else:
                entry = self.repository.get(name) if name in self.repository else None
                out.append(ModelStatus(name, entry.version if entry else None, BACKEND_NAME, False,
                                       self._errors[name], tuple(entry.versions) if entry else ()))
        return out

    async def load(self, model: str) -> ModelStatus:
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self.repository.rescan)
            entry = self.repository.get(model)
            if not is_onnx_entry(entry):
                raise NotFound(f"model '{model}' of {self.repository.root} is not an ONNX model")
            await self._apply(entry)
        return next(s for s in self.models() if s.name == model)

    async def reload(self) -> list[str]:
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self.repository.rescan)
            mine = {e.name: e for e in self.repository.entries() if is_onnx_entry(e)}
            changed = [n for n, e in mine.items() if self._applied.get(n) != e.fingerprint]
            for name in changed:
                await self._apply(mine[name])
            removed = [n for n in self._applied if n not in mine]
            for name in removed:
                await self._unload(name)
        if changed or removed:
            log.info("onnxruntime backend reloaded: changed %s, removed %s", changed, removed)
        return changed + removed

    async def close(self) -> None:
        async with self._lock:
            for name in list(self._applied):
                await self._unload(name)

    # -- internals

    async def _apply(self, entry: ModelEntry) -> None:
        """Load an entry and swap it in; on failure keep any version already serving."""
        self._applied[entry.name] = entry.fingerprint
        error = entry.error
        session = None
        if error is None:
            loop = asyncio.get_running_loop()
            session, error = await loop.run_in_executor(None, self._open, entry)
        if error is not None:
            self._errors[entry.name] = error
            if entry.name in self._served:
                log.error("model %s: new version not loaded, version %d keeps serving: %s",
                          entry.name, self._served[entry.name].version, error)
            else:
                log.error("model %s not loaded: %s", entry.name, error)
            return
        assert session is not None and entry.version is not None and entry.config is not None
        outputs = [o.name for o in entry.config.output] or [o.name for o in session.get_outputs()]
        batcher = DynamicBatcher(entry.name, _runner(session, outputs),
                                 batch_policy(entry, self.config.max_queue_size), self.metrics,
                                 entry.version, BACKEND_NAME)
        new = _Served(entry, entry.version, session, batcher, _input_specs(entry, session))
        old = self._served.get(entry.name)
        self._served[entry.name] = new  # the swap: one assignment on the event loop
        self._errors.pop(entry.name, None)
        log.info("model %s version %d loaded", entry.name, entry.version)
        if old is not None:
            await old.batcher.close()  # drains what was queued on the old version

    async def _unload(self, name: str) -> None:
        self._applied.pop(name, None)
        self._errors.pop(name, None)
        old = self._served.pop(name, None)
        if old is not None:
            await old.batcher.close()

    def _open(self, entry: ModelEntry) -> tuple[ort.InferenceSession | None, str | None]:
        """Create and check a session (runs in a worker thread)."""
        path = entry.model_path()
        try:
            session = ort.InferenceSession(str(path), sess_options=self._options,
                                           providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for corrupt files
            return None, f"{path}: onnxruntime cannot load it: {exc}"
        assert entry.config is not None
        problems = check_signature(entry.config, *session_signature(session))
        if problems:
            return None, f"{path}: does not match config.pbtxt: " + "; ".join(problems)
        return session, None


def _runner(session: ort.InferenceSession, outputs: list[str]) -> Callable[[dict[str, np.ndarray]],
                                                                           dict[str, np.ndarray]]:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, inputs), strict=True))

    return run
