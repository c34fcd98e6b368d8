"""Small real ONNX models (onnx.helper) in a Triton-layout repository, for the backend tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIN, DOUT = 4, 3
_RNG = np.random.default_rng(7)
W = _RNG.standard_normal((DIN, DOUT)).astype(np.float32)


B = _RNG.standard_normal((DOUT,)).astype(np.float32)


CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {din} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {dout} ] }} ]
{batching}
"""


BATCHING = "dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 20000 }"


def save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def linear_graph(w: np.ndarray, b: np.ndarray) -> onnx.GraphProto:
    """y = x @ W + b with a dynamic batch axis."""
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )


def add_model(
    root: Path,
    name: str,
    graph: onnx.GraphProto | None,
    version: int = 1,
    din: int = DIN,
    dout: int = DOUT,
    batching: str = BATCHING,
) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(CONFIG.format(name=name, din=din, dout=dout, batching=batching))
    (d / str(version)).mkdir(exist_ok=True)
    if graph is not None:
        save(graph, d / str(version) / "model.onnx")
    return d
