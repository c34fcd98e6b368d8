"""The kNN proxy labeller: a faiss exact inner-product index over L2-normalised embeddings of
labelled rows, and the vote that turns neighbours into six probabilities (docs/architecture.md, docs/operations.md#fusion-rules).

Repository layout (a model kind Triton cannot serve, so it stays in process):

    <repo>/proxylabel_knn/config.pbtxt      backend "faiss", default_model_filename "index.faiss"
    <repo>/proxylabel_knn/1/index.faiss     an IndexFlatIP in faiss's own format (no pickle)
    <repo>/proxylabel_knn/1/labels.npy      int8 scores 0-5, one per indexed vector
    <repo>/proxylabel_knn/1/index.json      IndexMeta: embedder, dimension, priors, default options

The vote is pure numpy over (similarities, neighbour labels), so it is tested against a
brute-force implementation and scikit-learn without faiss in the way.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from services.fusion.rules import KnnRules
from services.proxylabel.embedder import EmbedderInfo
from services.runtime.config import StrictModel
from services.runtime.model_files import ModelSpec, write_atomic, write_config

NUM_CLASSES = 6
MODEL_NAME = "proxylabel_knn"
BACKEND = "faiss"
INDEX_FILE = "index.faiss"
LABELS_FILE = "labels.npy"
META_FILE = "index.json"


class KnnOptions(StrictModel):
    """How neighbours vote; stored with the index, each field overridable by the rules file."""

    k: int = Field(50, ge=1, le=4096)
    tau: float = Field(0.1, gt=0)
    weighting: Literal["softmax", "power", "uniform"] = "softmax"
    power_alpha: float = Field(1.0, gt=0)
    aggregation: Literal["vote", "regression"] = "vote"
    similarity_threshold: float | None = Field(None, ge=-1, le=1)
    prior_calibration: bool = False

    def merged(self, overrides: KnnRules | None) -> KnnOptions:
        """These options with every field the overrides set replaced (unset fields keep ours)."""
        if overrides is None:
            return self
        changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
        return self.model_copy(update=changes) if changes else self


class IndexMeta(StrictModel):
    embedder: EmbedderInfo
    num_classes: int = NUM_CLASSES
    rows: int = Field(ge=0)
    # Share of each score among the labelled rows; prior calibration divides votes by these.
    priors: list[float]
    options: KnnOptions = KnnOptions()
    demo: bool = False


@dataclass(frozen=True)
class KnnScores:
    """Per row: the weighted-vote probabilities [n, 6], the weighted mean score [n] (NaN when no
    neighbour voted) and whether no neighbour voted (all below the threshold, or zero weight):
    such a row gets uniform probabilities, and the caller reports it."""

    probabilities: np.ndarray
    expected_score: np.ndarray
    no_neighbours: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def class_priors(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def neighbour_weights(sims: np.ndarray, valid: np.ndarray, options: KnnOptions) -> np.ndarray:
    """Weights [n, k] of the valid neighbours (0 for the others)."""
    sims = np.asarray(sims, np.float64)
    if options.weighting == "uniform":
        w = np.ones_like(sims)
    elif options.weighting == "power":
        w = np.power(np.maximum(sims, 0.0), options.power_alpha)
    else:
        # exp(sim/tau) overflows for tau=0.01 and sim near 1; the row's maximum cancels in the
        # normalisation, so subtract it first.
        z = np.where(valid, sims / options.tau, -np.inf)
        top = np.max(z, axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        w = np.exp(z - top)
    return np.where(valid, w, 0.0)


def knn_probabilities(
    sims: np.ndarray, neighbour_labels: np.ndarray, options: KnnOptions, priors: np.ndarray | None = None
) -> KnnScores:
    """The vote of each row's neighbours.

    sims [n, k] and neighbour_labels [n, k] as faiss returns them (a label < 0 marks a missing
    neighbour, as faiss's -1 index does). Neighbours below the similarity threshold do not vote.
    Probabilities: the normalised weighted vote per score, divided by the class priors first when
    prior calibration is on. Expected score: sum_c c * p_c of those probabilities (= the weighted
    mean label without calibration). `regression` changes only the label (see `knn_labels`).
    """
    sims = np.asarray(sims, np.float64)
    labels = np.asarray(neighbour_labels, np.int64)
    n = sims.shape[0]
    valid = labels >= 0
    if options.similarity_threshold is not None:
        valid &= sims >= options.similarity_threshold
    w = neighbour_weights(sims, valid, options)
    votes = np.zeros((n, NUM_CLASSES), np.float64)
    rows = np.broadcast_to(np.arange(n)[:, None], labels.shape)
    np.add.at(votes, (rows[valid], labels[valid]), w[valid])
    if options.prior_calibration:
        if priors is None:
            raise ValueError("prior calibration needs the class priors of the labelled set")
        p = np.asarray(priors, np.float64)
        # A score absent from the labelled set cannot get votes; keep its column at zero.
        votes = np.divide(votes, p, out=np.zeros_like(votes), where=p > 0)
    total = votes.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    probs = np.divide(votes, total, out=np.full_like(votes, 1.0 / NUM_CLASSES), where=total > 0)
    expected = probs @ np.arange(NUM_CLASSES, dtype=np.float64)
    expected[empty] = np.nan
    return KnnScores(probs.astype(np.float32), expected, empty)


def round_score(expected: np.ndarray) -> np.ndarray:
    """Rounded weighted mean, halves to the lower score (as vote ties go to the lower score).

    The mean is first rounded to 1e-9, so a mean that is a half in exact arithmetic (e.g. 30/20)
    counts as a half whatever the float error of the sum.
    """
    return np.clip(np.ceil(np.round(np.asarray(expected, np.float64), 9) - 0.5), 0, NUM_CLASSES - 1).astype(
        np.int64
    )


def knn_labels(scores: KnnScores, options: KnnOptions) -> np.ndarray:
    """vote: argmax of the probabilities (ties to the lower score); regression: rounded mean."""
    if options.aggregation == "regression":
        return np.where(
            scores.no_neighbours, scores.labels, round_score(np.nan_to_num(scores.expected_score))
        )
    return scores.labels


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous, as faiss wants); zero rows stay zero."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    # einsum sums the squares without a temporary as large as x (shard parts are 10k × 1024).
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None] if x.ndim == 2 else np.linalg.norm(x, axis=-1)
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return np.multiply(x, scale, dtype=np.float32)


class KnnIndex:
    """An exact cosine index over labelled embeddings, with the options stored beside it."""

    def __init__(self, index: Any, labels: np.ndarray, meta: IndexMeta, version: int | None = None) -> None:
        self.index = index  # a faiss index (Any: faiss is imported only where an index is built or read)
        self.labels = labels.astype(np.int8)
        self.meta = meta
        self.version = version
        self.priors = np.asarray(meta.priors, np.float64)

    @property
    def dimension(self) -> int:
        return self.meta.embedder.dimension

    @property
    def embedder(self) -> str:
        return self.meta.embedder.name

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def load(cls, directory: Path, version: int | None = None) -> KnnIndex:
        """Load a version directory (faiss's own format and .npy: nothing executes code)."""
        import faiss

        directory = Path(directory)
        meta = IndexMeta.model_validate_json((directory / META_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        labels = np.load(directory / LABELS_FILE, allow_pickle=False)
        if index.d != meta.embedder.dimension:
            raise ValueError(
                f"{directory}: index has dimension {index.d}, index.json says {meta.embedder.dimension}"
            )
        if index.ntotal != len(labels) or len(labels) != meta.rows:
            raise ValueError(
                f"{directory}: {index.ntotal} vectors, {len(labels)} labels, index.json says {meta.rows} rows"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"{directory}: labels outside 0-{NUM_CLASSES - 1}")
        return cls(index, labels, meta, version)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        labels: np.ndarray,
        embedder: EmbedderInfo,
        options: KnnOptions | None = None,
        demo: bool = False,
    ) -> KnnIndex:
        import faiss

        x = normalise(embeddings)
        if x.shape[1] != embedder.dimension:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the embedder {embedder.dimension}")
        labels = np.asarray(labels, np.int64)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        meta = IndexMeta(
            embedder=embedder,
            rows=len(labels),
            priors=class_priors(labels).tolist(),
            options=options or KnnOptions(),
            demo=demo,
        )
        return cls(index, labels, meta)

    def save(self, directory: Path) -> None:
        """Write the version directory's three files, each atomically; the index file last, since
        its presence is what marks the version complete to a service polling the repository."""
        import faiss

        directory = Path(directory)
        labels = io.BytesIO()
        np.save(labels, self.labels, allow_pickle=False)
        write_atomic(directory / LABELS_FILE, labels.getvalue())
        write_atomic(directory / META_FILE, json.dumps(self.meta.model_dump(), indent=2) + "\n")
        write_atomic(directory / INDEX_FILE, faiss.serialize_index(self.index).tobytes())

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [n, k], indices [n, k]); queries are normalised here, so callers may
        pass raw embeddings. k is capped at the index size; missing neighbours have index -1."""
        x = normalise(embeddings)
        if x.shape[1] != self.dimension:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the index {self.dimension}")
        k = max(1, min(k, self.size))
        if self.size == 0:
            return np.zeros((len(x), 1), np.float32), np.full((len(x), 1), -1, np.int64)
        sims, idx = self.index.search(x, k)
        return sims, idx

    def score(self, embeddings: np.ndarray, options: KnnOptions) -> KnnScores:
        sims, idx = self.search(embeddings, options.k)
        neighbour_labels = np.where(idx >= 0, self.labels[np.maximum(idx, 0)], -1)
        return knn_probabilities(sims, neighbour_labels, options, self.priors)


def write_model(repo: Path, index: KnnIndex, version: int = 1, name: str = MODEL_NAME) -> Path:
    """Write `index` as `<repo>/<name>/<version>/` with its config; returns the model directory."""
    model_dir = Path(repo) / name
    index.save(model_dir / str(version))
    write_config(
        model_dir,
        ModelSpec(
            name=name,
            backend=BACKEND,
            default_model_filename=INDEX_FILE,
            parameters={"demo": str(index.meta.demo).lower(), "embedder": index.embedder},
        ),
    )
    return model_dir
