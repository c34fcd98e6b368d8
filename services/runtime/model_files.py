"""Writing a model into the repository: one way for every builder, exporter and trainer.

A model directory is `<repo>/<name>/config.pbtxt` plus `<repo>/<name>/<version>/<files>`. The
config is built as Triton's own `ModelConfig` message and printed with protobuf's text format, so
it is valid by construction and reads back into exactly what was written; nothing formats
`config.pbtxt` by hand. Every file is written atomically (temporary file, fsync, rename), so a
service that rescans the repository while a builder runs never sees half a file.

The ONNX constants live here because every writer stamps them: opset 17 with IR version 8, what
that opset shipped with (older ONNX Runtime builds refuse newer IR stamps, so an exporter's
default IR would not load everywhere the opset does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.repository import CONFIG_FILE, ONNX_PLATFORM

OPSET = 17
IR_VERSION = 8


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model config: name, element type (`mc.TYPE_*`) and dims."""

    name: str
    dims: Sequence[int]
    data_type: int = mc.TYPE_FP32


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batching: sizes the scheduler prefers and how long it may wait for them."""

    preferred: Sequence[int] = ()
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """What a `config.pbtxt` says: how the model is run, its tensors, batching and parameters.

    Exactly one of `platform` and `backend` is set (Triton's two ways of naming what runs it).
    `parameters` are free-form strings the services read (`demo`, `source`, `kind`, ...).
    """

    name: str
    inputs: Sequence[Tensor] = ()
    outputs: Sequence[Tensor] = ()
    platform: str = ONNX_PLATFORM
    backend: str = ""
    max_batch_size: int = 0
    batching: Batching | None = None
    default_model_filename: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)


def model_config(spec: ModelSpec) -> mc.ModelConfig:
    """The `ModelConfig` message `spec` describes."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if spec.backend:
        config.backend = spec.backend
    else:
        config.platform = spec.platform
    if spec.default_model_filename:
        config.default_model_filename = spec.default_model_filename
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
    if spec.batching is not None:
        config.dynamic_batching.preferred_batch_size.extend(spec.batching.preferred)
        config.dynamic_batching.max_queue_delay_microseconds = spec.batching.max_queue_delay_us
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    return config


def config_text(spec: ModelSpec | mc.ModelConfig) -> str:
    """`spec` in protobuf text format, as `config.pbtxt` holds it."""
    config = spec if isinstance(spec, mc.ModelConfig) else model_config(spec)
    return text_format.MessageToString(config)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a part.

    `durable` also fsyncs the file and its directory, so the new content survives a power cut
    (what output a client was told is written must be); scratch files may skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, interrupted) leaves nothing behind
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_config(model_dir: Path, spec: ModelSpec | mc.ModelConfig) -> Path:
    """Write `model_dir/config.pbtxt` for `spec`; returns its path."""
    path = Path(model_dir) / CONFIG_FILE
    write_atomic(path, config_text(spec))
    return path
