"""What the pretrained emotion classifiers share once converted (the student, facex, PyEmotion):
their config, their model directory and the real faces their conversions are proved on
(docs/models.md).

Each is a `<repo>/<name>/` of config.pbtxt, version 1's model.onnx (grey crop in, `logits` out, in
`services.fusion.emotion.CLASS_NAMES` order) and preprocess.json, built once per content key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from services.fusion.emotion import CLASS_NAMES
from services.runtime.model_files import IR_VERSION, OPSET, Batching, ModelSpec, Tensor
from tools.builders.build_key import is_built, write_built

ONNX_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
# The conversion gate: max |served - numpy reference| over the logits of the gate faces.
GATE_ATOL = 1e-4


class ConversionError(RuntimeError):
    """The converted graph does not reproduce its reference: nothing is written."""


def member_preprocess(input_size: tuple[int, int], mean: float, std: float) -> dict:
    """A member's preprocess.json: the grey crop resized (linear) to `input_size`, x/255 then
    (x - mean) / std, NCHW, logits in CLASS_NAMES order at temperature 1."""
    return {
        "input_name": "input",
        "output_name": "logits",
        "input_size": list(input_size),
        "color": "gray",
        "layout": "NCHW",
        "clahe": None,
        "interpolation": "linear",
        "mean": [mean],
        "std": [std],
        "temperature": 1.0,
        "class_names": list(CLASS_NAMES),
    }


def member_model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    graph_name: str,
    input_size: tuple[int, int],
    producer: str,
    source: str,
    **props: str,
) -> onnx.ModelProto:
    """A member's graph as a checked ONNX model: grey crops `input` [N, 1, *input_size] in, `logits`
    [N, 7] out, the repository's opset and IR, `source` and `class_names` (then `props`) among its
    metadata."""
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, *input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASS_NAMES)])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"source": source, "class_names": json.dumps(CLASS_NAMES), **props})
    onnx.checker.check_model(model, full_check=True)
    return model


def member_spec(
    name: str, input_dims: tuple[int, ...], max_batch: int, preferred: tuple[int, ...], source: str
) -> ModelSpec:
    """A member's config: one FP32 input `input`, one output `logits` (a score per class),
    dynamic batching."""
    return ModelSpec(
        name=name,
        max_batch_size=max_batch,
        inputs=[Tensor("input", input_dims)],
        outputs=[Tensor("logits", (len(CLASS_NAMES),))],
        batching=Batching(preferred=preferred, max_queue_delay_us=2000),
        parameters={"demo": "false", "source": source},
    )


def write_member(
    repo: Path, name: str, key: str, convert: Callable[[], onnx.ModelProto], preprocess: dict, spec: ModelSpec
) -> Path:
    """Write `<repo>/<name>/` (config, version 1's ONNX and preprocess.json) from `convert()` (which
    builds and gates the graph), unless the directory was already built with the same `key`."""
    model_dir = Path(repo) / name
    if is_built(model_dir, key, (ONNX_FILE, PREPROCESS_FILE)):
        return model_dir
    model = convert()
    return write_built(
        model_dir,
        key,
        spec,
        {ONNX_FILE: model.SerializeToString(), PREPROCESS_FILE: json.dumps(preprocess, indent=2) + "\n"},
    )


def check_gate(name: str, model: onnx.ModelProto, batch: np.ndarray, expected: np.ndarray) -> float:
    """max |served - expected| over the logits ONNX Runtime gives `model` on `batch`;
    ConversionError above GATE_ATOL."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    served = session.run(["logits"], {"input": batch})[0].astype(np.float64)
    diff = float(np.max(np.abs(served - expected)))
    if not diff <= GATE_ATOL:
        raise ConversionError(
            f"{name}: ONNX differs from the numpy reference by {diff:.3g} (gate {GATE_ATOL}); nothing written"
        )
    return diff


def gate_batch(preprocess: dict) -> np.ndarray:
    """The gate faces as a member's input, preprocessed as the service will (`preprocess`)."""
    from services.vision.preprocess import PreprocessParams, preprocess_faces

    return preprocess_faces(gate_crops(), PreprocessParams.model_validate(preprocess))


def gate_crops() -> list[np.ndarray]:
    """Real faces the builds prove their conversions on: the astronaut's face (skimage, public
    domain) and the first four faces of skimage's LFW subset, as BGR uint8 crops."""
    astronaut = cv2.cvtColor(_skimage_data().astronaut(), cv2.COLOR_RGB2BGR)
    crops = [np.ascontiguousarray(astronaut[50:290, 140:380])]
    for face in _skimage_data().lfw_subset()[:4]:
        gray = np.clip(np.round(face * 255.0), 0, 255).astype(np.uint8)
        crops.append(
            cv2.cvtColor(cv2.resize(gray, (96, 96), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
        )
    return crops


def _skimage_data():
    from skimage import data

    return data
