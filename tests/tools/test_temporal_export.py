"""`tessera-export temporal`: a temporal engagement network already in ONNX, checked
(clip in, affect × level probabilities out) and served as ONNX Runtime runs it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from services.vision.preprocess import PreprocessParams
from tools.modeller.export.__main__ import main as export_main

FRAMES, SIZE = 30, 64
PARAMS = PreprocessParams(
    input_name="frames",
    output_name="probabilities",
    input_size=(SIZE, SIZE),
    color="gray",
    mean=(0.5,),
    std=(0.25,),
    class_names=("very low", "low", "high", "very high"),
)


def _network(path: Path, softmax: bool = True, out_shape: tuple[int, int] = (4, 4)) -> Path:
    """A tiny clip network: the mean over time of each pixel, a corner of it as 'logits' → softmax."""
    nodes = [
        helper.make_node("ReduceMean", ["frames"], ["per_pixel"], axes=[1, 2], keepdims=0),
        helper.make_node("Slice", ["per_pixel", "starts", "ends", "axes_hw"], ["logits"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["probabilities"]))
    inits = [
        helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [2], list(out_shape)),
        helper.make_tensor("axes_hw", TensorProto.INT64, [2], [1, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "clip",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", FRAMES, 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", *out_shape])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _preprocess(path: Path, params: PreprocessParams = PARAMS) -> Path:
    path.write_text(params.model_dump_json())
    return path


def _export(tmp_path: Path, model: Path, preprocess: Path, *extra: str) -> int:
    return export_main(
        [
            "temporal",
            "--model",
            str(model),
            "--preprocess",
            str(preprocess),
            "--repo",
            str(tmp_path / "repo"),
            *extra,
        ]
    )


def test_exported_network_is_served_as_onnx_runtime_runs_it(tmp_path: Path) -> None:
    model = _network(tmp_path / "net.onnx")
    assert _export(tmp_path, model, _preprocess(tmp_path / "pre.json")) == 0
    clips = np.random.default_rng(0).standard_normal((3, FRAMES, 1, SIZE, SIZE)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"frames": clips})[
        0
    ]

    async def served() -> np.ndarray:
        backend = OnnxBackend(ModelRepository(tmp_path / "repo"), OnnxConfig(), Metrics("test"))
        await backend.start()
        try:
            return (await backend.infer("engagement_temporal", {"frames": clips})).outputs["probabilities"]
        finally:
            await backend.close()

    np.testing.assert_allclose(asyncio.run(served()), want, atol=1e-6)
    stored = PreprocessParams.model_validate_json(
        (tmp_path / "repo" / "engagement_temporal" / "1" / "preprocess.json").read_text()
    )
    assert stored == PARAMS


def test_networks_the_service_cannot_use_are_refused(tmp_path: Path, capsys) -> None:
    pre = _preprocess(tmp_path / "pre.json")
    assert _export(tmp_path, _network(tmp_path / "logits.onnx", softmax=False), pre) == 1
    assert "softmax" in capsys.readouterr().err
    assert _export(tmp_path, _network(tmp_path / "seven.onnx", out_shape=(1, 7)), pre) == 1
    assert "affect × level" in capsys.readouterr().err
    bigger = _preprocess(tmp_path / "pre96.json", PARAMS.model_copy(update={"input_size": (96, 96)}))
    assert _export(tmp_path, _network(tmp_path / "net.onnx"), bigger) == 1
    assert "[1, 64, 64]" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert _export(tmp_path, tmp_path / "junk.onnx", pre) == 1
    assert not (tmp_path / "repo" / "engagement_temporal").exists()
    (tmp_path / "bad.json").write_text("{}")
    assert _export(tmp_path, _network(tmp_path / "net.onnx"), tmp_path / "bad.json") == 2
