"""The Triton backend against the real tritonserver (tools.devtriton.local), compared with the
in-process ONNX Runtime backend on the same models and inputs.

The first run downloads the pytriton wheel and builds the stub's site-packages under .cache
(about half a minute); later runs reuse them and start the server in a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.emotion.config import EmotionConfig
from services.emotion.pipeline import EmotionPipeline
from services.runtime.backends import Backend
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.backends.triton import TritonBackend, TritonConfig
from services.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from tools.builders.fer_student import MODEL_NAME as STUDENT
from tools.builders.fer_student import build_fer_student
from tools.devtriton.local import LocalTriton

pytestmark = pytest.mark.triton

CACHE = Path(__file__).resolve().parents[2] / ".cache"
LINEAR = "linear"
DIN, DOUT = 16, 5
TOLERANCE = 1e-5
STUDENT_SHAPE = (1, 64, 64)

LINEAR_CONFIG = f"""
name: "{LINEAR}"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {DIN} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {DOUT} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""


def write_linear(root: Path) -> None:
    """y = tanh(x @ W + b), batch axis dynamic."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((DIN, DOUT)).astype(np.float32)
    b = rng.standard_normal((DOUT,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Tanh", ["z"], ["y"]),
        ],
        LINEAR,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DOUT])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the stub's onnxruntime 1.20 reads
    (root / LINEAR / "1").mkdir(parents=True)
    (root / LINEAR / "config.pbtxt").write_text(LINEAR_CONFIG)
    onnx.save(model, str(root / LINEAR / "1" / "model.onnx"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton_repository")
    write_linear(root)
    build_fer_student(root, CACHE)
    # A kind Triton does not serve here: it must stay out of the overlay.
    (root / "knn" / "1").mkdir(parents=True)
    (root / "knn" / "config.pbtxt").write_text('name: "knn"\nbackend: "faiss"\n')
    (root / "knn" / "1" / "index.faiss").write_bytes(b"not served by triton")
    return root


@pytest.fixture(scope="module")
def triton(repo: Path) -> Iterator[LocalTriton]:
    server = LocalTriton(repo, CACHE)
    server.prepare()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def inputs_for(model: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if model == LINEAR:
        return {"x": rng.standard_normal((rows, DIN)).astype(np.float32)}
    return {"input": rng.uniform(-1, 1, (rows, *STUDENT_SHAPE)).astype(np.float32)}


@pytest.fixture
async def local(repo: Path) -> AsyncIterator[OnnxBackend]:
    backend = OnnxBackend(ModelRepository(repo), OnnxConfig(use_gpu="never"), Metrics("test"))
    await backend.start()
    yield backend
    await backend.close()


@pytest.fixture
async def remote(repo: Path, triton: LocalTriton) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(
        ModelRepository(repo), TritonConfig(url=triton.grpc_url, timeout_seconds=10), Metrics("test")
    )
    await backend.start()
    yield backend
    await backend.close()


def test_overlay_holds_only_onnx_models(triton: LocalTriton) -> None:
    assert sorted(triton.models) == sorted([STUDENT, LINEAR])
    assert triton.overlay is not None and not (triton.overlay / "knn").exists()
    assert 'backend: "python"' in (triton.overlay / LINEAR / "config.pbtxt").read_text()


async def test_is_a_backend_and_reports_models(remote: TritonBackend) -> None:
    assert isinstance(remote, Backend)
    status = {s.name: s for s in remote.models()}
    assert set(status) == {STUDENT, LINEAR}
    assert all(
        s.ready and s.version == 1 and s.versions == (1,) and s.backend == "triton" for s in status.values()
    ), status


@pytest.mark.parametrize("model", [LINEAR, STUDENT])
@pytest.mark.parametrize("rows", [1, 8])
async def test_outputs_equal_in_process(
    model: str, rows: int, local: OnnxBackend, remote: TritonBackend
) -> None:
    inputs = inputs_for(model, rows, seed=rows)
    want = await local.infer(model, inputs)
    got = await remote.infer(model, inputs)
    assert got.backend == "triton" and got.model == model and got.version == 1
    assert set(got.outputs) == set(want.outputs)
    for name, expected in want.outputs.items():
        assert got.outputs[name].shape == expected.shape == (rows, DOUT if model == LINEAR else 7)
        assert got.outputs[name].dtype == expected.dtype
        np.testing.assert_allclose(got.outputs[name], expected, rtol=0, atol=TOLERANCE)


async def test_concurrent_requests_all_correct(local: OnnxBackend, remote: TritonBackend) -> None:
    requests = [(STUDENT if i % 2 else LINEAR, 1 + i % 5, i) for i in range(40)]
    payloads = [inputs_for(model, rows, seed) for model, rows, seed in requests]
    got = await asyncio.gather(*(remote.infer(m, p) for (m, _, _), p in zip(requests, payloads, strict=True)))
    for (model, rows, _), payload, result in zip(requests, payloads, got, strict=True):
        want = await local.infer(model, payload)
        name = next(iter(want.outputs))
        assert result.outputs[name].shape[0] == rows
        np.testing.assert_allclose(result.outputs[name], want.outputs[name], rtol=0, atol=TOLERANCE)


async def test_inference_is_timed(remote: TritonBackend) -> None:
    await remote.infer(LINEAR, inputs_for(LINEAR, 2))
    text = remote.metrics.registry.get_sample_value(
        "tessera_model_inference_seconds_count", {"model": LINEAR, "version": "1", "backend": "triton"}
    )
    assert text is not None and text >= 1


async def test_triton_metrics_endpoint(triton: LocalTriton, remote: TritonBackend) -> None:
    await remote.infer(STUDENT, inputs_for(STUDENT, 1))
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(triton.metrics_url, timeout=5).read())
    assert b"nv_inference_request_success" in body
    assert f'nv_inference_request_success{{model="{STUDENT}",version="1"}}'.encode() in body


async def test_unknown_model_is_not_found(remote: TritonBackend) -> None:
    with pytest.raises(NotFound, match="nope"):
        await remote.infer("nope", inputs_for(LINEAR, 1))
    with pytest.raises(NotFound):
        await remote.infer("knn", inputs_for(LINEAR, 1))  # in the repository, but not a Triton model


@pytest.mark.parametrize(
    "bad",
    [
        {"x": np.zeros((2, DIN + 1), np.float32)},  # wrong shape
        {"x": np.zeros((DIN,), np.float32)},  # no batch axis
        {"x": np.zeros((2, DIN), np.float64)},  # wrong dtype
        {"x": np.zeros((2, DIN), np.float32), "extra": np.zeros((2,), np.float32)},
        {},
    ],
)
async def test_bad_input_is_invalid_argument(bad: dict[str, np.ndarray], remote: TritonBackend) -> None:
    with pytest.raises(InvalidArgument):
        await remote.infer(LINEAR, bad)


async def test_batch_larger_than_config_is_rejected_by_triton(remote: TritonBackend) -> None:
    # Passes the local checks (batch axis is -1) and is refused by Triton: its status is mapped.
    with pytest.raises(InvalidArgument, match=LINEAR):
        await remote.infer(LINEAR, inputs_for(LINEAR, 17))


async def test_model_missing_on_triton_is_failed_precondition(tmp_path: Path, triton: LocalTriton) -> None:
    write_linear(tmp_path)
    (tmp_path / LINEAR).rename(tmp_path / "ghost")
    config = tmp_path / "ghost" / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{LINEAR}"', 'name: "ghost"'))
    backend = TritonBackend(ModelRepository(tmp_path), TritonConfig(url=triton.grpc_url), Metrics("t"))
    await backend.start()
    try:
        [status] = backend.models()
        assert not status.ready and status.name == "ghost"
        with pytest.raises(FailedPrecondition, match="not loaded on Triton"):
            await backend.infer("ghost", inputs_for(LINEAR, 1))
    finally:
        await backend.close()


async def test_deadline_exceeded(repo: Path, triton: LocalTriton) -> None:
    backend = TritonBackend(
        ModelRepository(repo), TritonConfig(url=triton.grpc_url, timeout_seconds=1e-6), Metrics("t")
    )
    await backend.start()  # its probes time out too: reported, not raised
    try:
        with pytest.raises(DeadlineExceeded, match=triton.grpc_url):
            await backend.infer(STUDENT, inputs_for(STUDENT, 8))
    finally:
        await backend.close()


async def test_triton_down_at_start_is_reported_not_fatal(repo: Path) -> None:
    url = "127.0.0.1:1"  # nothing listens there
    backend = TritonBackend(ModelRepository(repo), TritonConfig(url=url, timeout_seconds=2), Metrics("t"))
    await backend.start()
    try:
        assert all(not s.ready and url in (s.error or "") for s in backend.models())
        with pytest.raises(Unavailable, match=url):
            await backend.infer(LINEAR, inputs_for(LINEAR, 1))
    finally:
        await backend.close()


async def test_recovers_when_triton_comes_back(
    triton: LocalTriton, local: OnnxBackend, remote: TritonBackend
) -> None:
    inputs = inputs_for(STUDENT, 8, seed=11)
    want = (await local.infer(STUDENT, inputs)).outputs["logits"]
    np.testing.assert_allclose(
        (await remote.infer(STUDENT, inputs)).outputs["logits"], want, rtol=0, atol=TOLERANCE
    )
    told = following(remote)
    ports = triton.ports
    await asyncio.to_thread(triton.stop)
    try:
        for _ in range(3):  # every caller, not just the first, gets the status
            with pytest.raises(Unavailable, match=triton.grpc_url):
                await remote.infer(STUDENT, inputs)
        assert not {s.name: s for s in remote.models()}[STUDENT].ready
        await remote.refresh()
        assert not any(s.ready for s in remote.models())
        assert triton.grpc_url in (remote.unreachable(STUDENT) or "")
    finally:
        await asyncio.to_thread(triton.start, ports)  # same ports: the backend's url stays valid
    assert triton.ports == ports
    got = await remote.infer(STUDENT, inputs)
    np.testing.assert_allclose(got.outputs["logits"], want, rtol=0, atol=TOLERANCE)
    await remote.refresh()
    assert all(s.ready for s in remote.models())
    assert remote.unreachable(STUDENT) is None
    await asyncio.sleep(0)  # the listener runs in a task of its own
    assert told == [False, True]


def following(backend: TritonBackend) -> list[bool]:
    """What `backend` tells a listener about Triton's reachability, in order."""
    told: list[bool] = []

    async def listener(reachable: bool) -> None:
        told.append(reachable)

    backend.follow(listener)
    return told


