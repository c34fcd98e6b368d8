"""The in-process ONNX Runtime backend over real ONNX models built with onnx.helper."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.runtime.backends import Backend
from services.runtime.backends.onnx import (
    CPU,
    CUDA,
    OnnxBackend,
    OnnxConfig,
    select_providers,
    session_options,
)
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from tests.helpers.onnx_models import BATCHING, CONFIG, DIN, DOUT, B, W, add_model, linear_graph, save

RNG = np.random.default_rng(7)


def slow_graph(bias: float, width: int = 128, depth: int = 40) -> onnx.GraphProto:
    """y = x @ I @ I ... + bias: exact in float32, yet slow enough that requests queue behind it."""
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "I"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Add", [prev, "b"], ["y"]))
    return helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [
            numpy_helper.from_array(np.eye(width, dtype=np.float32), "I"),
            numpy_helper.from_array(np.full((width,), bias, np.float32), "b"),
        ],
    )


async def start(root: Path, **cfg) -> tuple[OnnxBackend, Metrics]:
    metrics = Metrics("test")
    backend = OnnxBackend(ModelRepository(root), OnnxConfig(**cfg), metrics)
    await backend.start()
    return backend, metrics


async def test_outputs_equal_onnxruntime_and_numpy(tmp_path: Path) -> None:
    d = add_model(tmp_path, "lin", linear_graph(W, B))
    backend, _ = await start(tmp_path)
    assert isinstance(backend, Backend)
    x = RNG.standard_normal((5, DIN)).astype(np.float32)
    result = await backend.infer("lin", {"x": x})
    assert (result.model, result.version, result.backend) == ("lin", 1, "onnxruntime")
    direct = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=[CPU]).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(result.outputs["y"], direct)
    np.testing.assert_allclose(result.outputs["y"], x @ W + B, rtol=1e-5, atol=1e-5)
    [status] = backend.models()
    assert status.ready and status.version == 1 and status.error is None
    await backend.close()


async def test_concurrent_requests_run_in_fewer_batches(tmp_path: Path) -> None:
    add_model(tmp_path, "lin", linear_graph(W, B))
    backend, metrics = await start(tmp_path)
    xs = [RNG.standard_normal((1, DIN)).astype(np.float32) for _ in range(32)]
    results = await asyncio.gather(*(backend.infer("lin", {"x": x}) for x in xs))
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r.outputs["y"], x @ W + B, rtol=1e-5, atol=1e-5)
    runs = metrics.registry.get_sample_value("tessera_batch_size_count", {"model": "lin"})
    rows = metrics.registry.get_sample_value("tessera_batch_size_sum", {"model": "lin"})
    assert rows == 32 and runs < 32
    assert (
        metrics.registry.get_sample_value(
            "tessera_model_inference_seconds_count",
            {"model": "lin", "version": "1", "backend": "onnxruntime"},
        )
        == runs
    )
    assert (
        metrics.registry.get_sample_value(
            "tessera_stage_duration_seconds_count", {"stage": "queue", "model": "lin"}
        )
        == 32
    )
    await backend.close()


async def test_without_dynamic_batching_each_request_runs_alone(tmp_path: Path) -> None:
    add_model(tmp_path, "lin", linear_graph(W, B), batching="")
    backend, metrics = await start(tmp_path)
    x = np.ones((2, DIN), np.float32)
    await asyncio.gather(*(backend.infer("lin", {"x": x}) for _ in range(6)))
    assert metrics.registry.get_sample_value("tessera_batch_size_count", {"model": "lin"}) == 6
    await backend.close()


async def test_requests_are_validated_before_queueing(tmp_path: Path) -> None:
    add_model(tmp_path, "lin", linear_graph(W, B))
    backend, _ = await start(tmp_path)
    with pytest.raises(InvalidArgument, match="float32"):
        await backend.infer("lin", {"x": np.ones((1, DIN), np.float64)})
    with pytest.raises(InvalidArgument, match="shape"):
        await backend.infer("lin", {"x": np.ones((1, DIN + 1), np.float32)})
    with pytest.raises(InvalidArgument, match="needs input 'x'"):
        await backend.infer("lin", {})
    with pytest.raises(InvalidArgument, match="no inputs"):
        await backend.infer("lin", {"x": np.ones((1, DIN), np.float32), "z": np.ones(1)})
    with pytest.raises(ResourceExhausted, match="17 rows"):
        await backend.infer("lin", {"x": np.ones((17, DIN), np.float32)})
    await backend.close()


async def test_broken_models_are_reported_and_others_keep_serving(tmp_path: Path) -> None:
    add_model(tmp_path, "lin", linear_graph(W, B))
    missing = add_model(tmp_path, "missing", None)
    mismatch = add_model(tmp_path, "mismatch", linear_graph(W, B), din=DIN + 1)
    corrupt = add_model(tmp_path, "corrupt", None)
    (corrupt / "1" / "model.onnx").write_bytes(b"\x08\x07garbage" * 20)
    # Parses as ONNX with the right signature, but ORT cannot build it: only a session finds this.
    unknown_op = add_model(
        tmp_path,
        "unknown_op",
        helper.make_graph(
            [helper.make_node("NoSuchOp", ["x"], ["y"])],
            "bad",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIN])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DOUT])],
        ),
    )
    backend, _ = await start(tmp_path)

    status = {s.name: s for s in backend.models()}
    assert set(status) == {"lin", "missing", "mismatch", "corrupt", "unknown_op"}
    assert status["lin"].ready
    for name, d in [
        ("missing", missing),
        ("mismatch", mismatch),
        ("corrupt", corrupt),
        ("unknown_op", unknown_op),
    ]:
        assert not status[name].ready
        assert str(d / "1" / "model.onnx") in status[name].error, status[name].error
        with pytest.raises(FailedPrecondition, match=str(d / "1" / "model.onnx")):
            await backend.infer(name, {"x": np.ones((1, DIN), np.float32)})
    with pytest.raises(NotFound, match="'nope'"):
        await backend.infer("nope", {"x": np.ones((1, DIN), np.float32)})
    r = await backend.infer("lin", {"x": np.ones((1, DIN), np.float32)})
    np.testing.assert_allclose(r.outputs["y"], np.ones((1, DIN), np.float32) @ W + B, rtol=1e-5)
    await backend.close()


async def test_version_swap_under_load(tmp_path: Path) -> None:
    width = 128
    d = tmp_path / "slow"
    d.mkdir()
    (d / "config.pbtxt").write_text(CONFIG.format(name="slow", din=width, dout=width, batching=BATCHING))
    save(slow_graph(1.0), d / "1" / "model.onnx")
    backend, _ = await start(tmp_path)
    bias = {1: 1.0, 2: 2.0}
    results: list = []
    stop = asyncio.Event()

    async def one(i: int) -> int | None:
        x = np.full((1, width), i % 7, np.float32)
        try:
            r = await backend.infer("slow", {"x": x})
        except Exception as exc:
            results.append(exc)
            return None
        # Whatever version answered, the output is that version's.
        np.testing.assert_array_equal(r.outputs["y"], x + bias[r.version])
        results.append(r.version)
        return r.version

    async def load() -> None:
        i = 0
        while not stop.is_set():
            await asyncio.gather(*(one(i + k) for k in range(4)))
            i += 4

    loader = asyncio.create_task(load())
    await one(0)
    save(slow_graph(2.0), d / "2" / "model.onnx")
    # This wave is queued on version 1 before the swap (reload suspends while it rescans).
    before = [asyncio.create_task(one(i)) for i in range(32)]
    changed = await backend.reload()
    assert changed == ["slow"]
    after = [asyncio.create_task(one(i)) for i in range(16)]
    before_versions = await asyncio.gather(*before)
    after_versions = await asyncio.gather(*after)
    stop.set()
    await loader
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    assert before_versions == [1] * 32  # finished on the version they were queued on
    assert after_versions == [2] * 16
    after_results = [backend.infer("slow", {"x": np.zeros((1, width), np.float32)}) for _ in range(3)]
    assert [r.version for r in await asyncio.gather(*after_results)] == [2, 2, 2]
    [status] = backend.models()
    assert status.version == 2 and status.ready
    assert await backend.reload() == []  # nothing changed since
    await backend.close()


async def test_broken_new_version_leaves_old_one_serving(tmp_path: Path) -> None:
    d = add_model(tmp_path, "lin", linear_graph(W, B))
    backend, _ = await start(tmp_path)
    (d / "2").mkdir()
    (d / "2" / "model.onnx").write_bytes(b"\x08\x07garbage" * 20)
    assert await backend.reload() == ["lin"]
    [status] = backend.models()
    assert status.ready and status.version == 1
    assert str(d / "2" / "model.onnx") in status.error
    r = await backend.infer("lin", {"x": np.ones((1, DIN), np.float32)})
    assert r.version == 1
    # Fixed file: the next reload swaps it in.
    save(linear_graph(W, B + 1), d / "2" / "model.onnx")
    assert await backend.reload() == ["lin"]
    r = await backend.infer("lin", {"x": np.ones((1, DIN), np.float32)})
    assert r.version == 2 and backend.models()[0].error is None
    await backend.close()


async def test_load_and_removed_model(tmp_path: Path) -> None:
    add_model(tmp_path, "lin", linear_graph(W, B))
    backend, _ = await start(tmp_path)
    add_model(tmp_path, "lin2", linear_graph(W, B))
    status = await backend.load("lin2")
    assert status.ready and status.name == "lin2"
    with pytest.raises(NotFound):
        await backend.load("nope")

    shutil.rmtree(tmp_path / "lin")
    assert await backend.reload() == ["lin"]
    assert [s.name for s in backend.models()] == ["lin2"]
    with pytest.raises(NotFound):
        await backend.infer("lin", {"x": np.ones((1, DIN), np.float32)})
    await backend.close()


def test_provider_selection_is_cpu_only_here() -> None:
    assert select_providers("auto") == [CPU]
    assert select_providers("never") == [CPU]
    # The wheel lists CUDA even without a GPU: only the driver probe decides.
    assert CUDA in ort.get_available_providers()
    assert select_providers("auto", available=[CUDA, CPU], driver_present=lambda: False) == [CPU]
    assert select_providers("auto", available=[CUDA, CPU], driver_present=lambda: True) == [CUDA, CPU]
    with pytest.raises(FailedPrecondition, match="libcuda"):
        select_providers("require", available=[CUDA, CPU], driver_present=lambda: False)


async def test_backend_uses_cpu_and_no_spinning(tmp_path: Path) -> None:
    add_model(tmp_path, "lin", linear_graph(W, B))
    backend, _ = await start(tmp_path)
    assert backend.providers == [CPU]
    assert backend._served["lin"].opened.handle.get_providers() == [CPU]
    opts = session_options(OnnxConfig())
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2
    await backend.close()


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError):
        OnnxConfig(threads=4)
    with pytest.raises(ValueError):
        OnnxConfig(use_gpu="maybe")
