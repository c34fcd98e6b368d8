"""The timm exporter: served logits equal PyTorch's, and it refuses to write what does not.

Randomly initialised (seeded) networks stand in for the teachers (no pretrained weights offline).
Exported graphs are cached under .cache/exports/<key>/, so a rerun skips the ONNX export and only
repeats the cheap checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm")

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from services.fusion.emotion import CLASS_NAMES
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from services.vision.preprocess import load_params, preprocess_faces
from tools.modeller.export import __main__ as cli
from tools.modeller.export import timm_export as te

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("resnet18", "tf_efficientnet_b3", "convnext_tiny", "mobilenetv3_large_100")
SEED = 1234
CACHE = te.DEFAULT_CACHE


def assert_logits_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    largest = float(np.abs(expected).max())
    diff = float(np.abs(got - expected).max())
    assert diff <= te.TOLERANCE * max(1.0, largest), f"max |served - torch| = {diff:.3g}"
    # Random-init networks can have tiny logits (tf_efficientnet_b3: ~2e-4), where the absolute
    # floor above would accept almost anything: hold them to the same tolerance, relative.
    assert diff <= te.TOLERANCE * largest, f"max |served - torch| = {diff:.3g}, largest {largest:.3g}"


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def faces(n: int) -> list[np.ndarray]:
    """Real face crops (BGR uint8): the astronaut's face, then LFW faces."""
    import cv2
    import skimage.data

    astronaut = cv2.cvtColor(skimage.data.astronaut()[30:200, 150:310], cv2.COLOR_RGB2BGR)
    lfw = [(f * 255).astype(np.uint8) for f in skimage.data.lfw_subset()[: max(0, n - 1)]]
    return [astronaut, *lfw][:n]