async def test_a_frozen_triton_is_unavailable_not_waited_for(repo: Path, triton: LocalTriton) -> None:
    # A deadline far beyond the keepalive's: only the keepalive can end these calls in time.
    backend = TritonBackend(
        ModelRepository(repo), TritonConfig(url=triton.grpc_url, timeout_seconds=60), Metrics("t")
    )
    await backend.start()
    # The emotion service's check of a request's models, over this backend (no face work here).
    pipeline = EmotionPipeline(
        EmotionConfig(model_repository=repo), backend.repository, backend, None, Metrics("t")
    )  # type: ignore[arg-type]
    inputs = inputs_for(STUDENT, 4)
    try:
        await backend.infer(STUDENT, inputs)
        told = following(backend)
        assert triton.pid is not None
        os.kill(triton.pid, signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable, match=triton.grpc_url):
                await backend.infer(STUDENT, inputs)
            # Its models are not gone, their server is: UNAVAILABLE, not FAILED_PRECONDITION.
            with pytest.raises(Unavailable, match=f"{STUDENT}.*Triton at {triton.grpc_url}"):
                pipeline.check_models([STUDENT])
            with pytest.raises(FailedPrecondition, match="ghost"):  # one not in the repository stays so
                pipeline.check_models([STUDENT, "ghost"])
        finally:
            os.kill(triton.pid, signal.SIGCONT)
        await backend.infer(STUDENT, inputs)
        assert [m.name for m in pipeline.check_models([STUDENT])] == [STUDENT]
        await asyncio.sleep(0)
        assert told == [False, True]
    finally:
        await backend.close()


