"""The local Triton's python-backend model (tools/devtriton/backend_model.py) without Triton.

`write_overlay` lays out an overlay as `prepare` does; its `model.py` is then imported with a fake
`triton_python_backend_utils` (the real one exists only inside the server's backend stub) and its
`execute` is held against ONNX Runtime run directly on each request: merged requests must come back
split exactly as if each had run alone, and a bad request must fail alone.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from onnx import TensorProto, helper, numpy_helper

from services.runtime.model_files import IR_VERSION, OPSET, Batching, ModelSpec, Tensor, write_config
from services.runtime.repository import ModelRepository
from tools.devtriton.local import MODEL_PY, write_overlay

DIN, DOUT = 4, 3


# ------------------------------------------------------------------ the fake triton_python_backend_utils


@dataclass
class FakeTensor:
    name: str
    array: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.array


@dataclass
class FakeRequest:
    inputs: dict[str, np.ndarray]


@dataclass
class FakeResponse:
    output_tensors: list[FakeTensor]
    error: Any = None

    def outputs(self) -> dict[str, np.ndarray]:
        return {t.name: t.array for t in self.output_tensors}


class FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        self.message, self.code = message, code


def fake_pb_utils() -> ModuleType:
    module = ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.TritonError = FakeError  # type: ignore[attr-defined]

    def get_input_tensor_by_name(request: FakeRequest, name: str) -> FakeTensor | None:
        return FakeTensor(name, request.inputs[name]) if name in request.inputs else None

    module.get_input_tensor_by_name = get_input_tensor_by_name  # type: ignore[attr-defined]
    return module


# ------------------------------------------------------------------ a repository, its overlay, the model


def write_linear(repo: Path, name: str, max_batch_size: int) -> None:
    """y = tanh(x @ W + b) and s = sum(x): two outputs, so the split is checked on both."""
    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Tanh", ["z"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axis"], ["s"], keepdims=1),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIN])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DOUT]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((DIN, DOUT)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(DOUT).astype(np.float32), "b"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    batched = max_batch_size > 0
    write_config(
        repo / name,
        ModelSpec(
            name=name,
            max_batch_size=max_batch_size,
            inputs=[Tensor("x", (DIN,) if batched else (-1, DIN))],
            outputs=[
                Tensor("y", (DOUT,) if batched else (-1, DOUT)),
                Tensor("s", (1,) if batched else (-1, 1)),
            ],
            batching=Batching(max_queue_delay_us=1000) if batched else None,
        ),
    )


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ModelRepository]:
    root = tmp_path_factory.mktemp("python_backend")
    repo = root / "repo"
    write_linear(repo, "batched", 8)
    write_linear(repo, "unbatched", 0)
    repository = ModelRepository(repo)
    site_packages = root / "site-packages"
    site_packages.mkdir()
    target, names = write_overlay(repository, root / "overlays", site_packages)
    assert sorted(names) == ["batched", "unbatched"]
    return target, site_packages, repository


class CountingSession:
    """The model's session, counting runs; `fail_merged` makes a run of more than one request's
    rows fail, as a merged run may."""

    def __init__(self, session: ort.InferenceSession, fail_merged: int = 0) -> None:
        self.session, self.runs, self.fail_merged = session, [], fail_merged

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs.append(len(next(iter(feed.values()))))
        if self.fail_merged and len(feed["x"]) > self.fail_merged:
            raise RuntimeError("merged run failed")
        return self.session.run(names, feed)


def load_model(
    overlay: tuple[Path, Path, ModelRepository], name: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The overlay's model.py of `name`, imported and initialised as the backend stub would."""
    target, site_packages, repository = overlay
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import prepends the stub's site-packages
    version_dir = target / name / "1"
    spec = importlib.util.spec_from_file_location(f"overlay_{name}_model", version_dir / MODEL_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sys.path[0] == str(site_packages)

    config = ModelRepository(target).get(name).config
    assert config is not None and config.backend == "python"
    assert config.max_batch_size == repository.get(name).config.max_batch_size  # type: ignore[union-attr]
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_name": name,
            "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        }
    )
    return model


