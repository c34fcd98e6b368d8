"""Proxylabel pipeline, plain Python: rows → embeddings → kNN vote and MLP probabilities.

It returns each model's probabilities per row; the final label is made by
`services.fusion.proxylabel` (by the gateway for `ScoreTexts`, by the shard job for shards).
CPU-heavy steps (faiss search, text features) run in worker threads so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from services.fusion.rules import KnnRules
from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.embedder import EmbedderInfo, TextEmbedder
from services.proxylabel.features import (
    FEATURE_VERSION,
    Conversations,
    FeatureStats,
    compute_features,
    from_texts,
)
from services.proxylabel.knn import BACKEND as KNN_BACKEND
from services.proxylabel.knn import (
    NUM_CLASSES,
    KnnIndex,
    KnnOptions,
    KnnScores,
    knn_labels,
    normalise,
)
from services.runtime.backends.base import Backend
from services.runtime.config import StrictModel
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServingError
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from services.runtime.servicing import ServedModel, is_demo

log = logging.getLogger(__name__)

MLP_META_FILE = "mlp.json"


class MlpMeta(StrictModel):
    """What the Fusion MLP was trained on, stored beside it as `mlp.json`."""

    feature_version: str = FEATURE_VERSION
    features: FeatureStats
    embedder: EmbedderInfo
    input_name: str = "features"
    # The graph ends in a softmax: its output is the six probabilities.
    output_name: str = "probabilities"
    num_classes: int = NUM_CLASSES
    hidden_layers: list[int] = Field(default_factory=list)
    demo: bool = False

    @property
    def input_dimension(self) -> int:
        return self.embedder.dimension + len(self.features.names)


@dataclass(frozen=True)
class RowInput:
    """One row of a request: the text (or prompt + response) and maybe its embedding."""

    text: str
    response: str = ""
    embedding: np.ndarray | None = None
    embedder: str = ""


@dataclass
class RowResult:
    error: ServingError | None = None
    knn_probabilities: np.ndarray | None = None
    mlp_probabilities: np.ndarray | None = None
    knn_expected_score: float = float("nan")
    knn_label: int = -1
    # Set when the row was scored but the kNN found no neighbour above the threshold.
    note: str = ""


@dataclass(frozen=True)
class BatchScores:
    knn: KnnScores | None
    mlp: np.ndarray | None


NO_NEIGHBOUR = (
    "no labelled neighbour with similarity at or above the threshold: kNN probabilities are uniform"
)


class ProxyLabelPipeline:
    def __init__(
        self,
        config: ProxyLabelConfig,
        backend: Backend | None,
        metrics: Metrics,
        knn: KnnIndex | None = None,
        mlp: MlpMeta | None = None,
        embedder: object | None = None,
        models: Sequence[ServedModel] = (),
        mlp_max_batch: int = 256,
    ) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.knn = knn
        self.mlp = mlp
        # A TextEmbedder (services.proxylabel.embedder) or anything with name, dimension, embed().
        self.embedder = embedder
        self.models = list(models)
        self.mlp_max_batch = max(1, mlp_max_batch)
        # What the repository looked like when the index was loaded (a reload compares it).
        self.knn_fingerprint: tuple = ()

    @classmethod
    async def load(
        cls,
        config: ProxyLabelConfig,
        repository: ModelRepository,
        backend: Backend | None,
        metrics: Metrics,
        embedder: object | None = None,
        previous: ProxyLabelPipeline | None = None,
    ) -> ProxyLabelPipeline:
        """Load what the repository has; a model that is absent or broken is logged and left out
        (requests that need it get FAILED_PRECONDITION naming it). With `previous` (a reload),
        an unchanged index is reused and one whose new version fails to load keeps serving."""
        models: list[ServedModel] = []
        mlp = None
        mlp_max_batch = 256
        knn, knn_served, knn_fingerprint = await cls._load_knn(config, repository, previous)
        if knn_served is not None:
            models.append(knn_served)
        ready = {s.name: s for s in (backend.models() if backend else []) if s.ready}
        if config.mlp_model in repository and config.mlp_model in ready:
            entry = repository.get(config.mlp_model)
            try:
                mlp = MlpMeta.model_validate_json(entry.file(MLP_META_FILE).read_text())
                if mlp.feature_version != FEATURE_VERSION or mlp.features.version != FEATURE_VERSION:
                    raise ValueError(
                        f"trained on text features {mlp.feature_version}, this build computes "
                        f"{FEATURE_VERSION}"
                    )
                if entry.config is not None and entry.config.max_batch_size > 0:
                    mlp_max_batch = entry.config.max_batch_size
                models.append(
                    ServedModel(
                        entry.name,
                        ready[entry.name].version,
                        ready[entry.name].backend,
                        is_demo(entry.parameters) or mlp.demo,
                    )
                )
            except Exception as exc:
                log.error("MLP %s not usable: %s", config.mlp_model, exc)
                mlp = None
        if (
            embedder is None
            and backend is not None
            and config.embedder_model in repository
            and config.embedder_model in ready
        ):
            try:
                embedder = TextEmbedder.from_repository(repository, backend, config.embedder_model)
            except ServingError as exc:
                log.error("text embedder %s not usable: %s", config.embedder_model, exc.message)
        if embedder is not None and config.embedder_model in ready:
            entry = repository.get(config.embedder_model)
            models.append(
                ServedModel(
                    entry.name,
                    ready[entry.name].version,
                    ready[entry.name].backend,
                    is_demo(entry.parameters),
                )
            )
        pipeline = cls(config, backend, metrics, knn, mlp, embedder, models, mlp_max_batch)
        pipeline.knn_fingerprint = knn_fingerprint
        return pipeline

    @staticmethod
    async def _load_knn(
        config: ProxyLabelConfig, repository: ModelRepository, previous: ProxyLabelPipeline | None
    ) -> tuple[KnnIndex | None, ServedModel | None, tuple]:
        """(index, how it is reported, the repository fingerprint it was loaded from)."""
        if config.knn_model not in repository:
            return None, None, ()
        entry = repository.get(config.knn_model)
        kept = previous if previous is not None and previous.knn is not None else None
        kept_served = next((m for m in kept.models if m.name == config.knn_model), None) if kept else None
        if kept is not None and kept.knn_fingerprint == entry.fingerprint:
            return kept.knn, kept_served, kept.knn_fingerprint
        try:
            if entry.error:
                raise ValueError(entry.error)
            knn = await asyncio.to_thread(KnnIndex.load, entry.version_dir(), entry.version)
        except Exception as exc:  # one bad model must not stop the service
            if kept is not None:
                log.error(
                    "kNN index %s: the new files are not loaded (%s); version %s keeps serving",
                    config.knn_model,
                    exc,
                    kept.knn.version if kept.knn else None,
                )
                return kept.knn, kept_served, kept.knn_fingerprint
            log.error("kNN index %s not loaded: %s", config.knn_model, exc)
            return None, None, ()
        served = ServedModel(
            entry.name, entry.version, KNN_BACKEND, is_demo(entry.parameters) or knn.meta.demo
        )
        return knn, served, entry.fingerprint

    # -- what a request needs

    def require(self, run_knn: bool, run_mlp: bool, purpose: str) -> None:
        """FAILED_PRECONDITION naming the models a mode needs that are not loaded, or an index and
        MLP built with different embedders."""
        missing = ([self.config.knn_model] if run_knn and self.knn is None else []) + (
            [self.config.mlp_model] if run_mlp and self.mlp is None else []
        )
        if missing:
            raise FailedPrecondition(
                f"{purpose} needs model(s) {', '.join(missing)}, which are not loaded from the service's model "
                "repository; build them with `make models` or the proxylabel tools"
            )
        if (
            run_knn
            and run_mlp
            and self.knn
            and self.mlp
            and (
                self.knn.embedder != self.mlp.embedder.name
                or self.knn.dimension != self.mlp.embedder.dimension
            )
        ):
            raise FailedPrecondition(
                f"the kNN index was built with {self.knn.embedder} ({self.knn.dimension}-d) but the MLP with "
                f"{self.mlp.embedder.name} ({self.mlp.embedder.dimension}-d): they cannot score the same rows"
            )

    def expected_embedder(self, run_knn: bool, run_mlp: bool) -> EmbedderInfo:
        """The embedder whose vectors the requested models compare (call `require` first)."""
        if run_knn and self.knn is not None:
            return self.knn.meta.embedder
        assert self.mlp is not None
        return self.mlp.embedder

    def embedder_problem(self, expected: EmbedderInfo) -> str | None:
        """Why rows without an embedding cannot be embedded here (None when they can)."""
        if self.embedder is None:
            return (
                f"the row has no embedding and the text embedder '{self.config.embedder_model}' is not in "
                f"the model repository"
            )
        name, dim = self.embedder.name, self.embedder.dimension  # type: ignore[attr-defined]
        if name != expected.name or dim != expected.dimension:
            return (
                f"the row has no embedding and the text embedder is {name} ({dim}-d), but the models were "
                f"built with {expected.name} ({expected.dimension}-d)"
            )
        return None

    def knn_options(self, overrides: KnnRules | None) -> KnnOptions:
        base = self.knn.meta.options if self.knn is not None else KnnOptions()
        return base.merged(overrides)

    # -- work

    async def embed(self, texts: list[str]) -> np.ndarray:
        with self.metrics.stage("preprocess", self.config.embedder_model):
            return await self.embedder.embed(texts)  # type: ignore[union-attr]

    async def score(
        self,
        embeddings: np.ndarray,
        conversations: Conversations | None,
        options: KnnOptions,
        run_knn: bool,
        run_mlp: bool,
    ) -> BatchScores:
        """kNN and/or MLP outputs for rows whose embeddings are valid (finite, right width)."""
        emb = normalise(embeddings)
        knn = mlp = None
        if run_knn:
            assert self.knn is not None
            with self.metrics.stage("infer", self.config.knn_model):
                knn = await asyncio.to_thread(self.knn.score, emb, options)
        if run_mlp and len(emb):
            assert self.mlp is not None and conversations is not None and self.backend is not None
            with self.metrics.stage("preprocess", self.config.mlp_model):
                feats = await asyncio.to_thread(self._features, conversations)
            x = np.ascontiguousarray(np.concatenate([emb, feats], axis=1), dtype=np.float32)
            # All chunks at once: the backend's batcher runs them as its batch size allows.
            step = self.mlp_max_batch
            results = await asyncio.gather(
                *(
                    self.backend.infer(self.config.mlp_model, {self.mlp.input_name: x[i : i + step]})
                    for i in range(0, len(x), step)
                )
            )
            mlp = np.concatenate([np.asarray(r.outputs[self.mlp.output_name], np.float32) for r in results])
        elif run_mlp:
            mlp = np.zeros((0, NUM_CLASSES), np.float32)
        return BatchScores(knn, mlp)

    def _features(self, conversations: Conversations) -> np.ndarray:
        assert self.mlp is not None
        return self.mlp.features.standardise(compute_features(conversations))

    async def score_rows(
        self, rows: Sequence[RowInput], overrides: KnnRules | None, run_knn: bool, run_mlp: bool
    ) -> list[RowResult]:
        """Scores of each row of a request; a problem with one row is reported on that row."""
        self.require(run_knn, run_mlp, "proxy labelling")
        expected = self.expected_embedder(run_knn, run_mlp)
        options = self.knn_options(overrides)
        results = [RowResult() for _ in rows]
        vectors: dict[int, np.ndarray] = {}
        to_embed: list[int] = []
        for i, row in enumerate(rows):
            results[i].error = self._row_problem(row, expected)
            if results[i].error is None:
                if row.embedding is not None and len(row.embedding):
                    vectors[i] = np.asarray(row.embedding, np.float32)
                else:
                    to_embed.append(i)
        if to_embed:
            problem = self.embedder_problem(expected)
            if problem:
                for i in to_embed:
                    results[i].error = FailedPrecondition(problem)
            else:
                conv = from_texts([rows[i].text for i in to_embed], [rows[i].response for i in to_embed])
                embedded = await self.embed(conv.rendered())
                # What the embedder made is checked like a given embedding: never scored when unusable.
                for i, vector, problem in zip(
                    to_embed, embedded, embedding_problem(embedded, expected.dimension), strict=True
                ):
                    if problem:
                        results[i].error = FailedPrecondition(f"the text embedder's {problem}")
                    else:
                        vectors[i] = vector
        ok = sorted(vectors)
        if not ok:
            return results
        conversations = from_texts([rows[i].text for i in ok], [rows[i].response for i in ok])
        scores = await self.score(
            np.stack([vectors[i] for i in ok]), conversations, options, run_knn, run_mlp
        )
        own_labels = knn_labels(scores.knn, options) if scores.knn is not None else None
        for j, i in enumerate(ok):
            r = results[i]
            if scores.knn is not None and own_labels is not None:
                r.knn_probabilities = scores.knn.probabilities[j]
                r.knn_expected_score = float(scores.knn.expected_score[j])
                r.knn_label = int(own_labels[j])
                if scores.knn.no_neighbours[j]:
                    if not run_mlp:
                        r.error = FailedPrecondition(
                            f"no labelled neighbour with similarity >= {options.similarity_threshold}"
                        )
                        r.knn_probabilities = None
                        continue
                    r.note = NO_NEIGHBOUR
            if scores.mlp is not None:
                r.mlp_probabilities = scores.mlp[j]
        return results

    def _row_problem(self, row: RowInput, expected: EmbedderInfo) -> ServingError | None:
        if not (row.text.strip() or row.response.strip()):
            return InvalidArgument("empty text")
        if len(row.text) + len(row.response) > self.config.max_text_chars:
            return ResourceExhausted(
                f"text of {len(row.text) + len(row.response)} characters exceeds the limit "
                f"of {self.config.max_text_chars}"
            )
        if row.embedding is None or not len(row.embedding):
            return None
        if row.embedder and row.embedder != expected.name:
            return FailedPrecondition(
                f"the row was embedded by {row.embedder}, the models by {expected.name}: "
                "embeddings of different embedders cannot be compared"
            )
        problem = embedding_problem(np.asarray(row.embedding, np.float32)[None, :], expected.dimension)[0]
        return InvalidArgument(problem) if problem else None


# An embedding is scored only when its L2 norm is well inside what float32 normalisation handles:
# below the minimum its squares underflow (a subnormal or tiny vector normalises to zero, or to
# noise), above the maximum they overflow (normalised to zero). Either way the row would be
# scored on a vector that is not the one given, so it is refused with a reason instead.
MIN_EMBEDDING_NORM = 1e-12
MAX_EMBEDDING_NORM = 1e18


def embedding_problem(embeddings: np.ndarray, dimension: int) -> list[str]:
    """Per row: why the embedding is unusable ("" when it is fine)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != dimension:
        width = embeddings.shape[1] if embeddings.ndim == 2 else 0
        return [f"embedding has {width} values, the models take {dimension}"] * len(embeddings)
    # Reductions only, no temporary the size of the matrix: shard parts are 10k × 1024 floats.
    finite = np.isfinite(embeddings).all(axis=1)
    zero = np.asarray(~embeddings.any(axis=1))  # an array (the stubs allow a scalar for 1-D input)
    with np.errstate(over="ignore", invalid="ignore"):
        # In float64, where neither underflows nor overflows for float32 values.
        norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    reasons = [""] * len(embeddings)
    bad = ~finite | zero | ~(norms >= MIN_EMBEDDING_NORM) | ~(norms <= MAX_EMBEDDING_NORM)
    for i in np.flatnonzero(bad):
        if not finite[i]:
            reasons[i] = "embedding has NaN or infinite values"
        elif zero[i]:
            reasons[i] = "embedding is all zeros"
        elif norms[i] < MIN_EMBEDDING_NORM:
            reasons[i] = (
                f"embedding's norm {norms[i]:.3g} is too close to zero to normalise (it must be at "
                f"least {MIN_EMBEDDING_NORM:g})"
            )
        else:
            reasons[i] = (
                f"embedding's norm {norms[i]:.3g} is too large to normalise (it must be at most "
                f"{MAX_EMBEDDING_NORM:g})"
            )
    return reasons


@contextlib.asynccontextmanager
async def local_pipeline(repo: Path, metrics: Metrics | None = None) -> AsyncIterator[ProxyLabelPipeline]:
    """A pipeline over a repository with its own in-process ONNX Runtime backend, closed on exit:
    what shard jobs outside the service (the CLI, tests) run on."""
    from services.runtime.backends.onnx import OnnxBackend, OnnxConfig

    metrics = metrics or Metrics("proxylabel-local")
    repository = ModelRepository(repo)
    backend = OnnxBackend(repository, OnnxConfig(), metrics)
    await backend.start()
    try:
        yield await ProxyLabelPipeline.load(
            ProxyLabelConfig(model_repository=repo), repository, backend, metrics
        )
    finally:
        await backend.close()
