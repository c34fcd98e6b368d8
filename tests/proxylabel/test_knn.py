"""kNN vote: every option against a brute-force implementation of the same formulas, the uniform
vote against scikit-learn, ties to the lower score, and the index files round trip."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from services.fusion.rules import KnnRules
from services.proxylabel.knn import (
    EmbedderInfo,
    KnnIndex,
    KnnOptions,
    class_priors,
    knn_labels,
    knn_probabilities,
    write_model,
)
from services.runtime.repository import ModelRepository

D = 24


def brute_force(
    x: np.ndarray, labelled: np.ndarray, labels: np.ndarray, o: KnnOptions, priors: np.ndarray
) -> list[tuple[list[float], float, int, bool]]:
    """The formulas of docs/operations.md#fusion-rules, one row and one neighbour at a time, in plain Python."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ln = labelled / np.linalg.norm(labelled, axis=1, keepdims=True)
    out = []
    for q in xn:
        sims = [float(np.dot(q, v)) for v in ln]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[: o.k]
        kept = [j for j in order if o.similarity_threshold is None or sims[j] >= o.similarity_threshold]
        votes = [0.0] * 6
        if o.weighting == "softmax" and kept:
            top = max(sims[j] for j in kept)
        for j in kept:
            if o.weighting == "softmax":
                w = math.exp((sims[j] - top) / o.tau)
            elif o.weighting == "power":
                w = max(sims[j], 0.0) ** o.power_alpha
            else:
                w = 1.0
            votes[int(labels[j])] += w
        if o.prior_calibration:
            votes = [v / p if p > 0 else 0.0 for v, p in zip(votes, priors, strict=True)]
        total = sum(votes)
        if total <= 0:
            out.append(([1 / 6] * 6, float("nan"), 0, True))
            continue
        p = [v / total for v in votes]
        mean = sum(c * pc for c, pc in enumerate(p))
        if o.aggregation == "regression":
            label = min(5, max(0, math.ceil(mean - 0.5)))
        else:
            label = max(range(6), key=lambda c: (p[c], -c))
        out.append((p, mean, label, False))
    return out


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.choice(6, size=400, p=[0.1, 0.2, 0.3, 0.25, 0.1, 0.05])
    centres = rng.standard_normal((6, D))
    labelled = centres[labels] * 0.6 + rng.standard_normal((400, D))
    queries = centres[rng.choice(6, size=60)] * 0.6 + rng.standard_normal((60, D))
    return labelled.astype(np.float32), labels, queries.astype(np.float32)


OPTION_GRID = [
    KnnOptions(
        **dict(
            zip(
                ("weighting", "aggregation", "similarity_threshold", "prior_calibration", "k", "tau"),
                v,
                strict=True,
            )
        )
    )
    for v in itertools.product(
        ("softmax", "power", "uniform"),
        ("vote", "regression"),
        (None, 0.25),
        (False, True),
        (1, 7, 50),
        (0.1,),
    )
] + [
    KnnOptions(tau=0.01),
    KnnOptions(tau=1.0),
    KnnOptions(weighting="power", power_alpha=3.0),
    KnnOptions(k=500),
]


@pytest.mark.parametrize(
    "options", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.model_dump().values())
)
def test_every_option_matches_brute_force(data, options: KnnOptions) -> None:
    labelled, labels, queries = data
    index = KnnIndex.build(labelled, labels, EmbedderInfo(name="test", dimension=D))
    scores = index.score(queries, options)
    want = brute_force(queries, labelled, labels, options, class_priors(labels))
    np.testing.assert_allclose(scores.probabilities, [w[0] for w in want], atol=1e-5)
    np.testing.assert_array_equal(scores.no_neighbours, [w[3] for w in want])
    np.testing.assert_allclose(scores.expected_score, [w[1] for w in want], atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(knn_labels(scores, options), [w[2] for w in want])


def test_uniform_vote_equals_scikit_learn(data) -> None:
    labelled, labels, queries = data
    index = KnnIndex.build(labelled, labels, EmbedderInfo(name="test", dimension=D))
    for k in (1, 5, 50):
        options = KnnOptions(k=k, weighting="uniform")
        scores = index.score(queries, options)
        ref = KNeighborsClassifier(n_neighbors=k, weights="uniform", metric="cosine", algorithm="brute")
        ref.fit(labelled, labels)
        np.testing.assert_allclose(scores.probabilities, ref.predict_proba(queries), atol=1e-6)
        np.testing.assert_array_equal(knn_labels(scores, options), ref.predict(queries))


def test_ties_go_to_the_lower_score() -> None:
    sims = np.array([[0.9, 0.9, 0.5, 0.5], [0.8, 0.8, 0.8, 0.8]])
    neighbours = np.array([[4, 1, 3, 2], [5, 2, 5, 2]])
    uniform = KnnOptions(weighting="uniform", k=4)
    scores = knn_probabilities(sims, neighbours, uniform)
    assert knn_labels(scores, uniform).tolist() == [1, 2]
    # Regression: a mean of exactly 2.5 rounds to 2, 3.5 to 3.
    regression = uniform.model_copy(update={"aggregation": "regression"})
    halves = knn_probabilities(np.ones((2, 2)), np.array([[2, 3], [3, 4]]), regression)
    assert halves.expected_score.tolist() == [2.5, 3.5]
    assert knn_labels(halves, regression).tolist() == [2, 3]


def test_threshold_without_neighbours_is_uniform_and_flagged() -> None:
    options = KnnOptions(similarity_threshold=0.95)
    scores = knn_probabilities(np.array([[0.5, 0.4], [0.99, 0.2]]), np.array([[1, 2], [3, 1]]), options)
    assert scores.no_neighbours.tolist() == [True, False]
    np.testing.assert_allclose(scores.probabilities[0], np.full(6, 1 / 6))
    assert math.isnan(scores.expected_score[0]) and scores.expected_score[1] == 3.0


def test_softmax_is_stable_for_tiny_tau() -> None:
    scores = knn_probabilities(np.array([[0.99, 0.98, 0.1]]), np.array([[1, 2, 3]]), KnnOptions(tau=1e-4))
    assert np.isfinite(scores.probabilities).all() and scores.probabilities[0, 1] > 0.999


def test_overrides_keep_unset_options() -> None:
    stored = KnnOptions(k=20, tau=0.05, weighting="power", power_alpha=2.0)
    merged = stored.merged(KnnRules(k=5, aggregation="regression"))
    assert merged == KnnOptions(k=5, tau=0.05, weighting="power", power_alpha=2.0, aggregation="regression")
    assert stored.merged(KnnRules()) == stored


def test_index_round_trips_through_the_repository(tmp_path, data) -> None:
    labelled, labels, queries = data
    built = KnnIndex.build(
        labelled, labels, EmbedderInfo(name="test", dimension=D), KnnOptions(k=9), demo=True
    )
    write_model(tmp_path, built)
    entry = ModelRepository(tmp_path).get("proxylabel_knn")
    assert entry.ok, entry.error
    assert entry.parameters["demo"] == "true" and entry.kind == "faiss"
    loaded = KnnIndex.load(entry.version_dir(), entry.version)
    assert loaded.meta == built.meta and loaded.meta.options.k == 9
    np.testing.assert_allclose(class_priors(labels), loaded.priors)
    # Unnormalised queries are normalised by the index.
    a = loaded.score(queries * 7.0, loaded.meta.options)
    b = built.score(queries, built.meta.options)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