def direct(repository: ModelRepository, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The original ONNX file run directly by ONNX Runtime on one request."""
    session = ort.InferenceSession(str(repository.get(name).model_path()), providers=["CPUExecutionProvider"])
    return dict(zip(["y", "s"], session.run(["y", "s"], {"x": x}), strict=True))


def requests(*rows: int, seed: int = 0) -> list[FakeRequest]:
    rng = np.random.default_rng(seed)
    return [FakeRequest({"x": rng.standard_normal((n, DIN)).astype(np.float32)}) for n in rows]


# ------------------------------------------------------------------ the tests


def test_merged_requests_run_once_and_split_as_if_each_ran_alone(overlay, monkeypatch) -> None:
    model = load_model(overlay, "batched", monkeypatch)
    model.session = counting = CountingSession(model.session)
    batch = requests(1, 3, 2)
    responses = model.execute(batch)
    assert counting.runs == [6]  # one run over all rows
    for request, response in zip(batch, responses, strict=True):
        assert response.error is None
        want = direct(overlay[2], "batched", request.inputs["x"])
        got = response.outputs()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].shape == want[key].shape
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6)


def test_a_bad_request_fails_alone(overlay, monkeypatch) -> None:
    model = load_model(overlay, "batched", monkeypatch)
    model.session = counting = CountingSession(model.session)
    good = requests(2, 1, seed=1)
    wrong_width = FakeRequest({"x": np.zeros((2, DIN + 1), np.float32)})
    missing = FakeRequest({})
    responses = model.execute([good[0], wrong_width, missing, good[1]])
    assert counting.runs == [2, 2, 1]  # not mergeable: request by request, the missing one never runs
    assert responses[1].error.code == FakeError.INVALID_ARG and not responses[1].output_tensors
    assert (
        responses[2].error.code == FakeError.INVALID_ARG and "needs input 'x'" in responses[2].error.message
    )
    for request, response in ((good[0], responses[0]), (good[1], responses[3])):
        assert response.error is None
        np.testing.assert_allclose(
            response.outputs()["y"],
            direct(overlay[2], "batched", request.inputs["x"])["y"],
            rtol=0,
            atol=1e-6,
        )


def test_a_failed_merged_run_falls_back_to_one_run_per_request(overlay, monkeypatch) -> None:
    model = load_model(overlay, "batched", monkeypatch)
    model.session = counting = CountingSession(model.session, fail_merged=3)
    batch = requests(2, 3, seed=2)
    responses = model.execute(batch)
    assert counting.runs == [5, 2, 3]
    for request, response in zip(batch, responses, strict=True):
        assert response.error is None
        np.testing.assert_allclose(
            response.outputs()["s"],
            direct(overlay[2], "batched", request.inputs["x"])["s"],
            rtol=0,
            atol=1e-6,
        )


def test_a_model_without_batching_runs_each_request_alone(overlay, monkeypatch) -> None:
    model = load_model(overlay, "unbatched", monkeypatch)
    model.session = counting = CountingSession(model.session)
    batch = requests(2, 2, seed=3)
    responses = model.execute(batch)
    assert counting.runs == [2, 2]
    for request, response in zip(batch, responses, strict=True):
        np.testing.assert_allclose(
            response.outputs()["y"],
            direct(overlay[2], "unbatched", request.inputs["x"])["y"],
            rtol=0,
            atol=1e-6,
        )


def test_the_overlay_holds_the_module_and_its_settings(overlay) -> None:
    target, site_packages, repository = overlay
    version_dir = target / "batched" / "1"
    assert (version_dir / MODEL_PY).read_text() == (
        Path(__file__).resolve().parents[2] / "tools" / "devtriton" / "backend_model.py"
    ).read_text()
    settings = json.loads((version_dir / "model.json").read_text())
    assert settings == {"site_packages": str(site_packages), "onnx": "model.onnx"}
    assert (version_dir / "model.onnx").resolve() == repository.get("batched").model_path().resolve()
