"""Text embeddings for rows that come without one: the repository's text-embedding model.

The model directory (built by `tools.builders.minilm`) holds an ONNX encoder whose output is already
the pooled, normalised sentence embedding, its `tokenizer.json` (HF `tokenizers`), and an
`embedder.json` saying which embedder it is and how it tokenises. No torch here: the serving path
runs the graph through the suite's backend (batched like every other model), and the offline helper
runs ONNX Runtime directly for the demo-model builders.

Padding: a request's texts are tokenised without padding, sorted by length and padded to the
smallest of a few fixed lengths (16, 32, …, 128, then steps of 32 up to max_seq_length). The
backend merges concurrent requests only when their shapes agree, and with fixed buckets two callers'
short texts land on the same shape; padding to the longest text of each call would almost never
match. Sorting first keeps the padding waste of one call to under a bucket step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import Field

from services.runtime.backends.base import InferResult
from services.runtime.config import StrictModel
from services.runtime.errors import FailedPrecondition
from services.runtime.repository import ModelRepository

if TYPE_CHECKING:
    import onnxruntime as ort

EMBEDDER_FILE = "embedder.json"
DEFAULT_MODEL = "text_embedder"
_FINE_STEP, _FINE_UNTIL, _COARSE_STEP = 16, 128, 32


class _Infers(Protocol):
    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferResult: ...


class EmbedderInfo(StrictModel):
    """Which embedder made some embeddings, and how the text-embedding model prepares its text.

    `name` and `dimension` say which: embeddings of two embedders cannot be compared, so the kNN
    index (`index.json`) and the MLP (`mlp.json`) record them. The other fields are the embedding
    model's own, read from its `embedder.json` (`from_file`), and are left out of those records.
    """

    name: str = Field(min_length=1)
    dimension: int = Field(gt=0)
    max_seq_length: int = Field(0, ge=0, exclude=True)  # 0: not a model's description
    do_lower_case: bool = Field(False, exclude=True)
    strip: bool = Field(True, exclude=True)
    tokenizer: str = Field("tokenizer.json", exclude=True)
    pad_id: int = Field(0, exclude=True)
    inputs: tuple[str, ...] = Field(("input_ids", "attention_mask"), exclude=True)
    output: str = Field("sentence_embedding", exclude=True)

    @classmethod
    def from_file(cls, path: Path) -> EmbedderInfo:
        """A model's `embedder.json`; keys beyond these are its exporter's notes."""
        try:
            raw = json.loads(Path(path).read_text())
            if not isinstance(raw, dict):
                raise TypeError(f"a JSON {type(raw).__name__}, not an object")
            info = cls.model_validate({k: v for k, v in raw.items() if k in cls.model_fields})
            if not info.max_seq_length:
                raise KeyError("max_seq_length")
            return info
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"{path}: not a usable embedder description: {exc}") from exc


@dataclass(frozen=True)
class TokenBatch:
    """Padded model inputs for some of a call's texts; ``rows`` says which ones, in order."""

    rows: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray

    def inputs(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        tensors = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": np.zeros_like(self.input_ids),
        }
        return {name: tensors[name] for name in names}


def length_buckets(max_seq_length: int) -> list[int]:
    """Padded lengths a batch may take: fine steps where most texts are, coarse ones above."""
    fine = range(_FINE_STEP, min(_FINE_UNTIL, max_seq_length) + 1, _FINE_STEP)
    coarse = range(_FINE_UNTIL + _COARSE_STEP, max_seq_length + 1, _COARSE_STEP)
    return sorted({*fine, *coarse, max_seq_length})