def test_start_failure_shows_the_server_log(tmp_path: Path) -> None:
    write_linear(tmp_path)
    model_file = tmp_path / LINEAR / "1" / "model.onnx"
    model = onnx.load(str(model_file))
    model.ir_version = 99  # no onnxruntime reads this: the model fails to load inside Triton
    onnx.save(model, str(model_file))
    server = LocalTriton(tmp_path, CACHE, ready_timeout=60)
    try:
        with pytest.raises(RuntimeError, match="(?s)tritonserver exited.*linear"):
            server.start()
        assert not server.running
    finally:
        server.stop()


def test_gateway_serves_the_student_through_triton_by_configuration_alone(
    repo: Path, triton: LocalTriton, tmp_path: Path, astronaut_jpeg: bytes
) -> None:
    from tessera_client import TesseraClient
    from tests.helpers.suites import start_suite

    # The Haar detector: BlazeFace's models are not in this repository (nor wanted in the overlay).
    suite = start_suite(
        tmp_path,
        repo,
        data_roots=(tmp_path,),
        extra_env={
            "TESSERA_EMOTION__BACKEND": "triton",
            "TESSERA_EMOTION__TRITON__URL": triton.grpc_url,
            "TESSERA_EMOTION__DETECTOR__KIND": "haar",
        },
    )
    try:
        with TesseraClient(suite.gateway.target) as client:
            reply = client.classify([astronaut_jpeg])
            (face,) = reply.images[0].faces
            assert face.label == "Happy" and face.probabilities[3] > 0.9
            assert [(m.name, m.backend) for m in reply.models] == [("emotion_student", "triton")]
    finally:
        suite.stop()
