"""The in-process XGBoost backend over FIL-layout models, alone and routed beside ONNX models."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.backends import Backend
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.backends.router import RoutingBackend
from services.runtime.backends.xgb import XgbBackend, XgbConfig
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from tests.helpers.onnx_models import DIN, B, W, add_model, linear_graph
from tools.builders.xgb_demo import train_demo_booster, write_xgb_model

N_FEATURES = 12
LEVELS = 4  # engagement levels 0-3


@pytest.fixture(scope="module")
def affect() -> tuple[xgb.Booster, np.ndarray]:
    return train_demo_booster(N_FEATURES, LEVELS, seed=1)


@pytest.fixture(scope="module")
def binary() -> tuple[xgb.Booster, np.ndarray]:
    return train_demo_booster(N_FEATURES, 2, seed=2)


def reference(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """What offline evaluation computes: probabilities per class (binary as [1 - p, p])."""
    p = booster.predict(xgb.DMatrix(x))
    return np.stack([1 - p, p], axis=1) if p.ndim == 1 else p


async def start_xgb(root: Path) -> tuple[XgbBackend, Metrics]:
    metrics = Metrics("test")
    backend = XgbBackend(ModelRepository(root), XgbConfig(), metrics)
    await backend.start()
    return backend, metrics


async def test_outputs_equal_booster_predict(tmp_path: Path, affect, binary) -> None:
    write_xgb_model(affect[0], tmp_path, "boredom", n_features=N_FEATURES, n_classes=LEVELS, demo=True)
    write_xgb_model(binary[0], tmp_path, "yesno", demo=True)
    backend, _ = await start_xgb(tmp_path)
    assert isinstance(backend, Backend)
    for name, (booster, x) in (("boredom", affect), ("yesno", binary)):
        result = await backend.infer(name, {"input__0": x[:37]})
        assert (result.model, result.version, result.backend) == (name, 1, "xgboost")
        out = result.outputs["output__0"]
        assert out.dtype == np.float32 and out.shape == (37, LEVELS if name == "boredom" else 2)
        np.testing.assert_allclose(out, reference(booster, x[:37]), rtol=0, atol=1e-6)
    assert [(s.name, s.ready, s.version, s.error) for s in backend.models()] == [
        ("boredom", True, 1, None),
        ("yesno", True, 1, None),
    ]
    await backend.close()


def test_config_is_a_fil_config(tmp_path: Path, affect) -> None:
    version_dir = write_xgb_model(affect[0], tmp_path, "boredom", demo=True)
    assert (version_dir / "xgboost.json").read_bytes().startswith(b"{")
    config = mc.ModelConfig()
    text_format.Parse((tmp_path / "boredom" / "config.pbtxt").read_text(), config)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert config.backend == "fil" and config.name == "boredom" and config.max_batch_size > 0
    assert params["model_type"] == "xgboost_json"
    assert params["output_class"] == params["predict_proba"] == params["demo"] == "true"
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input__0", mc.TYPE_FP32, [N_FEATURES])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("output__0", mc.TYPE_FP32, [LEVELS])
    ]
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.HasField("dynamic_batching")
    entry = ModelRepository(tmp_path).get("boredom")
    assert entry.ok and entry.kind == "fil" and entry.version == 1
    with pytest.raises(ValueError, match="n_features=5 but the booster has 12 features"):
        write_xgb_model(affect[0], tmp_path, "other", n_features=5, demo=True)


async def test_concurrent_requests_merge_into_fewer_runs(tmp_path: Path, affect) -> None:
    booster, x = affect
    write_xgb_model(booster, tmp_path, "boredom", demo=True)
    backend, metrics = await start_xgb(tmp_path)
    rows = [x[i : i + 1] for i in range(32)]
    results = await asyncio.gather(*(backend.infer("boredom", {"input__0": r}) for r in rows))
    want = reference(booster, x[:32])
    for i, r in enumerate(results):  # each caller gets exactly its own row back
        np.testing.assert_allclose(r.outputs["output__0"], want[i : i + 1], rtol=0, atol=1e-6)
    registry = metrics.registry
    runs = registry.get_sample_value("tessera_batch_size_count", {"model": "boredom"})
    assert registry.get_sample_value("tessera_batch_size_sum", {"model": "boredom"}) == 32
    assert runs < 32
    assert (
        registry.get_sample_value(
            "tessera_model_inference_seconds_count",
            {"model": "boredom", "version": "1", "backend": "xgboost"},
        )
        == runs
    )
    await backend.close()


async def test_corrupt_json_breaks_only_that_model(tmp_path: Path, affect) -> None:
    write_xgb_model(affect[0], tmp_path, "good", demo=True)
    bad_dir = write_xgb_model(affect[0], tmp_path, "bad", demo=True)
    (bad_dir / "xgboost.json").write_text('{"learner": {"gradient_booster": [tru')
    backend, _ = await start_xgb(tmp_path)
    status = {s.name: s for s in backend.models()}
    assert status["good"].ready and not status["bad"].ready
    assert str(bad_dir / "xgboost.json") in (status["bad"].error or "")
    with pytest.raises(FailedPrecondition, match=r"bad/1/xgboost\.json"):
        await backend.infer("bad", {"input__0": affect[1][:1]})
    result = await backend.infer("good", {"input__0": affect[1][:2]})
    assert result.outputs["output__0"].shape == (2, LEVELS)
    await backend.close()


async def test_config_that_disagrees_with_the_booster_names_the_file(tmp_path: Path, affect) -> None:
    version_dir = write_xgb_model(affect[0], tmp_path, "boredom", demo=True)
    config = tmp_path / "boredom" / "config.pbtxt"
    parsed = text_format.Parse(config.read_text(), mc.ModelConfig())
    parsed.input[0].dims[:] = [7]
    config.write_text(text_format.MessageToString(parsed))
    backend, _ = await start_xgb(tmp_path)
    [status] = backend.models()
    assert not status.ready
    assert str(version_dir / "xgboost.json") in status.error and "12 features" in status.error
    await backend.close()


async def test_bad_requests_are_invalid_argument(tmp_path: Path, affect) -> None:
    write_xgb_model(affect[0], tmp_path, "boredom", demo=True)
    backend, _ = await start_xgb(tmp_path)
    with pytest.raises(InvalidArgument, match="shape"):
        await backend.infer("boredom", {"input__0": np.ones((1, N_FEATURES + 1), np.float32)})
    with pytest.raises(InvalidArgument, match="float32"):
        await backend.infer("boredom", {"input__0": np.ones((1, N_FEATURES), np.float64)})
    with pytest.raises(InvalidArgument, match="no inputs"):
        await backend.infer("boredom", {"x": np.ones((1, N_FEATURES), np.float32)})
    with pytest.raises(NotFound, match=re.escape(str(tmp_path))):
        await backend.infer("nope", {"input__0": np.ones((1, N_FEATURES), np.float32)})
    await backend.close()


async def test_class_ids_without_predict_proba(tmp_path: Path, affect, binary) -> None:
    for name, (booster, _) in (("levels", affect), ("yesno", binary)):
        write_xgb_model(booster, tmp_path, name, demo=True)
        config = tmp_path / name / "config.pbtxt"
        parsed = text_format.Parse(config.read_text(), mc.ModelConfig())
        assert parsed.parameters["predict_proba"].string_value == "true"
        parsed.parameters["predict_proba"].string_value = "false"
        parsed.output[0].dims[:] = [1]
        config.write_text(text_format.MessageToString(parsed))
    backend, _ = await start_xgb(tmp_path)
    for name, (booster, x) in (("levels", affect), ("yesno", binary)):
        out = (await backend.infer(name, {"input__0": x[:50]})).outputs["output__0"]
        want = reference(booster, x[:50]).argmax(axis=1)  # binary: p > 0.5
        np.testing.assert_array_equal(out[:, 0], want.astype(np.float32))
    await backend.close()


async def test_new_version_and_reload(tmp_path: Path, affect) -> None:
    booster1, x = affect
    booster2, _ = train_demo_booster(N_FEATURES, LEVELS, seed=9)
    write_xgb_model(booster1, tmp_path, "boredom", demo=True)
    backend, _ = await start_xgb(tmp_path)
    assert (await backend.infer("boredom", {"input__0": x[:3]})).version == 1

    assert write_xgb_model(booster2, tmp_path, "boredom", demo=True).name == "2"
    in_flight = [
        asyncio.ensure_future(backend.infer("boredom", {"input__0": x[i : i + 1]})) for i in range(16)
    ]
    assert await backend.reload() == ["boredom"]
    for i, r in enumerate(await asyncio.gather(*in_flight)):  # none fails across the swap
        want = reference(booster1 if r.version == 1 else booster2, x[i : i + 1])
        np.testing.assert_allclose(r.outputs["output__0"], want, rtol=0, atol=1e-6)
    result = await backend.infer("boredom", {"input__0": x[:5]})
    assert result.version == 2
    np.testing.assert_allclose(result.outputs["output__0"], reference(booster2, x[:5]), atol=1e-6)
    [status] = backend.models()
    assert status.version == 2 and status.versions == (1, 2)
    assert await backend.reload() == []  # nothing changed: nothing reloaded

    # A broken newer version leaves version 2 serving, with the reason visible.
    bad = tmp_path / "boredom" / "3"
    bad.mkdir()
    (bad / "xgboost.json").write_text("not json")
    assert await backend.reload() == ["boredom"]
    [status] = backend.models()
    assert status.ready and status.version == 2 and "3/xgboost.json" in (status.error or "")
    assert (await backend.infer("boredom", {"input__0": x[:1]})).version == 2
    await backend.close()


async def test_router_serves_onnx_and_xgboost_models(tmp_path: Path, affect) -> None:
    booster, x = affect
    add_model(tmp_path, "lin", linear_graph(W, B))
    write_xgb_model(booster, tmp_path, "boredom", demo=True)
    (tmp_path / "tok" / "1").mkdir(parents=True)  # a kind neither child serves
    (tmp_path / "tok" / "config.pbtxt").write_text('name: "tok"\nbackend: "python"\n')
    (tmp_path / "tok" / "1" / "model.py").write_text("")
    repository, metrics = ModelRepository(tmp_path), Metrics("test")
    router = RoutingBackend(
        repository,
        [OnnxBackend(repository, OnnxConfig(), metrics), XgbBackend(repository, XgbConfig(), metrics)],
    )
    assert isinstance(router, Backend)
    await router.start()
    assert [(s.name, s.backend, s.ready) for s in router.models()] == [
        ("boredom", "xgboost", True),
        ("lin", "onnxruntime", True),
    ]

    v = np.ones((2, DIN), np.float32)
    lin = await router.infer("lin", {"x": v})
    assert lin.backend == "onnxruntime"
    np.testing.assert_allclose(lin.outputs["y"], v @ W + B, rtol=1e-5, atol=1e-5)
    tree = await router.infer("boredom", {"input__0": x[:4]})
    assert tree.backend == "xgboost"
    np.testing.assert_allclose(tree.outputs["output__0"], reference(booster, x[:4]), atol=1e-6)

    with pytest.raises(NotFound, match=re.escape(f"not in the model repository {tmp_path}")):
        await router.infer("nope", {"x": v})
    with pytest.raises(NotFound, match="kind 'python'"):
        await router.infer("tok", {"x": v})
    with pytest.raises(InvalidArgument):
        await router.infer("boredom", {"input__0": np.ones((1, 3), np.float32)})

    # A model added later is found by reload (and by load), a new version swapped in.
    booster2, _ = train_demo_booster(N_FEATURES, LEVELS, seed=5)
    write_xgb_model(booster2, tmp_path, "boredom", demo=True)
    write_xgb_model(booster2, tmp_path, "confusion", demo=True)
    assert sorted(await router.reload()) == ["boredom", "confusion"]
    assert (await router.infer("boredom", {"input__0": x[:1]})).version == 2
    assert (await router.infer("confusion", {"input__0": x[:1]})).backend == "xgboost"
    add_model(tmp_path, "lin2", linear_graph(W, B))
    assert (await router.load("lin2")).backend == "onnxruntime"
    assert (await router.infer("lin2", {"x": v})).backend == "onnxruntime"
    await router.close()
