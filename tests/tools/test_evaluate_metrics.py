"""tools.modeller.evaluate.metrics: the label metrics against scikit-learn and textbook numpy on random and
edge-case inputs, the reliability bins against a per-sample reference, and the figures' files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    mean_absolute_error,
    precision_recall_fscore_support,
)

from tests.helpers.images import png_size
from tools.modeller.evaluate import figures, metrics


def _case(
    seed: int, n: int, k: int, truth: int | None = None, pred: int | None = None
) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, truth or k, n)
    p = rng.integers(0, pred or k, n)
    return p, y


CASES = [
    ("random 7", _case(0, 400, 7)),
    ("random 6, scores 0-3 only", _case(1, 300, 6, truth=4)),
    ("random 4, predictions 0-1 only", _case(2, 50, 4, pred=2)),
    ("one sample", (np.array([2]), np.array([2]))),
    ("all wrong", (np.array([1, 1, 1, 0]), np.array([0, 0, 0, 1]))),
    ("one class everywhere", (np.zeros(9, np.int64), np.zeros(9, np.int64))),
    ("binary", _case(3, 200, 2)),
]


# Every case with every number of classes it fits in (classes absent from both sides included).
COMBOS = [
    (name, case, k) for name, case in CASES for k in (2, 4, 6, 7) if max(case[0].max(), case[1].max()) < k
]


@pytest.mark.parametrize(("name", "case", "k"), COMBOS, ids=[f"{c[0]}, k={c[2]}" for c in COMBOS])
def test_label_metrics_equal_scikit_learn(name: str, case: tuple[np.ndarray, np.ndarray], k: int) -> None:
    pred, y = case
    labels = list(range(k))
    np.testing.assert_array_equal(
        metrics.confusion_matrix(pred, y, k), confusion_matrix(y, pred, labels=labels)
    )
    precision, recall, f1, support = metrics.precision_recall_f1_support(pred, y, k)
    want = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for got, expected in zip((precision, recall, f1, support), want, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-12)
    assert metrics.macro_f1_of_labels(pred, y, k) == pytest.approx(
        f1_score(y, pred, average="macro", zero_division=0), abs=1e-12
    )
    assert metrics.macro_f1_of_labels(pred, y, k, classes=k) == pytest.approx(
        f1_score(y, pred, labels=labels, average="macro", zero_division=0), abs=1e-12
    )
    assert metrics.mean_absolute_error(pred, y) == pytest.approx(mean_absolute_error(y, pred), abs=1e-12)
    report = metrics.label_report(pred, y, [str(c) for c in labels], ordinal=True)
    assert report.accuracy == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert report.mae == pytest.approx(mean_absolute_error(y, pred), abs=1e-12)
    assert report.confusion_matrix == confusion_matrix(y, pred, labels=labels).tolist()
    # Per-class accuracy is the recall; None for a class no label has (the shard summaries' NaN).
    for c in labels:
        expected = recall[c] if (y == c).any() else None
        assert report.per_class_accuracy[str(c)] == (
            pytest.approx(expected) if expected is not None else None
        )
    assert list(report.support.values()) == np.bincount(y, minlength=k).tolist()
    assert list(report.predicted.values()) == np.bincount(pred, minlength=k).tolist()


def test_label_report_nll_equals_log_loss() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(6), 300)
    y = rng.integers(0, 6, 300)
    r = metrics.label_report(probs.argmax(axis=1), y, list("012345"), probs=probs)
    assert r.nll == pytest.approx(log_loss(y, probs, labels=range(6)), rel=1e-10)


def test_macro_f1_textbook_reference() -> None:
    """F1 = 2PR/(P+R) per class by counting, averaged over the classes seen in either."""
    pred, y = _case(5, 500, 5, truth=4)
    f1s = []
    for c in range(5):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        if tp + fp + fn == 0:
            continue
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    assert metrics.macro_f1_of_labels(pred, y, 5) == pytest.approx(np.mean(f1s), abs=1e-12)


def test_emotion_report_carries_the_confusion_matrix_and_precision_recall() -> None:
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(7, 0.5), 250)
    y = rng.integers(0, 7, 250)
    r = metrics.evaluate(probs, y, [str(c) for c in range(7)])
    pred = probs.argmax(axis=1)
    assert r.confusion_matrix == confusion_matrix(y, pred, labels=range(7)).tolist()
    precision, recall, _, _ = precision_recall_fscore_support(y, pred, labels=range(7), zero_division=0)
    np.testing.assert_allclose(list(r.per_class_precision.values()), precision, atol=1e-12)
    np.testing.assert_allclose(list(r.per_class_recall.values()), recall, atol=1e-12)


def test_bad_label_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="class indices"):
        metrics.confusion_matrix(np.array([0, 7]), np.array([0, 1]), 7)
    with pytest.raises(ValueError, match="predictions for"):
        metrics.confusion_matrix(np.array([0]), np.array([0, 1]), 7)
    with pytest.raises(ValueError, match="no samples"):
        metrics.label_report(np.array([], np.int64), np.array([], np.int64), ["a", "b"])


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_reliability_bins_equal_a_per_sample_reference(bins: int) -> None:
    rng = np.random.default_rng(bins)
    probs = rng.dirichlet(np.full(7, 0.6), 400)
    probs[:5] = np.eye(7)[:5]  # confidence exactly 1: the last bin
    y = rng.integers(0, 7, 400)
    edges, count, acc, conf = metrics.reliability_bins(probs, y, bins)
    for b in range(bins):
        members = [i for i in range(len(y)) if edges[b] < probs[i].max() <= edges[b + 1]]
        assert count[b] == len(members)
        if members:
            assert acc[b] == pytest.approx(np.mean([probs[i].argmax() == y[i] for i in members]))
            assert conf[b] == pytest.approx(np.mean([probs[i].max() for i in members]))
        else:
            assert np.isnan(acc[b]) and np.isnan(conf[b])
    # The ECE is the count-weighted gap of these bins.
    keep = count > 0
    assert metrics.ece(probs, y, bins) == pytest.approx(
        np.sum(count[keep] * np.abs(acc[keep] - conf[keep])) / len(y)
    )


def test_every_figure_is_a_png_of_its_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.ones(7), 100)
    y = rng.integers(0, 7, 100)
    matrix = metrics.confusion_matrix(probs.argmax(axis=1), y, 7)
    made = {
        "reliability": figures.reliability_diagram(tmp_path / "r.png", {"a": (probs, y)}, "t"),
        "confusion": figures.confusion_heatmap(tmp_path / "c.png", matrix, list("ABCDEFG"), "t"),
        "confusion_grid": figures.confusion_grid(
            tmp_path / "g.png", {"x": matrix[:4, :4], "y": matrix[:4, :4]}, list("0123"), "t"
        ),
        "distribution": figures.distribution_bars(
            tmp_path / "d.png", {"p": {"true": [1, 2, 3], "m": [3, 2, 1]}}, list("012"), "t"
        ),
        "sweep": figures.sweep_curves(
            tmp_path / "s.png",
            [0, 0.5, 1],
            {"a": [0.1, 0.5, 0.2]},
            xlabel="x",
            ylabel="y",
            title="t",
            marks={"now": 0.35},
        ),
        "weights": figures.ranked_bars(tmp_path / "w.png", ["a", "b"], [0.5, 0.4], xlabel="x", title="t"),
    }
    for kind, path in made.items():
        assert path.stat().st_size > 1000, kind
        assert png_size(path) == figures.pixel_size(kind), kind
    assert not list(tmp_path.glob(".*"))  # no temporary file left