class Tokenization:
    """The checkpoint's tokenizer, truncating at max_seq_length as sentence-transformers does."""

    def __init__(self, tokenizer_file: Path, info: EmbedderInfo) -> None:
        # Imported here: the kNN index and the MLP use EmbedderInfo, and tokenise nothing.
        from tokenizers import Tokenizer

        self.info = info
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # Enforced here too, whatever the file says: the model's own file truncates at 128.
        self.tokenizer.enable_truncation(info.max_seq_length, strategy="longest_first")
        self.tokenizer.no_padding()
        self.buckets = np.array(length_buckets(info.max_seq_length))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        prepared = [self._prepare(t) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(prepared, add_special_tokens=True)]

    def batches(self, texts: Sequence[str], batch_size: int) -> list[TokenBatch]:
        """Token batches of at most ``batch_size`` rows, each padded to one bucket length."""
        ids = self.encode(texts)
        lengths = np.array([len(i) for i in ids], dtype=np.int64)
        bucket = self.buckets[np.searchsorted(self.buckets, lengths)]
        order = np.lexsort((lengths, bucket))  # by bucket, then length: chunks fill one bucket
        return [
            self._pad([ids[r] for r in rows], rows, int(bucket[rows].max()))
            for rows in _chunks_by_bucket(order, bucket, batch_size)
        ]

    def _prepare(self, text: str) -> str:
        if self.info.strip:
            text = text.strip()
        return text.lower() if self.info.do_lower_case else text

    def _pad(self, ids: list[list[int]], rows: np.ndarray, length: int) -> TokenBatch:
        input_ids = np.full((len(ids), length), self.info.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for i, seq in enumerate(ids):
            input_ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return TokenBatch(rows, input_ids, mask)


def _chunks_by_bucket(order: np.ndarray, bucket: np.ndarray, size: int) -> Iterator[np.ndarray]:
    sorted_buckets = bucket[order]
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
    for begin, end in zip(starts, [*starts[1:], len(order)], strict=True):
        for i in range(begin, end, size):
            yield order[i : min(i + size, end)]


def _collect(n: int, dimension: int, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Scatter per-batch outputs back into the caller's order, checking the width."""
    out = np.empty((n, dimension), dtype=np.float32)
    for rows, values in parts:
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(rows), dimension):
            raise FailedPrecondition(
                f"text embedder returned shape {list(values.shape)}, expected {[len(rows), dimension]}"
            )
        out[rows] = values
    return out


class TextEmbedder:
    """Embeds texts with the repository's text-embedding model through a serving backend."""

    def __init__(
        self,
        backend: _Infers,
        model: str,
        info: EmbedderInfo,
        tokenization: Tokenization,
        max_batch_size: int,
    ) -> None:
        self.backend = backend
        self.model = model
        self.info = info
        self.tokenization = tokenization
        self.max_batch_size = max_batch_size

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dimension(self) -> int:
        return self.info.dimension

    @classmethod
    def from_repository(
        cls, repository: ModelRepository, backend: _Infers, model: str = DEFAULT_MODEL
    ) -> TextEmbedder:
        """Read the model's embedder description and tokenizer (NotFound / FailedPrecondition)."""
        entry = repository.get(model)
        if not entry.ok or entry.config is None:
            raise FailedPrecondition(f"text embedder '{model}' cannot be served: {entry.error}")
        info = EmbedderInfo.from_file(entry.file(EMBEDDER_FILE))
        tokenizer_file = entry.file(info.tokenizer)
        if not tokenizer_file.is_file():
            raise FailedPrecondition(f"text embedder '{model}': {tokenizer_file} is missing")
        # max_batch_size 0 means the model takes no batch axis from the server's point of view;
        # ours always has one, so fall back to a modest chunk.
        max_batch = entry.config.max_batch_size or 32
        return cls(backend, model, info, Tokenization(tokenizer_file, info), max_batch)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [n, dimension], L2-normalised, in the order of ``texts``."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # Tokenising thousands of long texts is milliseconds of CPU: keep it off the event loop.
        batches = await asyncio.to_thread(self.tokenization.batches, texts, self.max_batch_size)
        # All chunks at once, so the batcher can merge them with other callers' same-length rows.
        results = await asyncio.gather(
            *(self.backend.infer(self.model, b.inputs(self.info.inputs)) for b in batches)
        )
        return _collect(
            len(texts),
            self.dimension,
            [(b.rows, r.outputs[self.info.output]) for b, r in zip(batches, results, strict=True)],
        )


# ---------------------------------------------------------------------------------------------
# Offline (model building time)


def _version_dir(model_dir: Path) -> Path:
    """The newest version folder of a model directory (or the folder itself if it holds the model)."""
    model_dir = Path(model_dir)
    if (model_dir / "model.onnx").is_file():
        return model_dir
    versions = sorted(
        (int(p.name), p)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()
    )
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no <version>/model.onnx")
    return versions[-1][1]


# Keyed by the file's mtime as well, so a rebuilt model is picked up by the next call.
@lru_cache(maxsize=2)
def _offline_model(
    version_dir: Path, mtime_ns: int
) -> tuple[EmbedderInfo, Tokenization, ort.InferenceSession]:
    import onnxruntime as ort

    info = EmbedderInfo.from_file(version_dir / EMBEDDER_FILE)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(version_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return info, Tokenization(version_dir / info.tokenizer, info), session


def embed_offline(model_dir: Path, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Embed texts with ONNX Runtime directly (no server): float32 [n, dimension], L2-normalised."""
    version_dir = _version_dir(model_dir)
    info, tokenization, session = _offline_model(version_dir, (version_dir / "model.onnx").stat().st_mtime_ns)
    if not texts:
        return np.zeros((0, info.dimension), dtype=np.float32)
    parts = [
        (b.rows, session.run([info.output], b.inputs(info.inputs))[0])
        for b in tokenization.batches(texts, batch_size)
    ]
    return _collect(len(texts), info.dimension, parts)
