"""In-process ONNX Runtime backend: one session and one dynamic batcher per served model version.

Hot reload swaps a model's (session, batcher) pair in one assignment: requests already queued on
the old pair finish on it and report the old version, later ones go to the new pair, and the old
pair is closed once drained. A new version that fails to load leaves the old one serving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import Field

from services.runtime.backends.inprocess import InProcessBackend, InputSpec, Opened
from services.runtime.config import StrictModel
from services.runtime.errors import FailedPrecondition
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
        2, ge=0, description="Threads inside one operator (0 = ORT picks: all cores)."
    )
    inter_op_threads: int = Field(1, ge=0, description="Threads across operators (sequential mode: 1).")
    allow_spinning: bool = Field(
        False, description="Let idle ORT threads spin; off so they leave the cores to the event loop."
    )
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    use_gpu: Literal["auto", "never", "require"] = Field(
        "auto", description="auto: CUDA when a driver is really present; require: fail without one."
    )
    max_queue_size: int = Field(
        1024,
        gt=0,
        description="Queued requests per model beyond which requests are refused "
        "(the config's default_queue_policy.max_queue_size wins when set).",
    )


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
                f"load or onnxruntime lacks {CUDA} (available: {available})"
            )
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
    def specs(args: Sequence[ort.NodeArg]) -> list[TensorSpec]:
        return [
            TensorSpec(
                a.name,
                _ORT_TYPES.get(a.type, np.dtype(np.void)),
                tuple(d if isinstance(d, int) else None for d in a.shape),
            )
            for a in args
        ]

    return specs(session.get_inputs()), specs(session.get_outputs())


def input_specs(entry: ModelEntry, session: ort.InferenceSession) -> tuple[InputSpec, ...]:
    config = entry.config
    assert config is not None
    batched = config.max_batch_size > 0
    if config.input:
        return tuple(
            InputSpec(
                t.name,
                numpy_dtype(t.data_type),
                tuple([-1, *t.dims] if batched else t.dims) if not t.HasField("reshape") else (),
                t.optional,
            )
            for t in config.input
        )
    inputs, _ = session_signature(session)  # config without inputs: trust the model
    return tuple(
        InputSpec(s.name, s.dtype, tuple(-1 if d is None else d for d in s.shape), False) for s in inputs
    )


def is_onnx_entry(entry: ModelEntry) -> bool:
    """Models this backend serves; an unreadable config counts when its directory holds ONNX files."""
    if entry.config is None:
        return any(entry.path.glob("*/model.onnx"))
    platform: str = entry.config.platform
    backend: str = entry.config.backend
    return platform == ONNX_PLATFORM or backend == "onnxruntime"


class OnnxBackend(InProcessBackend):
    """Serves every ``onnxruntime_onnx`` model of a repository with ONNX Runtime, in process."""

    name = BACKEND_NAME
    kind = "an ONNX model"

    def __init__(
        self,
        repository: ModelRepository,
        config: OnnxConfig,
        metrics: Metrics,
        serves: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(repository, metrics, config.max_queue_size, serves)
        self.config = config
        self.providers = select_providers(config.use_gpu)
        self._options = session_options(config)

    def _owns(self, entry: ModelEntry) -> bool:
        return is_onnx_entry(entry)

    def _open(self, entry: ModelEntry) -> tuple[Opened | None, str | None]:
        """Create and check a session (runs in a worker thread)."""
        if entry.error is not None:
            return None, entry.error
        path = entry.model_path()
        try:
            session = ort.InferenceSession(str(path), sess_options=self._options, providers=self.providers)
        except Exception as exc:  # ORT raises its own types for corrupt files
            return None, f"{path}: onnxruntime cannot load it: {exc}"
        assert entry.config is not None and entry.version is not None
        problems = check_signature(entry.config, *session_signature(session))
        if problems:
            return None, f"{path}: does not match config.pbtxt: " + "; ".join(problems)
        outputs = [o.name for o in entry.config.output] or [o.name for o in session.get_outputs()]
        return Opened(
            entry.version,
            _runner(session, outputs),
            input_specs(entry, session),
            f"({', '.join(self.providers)})",
            session,
        ), None


def _runner(
    session: ort.InferenceSession, outputs: list[str]
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, inputs), strict=True))

    return run