async def serve(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    backend = OnnxBackend(ModelRepository(repo), OnnxConfig(), Metrics("test"))
    await backend.start()
    try:
        return (await backend.infer(model, {"input": x})).outputs["logits"]
    finally:
        await backend.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four teacher architectures, seeded random init, 7 classes, in one repository."""
    root = tmp_path_factory.mktemp("repo")
    for arch in ARCHS:
        te.export_timm(arch, None, 7, name=arch, repo=root, seed=SEED, cache_dir=CACHE)
    return root


@pytest.fixture(scope="module")
def references() -> dict[str, nn.Module]:
    return {arch: te.build_model(arch, 7, seed=SEED) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
async def test_served_logits_equal_pytorch(repo: Path, references: dict[str, nn.Module], arch: str) -> None:
    params = load_params(repo / arch / "1" / "preprocess.json")
    backend = OnnxBackend(ModelRepository(repo), OnnxConfig(), Metrics("test"))
    await backend.start()
    try:
        for batch in (1, 4):
            # The service's own preprocessing of real faces, driven by the exported preprocess.json.
            x = preprocess_faces(faces(batch), params)
            result = await backend.infer(arch, {"input": x})
            expected = torch_logits(references[arch], x)
            assert_logits_close(result.outputs["logits"], expected)
            assert result.version == 1
            if batch > 1:  # the comparison means something only if the logits depend on the face
                assert np.ptp(expected, axis=0).max() > 0.01 * np.abs(expected).max()
    finally:
        await backend.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_repository_files(repo: Path, arch: str) -> None:
    entry = ModelRepository(repo).get(arch)
    assert entry.ok, entry.error
    assert entry.kind == "onnxruntime_onnx" and entry.config.max_batch_size == 32
    assert entry.config.HasField("dynamic_batching")
    assert entry.parameters["demo"] == "false" and entry.parameters["arch"] == arch
    params = load_params(entry.file("preprocess.json"))
    assert params.input_size == (224, 224) and params.color == "rgb" and params.layout == "NCHW"
    assert params.mean == pytest.approx((0.485, 0.456, 0.406))
    assert params.std == pytest.approx((0.229, 0.224, 0.225))
    assert params.clahe is not None and params.clahe.space == "lab_l"
    assert params.class_names == CLASS_NAMES and params.temperature == 1.0
    assert sorted(p.name for p in entry.path.iterdir()) == ["1", "config.pbtxt"]  # no staging left


def test_next_export_takes_next_version(tmp_path: Path) -> None:
    first = te.export_timm(
        "mobilenetv3_large_100",
        None,
        7,
        "student",
        tmp_path,
        seed=SEED,
        cache_dir=CACHE,
        clahe=None,
        temperature=1.7,
    )
    second = te.export_timm("mobilenetv3_large_100", None, 7, "student", tmp_path, seed=SEED, cache_dir=CACHE)
    assert (first.name, second.name) == ("1", "2")
    assert load_params(first / "preprocess.json").clahe is None
    assert load_params(first / "preprocess.json").temperature == 1.7
    assert ModelRepository(tmp_path).get("student").version == 2
    with pytest.raises(te.ExportError, match="never overwritten"):
        te.export_timm(
            "mobilenetv3_large_100", None, 7, "student", tmp_path, version=2, seed=SEED, cache_dir=CACHE
        )


def _corrupt(data: bytes) -> bytes:
    """Shift the classifier's bias: a graph that runs fine but computes the wrong logits."""
    model = onnx.load_from_string(data)
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for init in model.graph.initializer:
        if init.name == last.input[2]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
    return model.SerializeToString()


def test_refuses_to_write_when_onnx_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = te._cached_or_export
    monkeypatch.setattr(te, "_cached_or_export", lambda *a, **k: _corrupt(real(*a, **k)))
    cache = tmp_path / "cache"
    with pytest.raises(te.ExportError, match="disagrees with PyTorch"):
        te.export_timm("resnet18", None, 7, "rn", tmp_path / "repo", seed=SEED, cache_dir=cache)
    assert not (tmp_path / "repo").exists()
    assert not cache.exists() or not any(cache.rglob("model.onnx"))  # a bad graph is not cached


def test_cli_refuses_with_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = te._cached_or_export
    monkeypatch.setattr(te, "_cached_or_export", lambda *a, **k: _corrupt(real(*a, **k)))
    code = cli.main(
        [
            "timm",
            "--arch",
            "resnet18",
            "--random-init",
            str(SEED),
            "--num-classes",
            "7",
            "--name",
            "rn",
            "--repo",
            str(tmp_path),
            "--cache",
            str(CACHE),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "export failed" in err and "disagrees with PyTorch" in err and "max |onnx - torch|" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_writes(tmp_path: Path) -> None:
    code = cli.main(
        [
            "timm",
            "--arch",
            "resnet18",
            "--random-init",
            str(SEED),
            "--num-classes",
            "7",
            "--name",
            "rn",
            "--repo",
            str(tmp_path),
            "--cache",
            str(CACHE),
            "--clahe-space",
            "gray",
            "--clahe-clip",
            "3",
            "--clahe-tile",
            "4",
            "--temperature",
            "1.5",
        ]
    )
    assert code == 0
    params = load_params(tmp_path / "rn" / "1" / "preprocess.json")
    assert params.clahe is not None and (params.clahe.space, params.clahe.clip_limit) == ("gray", 3.0)
    assert params.clahe.tile_grid == (4, 4) and params.temperature == 1.5


class NotWeights:
    """A custom object: unpickling it would run arbitrary code paths, so weights_only refuses it."""

    def __init__(self) -> None:
        self.note = "trained on fer2013"


def test_pickled_object_checkpoint_is_rejected(tmp_path: Path) -> None:
    model = te.build_model("resnet18", 7, seed=SEED)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "meta": NotWeights()}, path)
    with pytest.raises(te.ExportError, match=r"weights_only=True.*state_dict\(\)") as info:
        te.export_timm("resnet18", path, 7, "rn", tmp_path / "repo")
    assert "NotWeights" in str(info.value)  # the message names what it refused
    assert not (tmp_path / "repo").exists()


def test_checkpoint_that_does_not_fit_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(te.build_model("resnet18", 5, seed=SEED).state_dict(), path)
    with pytest.raises(te.ExportError, match="does not fit resnet18 with 7 classes"):
        te.export_timm("resnet18", path, 7, "rn", tmp_path / "repo")


async def test_five_classes(tmp_path: Path) -> None:
    names = ["Angry", "Happy", "Sad", "Surprise", "Neutral"]
    with pytest.raises(te.ExportError, match="give the 5 class names"):
        te.export_timm("mobilenetv3_large_100", None, 5, "five", tmp_path, seed=SEED)
    out = te.export_timm(
        "mobilenetv3_large_100", None, 5, "five", tmp_path, seed=SEED, class_names=names, cache_dir=CACHE
    )
    assert load_params(out / "preprocess.json").class_names == tuple(names)
    x = preprocess_faces(faces(2), load_params(out / "preprocess.json"))
    got = await serve(tmp_path, "five", x)
    assert got.shape == (2, 5)
    assert_logits_close(got, torch_logits(te.build_model("mobilenetv3_large_100", 5, seed=SEED), x))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model"])
async def test_checkpoint_round_trip(tmp_path: Path, wrap: str) -> None:
    model = te.build_model("resnet18", 7, seed=SEED + 1)
    # A DataParallel-style "module." prefix, as many training scripts save it.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save(state if wrap == "plain" else {wrap: state, "epoch": 30}, path)
    out = te.export_timm("resnet18", path, 7, "rn", tmp_path / "repo", cache_dir=CACHE)
    assert "checkpoint ckpt.pt" in ModelRepository(tmp_path / "repo").get("rn").parameters["source"]
    x = np.random.default_rng(3).standard_normal((3, 3, 224, 224)).astype(np.float32)
    assert_logits_close(await serve(out.parents[1], "rn", x), torch_logits(model, x))


def test_trailing_softmax_is_cut() -> None:
    model = te.build_model("resnet18", 7, seed=SEED)
    fc = model.fc
    model.fc = nn.Sequential(fc, nn.Softmax(dim=1))
    assert te.strip_final_softmax(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(model(x), fc(features))
    assert not te.strip_final_softmax(model)


def test_cache_key() -> None:
    key = te.export_cache_key("resnet18", 7, 0, 224)
    assert key == te.export_cache_key("resnet18", 7, 0, (224, 224))
    assert key.startswith("resnet18-c7-224x224-")
    others = {
        te.export_cache_key("resnet18", 7, 1, 224),
        te.export_cache_key("resnet18", 5, 0, 224),
        te.export_cache_key("resnet18", 7, 0, 256),
        te.export_cache_key("resnet18", 7, 0, 224, torch_version="0"),
        te.export_cache_key("resnet18", 7, 0, 224, timm_version="0"),
        te.export_cache_key("convnext_tiny", 7, 0, 224),
    }
    assert key not in others and len(others) == 6


def test_serving_path_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import services.runtime.backends.onnx, services.vision.preprocess, services.fusion.emotion\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print(json.dumps(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) == []


@pytest.fixture(scope="module")
def triton_backend_url(repo: Path):
    """The real tritonserver on the four exports (python-backend overlay running ONNX Runtime)."""
    from tools.devtriton.local import LocalTriton

    server = LocalTriton(repo, ROOT / ".cache")
    server.prepare()
    try:
        server.start()
        yield server.grpc_url
    finally:
        server.stop()


@pytest.mark.triton
@pytest.mark.parametrize("arch", ARCHS)
async def test_served_logits_through_triton_equal_pytorch(
    repo: Path, references: dict[str, nn.Module], triton_backend_url: str, arch: str
) -> None:
    from services.runtime.backends.triton import TritonBackend, TritonConfig

    params = load_params(repo / arch / "1" / "preprocess.json")
    backend = TritonBackend(
        ModelRepository(repo), TritonConfig(url=triton_backend_url, timeout_seconds=60), Metrics("test")
    )
    await backend.start()
    try:
        for batch in (1, 4):
            x = preprocess_faces(faces(batch), params)
            result = await backend.infer(arch, {"input": x})
            assert result.backend == "triton"
            assert_logits_close(result.outputs["logits"], torch_logits(references[arch], x))
    finally:
        await backend.close()
