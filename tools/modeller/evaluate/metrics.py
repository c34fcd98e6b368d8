"""Classification metrics and temperature fitting, pure numpy (+ scipy's 1-D minimiser).

The definitions follow the research's evaluation (docs/architecture.md, modellers) and scikit-learn, so a
served model's figures can be put beside the offline ones:

- ``accuracy``: share of top-1 predictions equal to the label.
- ``per_class_f1`` / ``macro_f1``: F1 = 2·TP / (2·TP + FP + FN) for every one of the K classes,
  0 where that is 0/0 (sklearn's ``zero_division=0``). The macro mean is over **all K classes**,
  as ``f1_score(labels=range(K), average="macro", zero_division=0)``: a class absent from both the
  labels and the predictions counts as F1 = 0 and pulls the mean down, so a manifest without some
  class can never reach macro-F1 1.
- ``nll``: mean of −log p[label], with p clipped below at 1e-12 so a hard zero stays finite.
  scikit-learn's ``log_loss`` (1.9 here) clips at the dtype's machine epsilon instead; the two agree
  whenever every p[label] is above both bounds.
- ``ece``: Guo et al. (2017): top-1 confidence, equal-width bins (lo, hi] over (0, 1],
  Σ_b |acc_b − conf_b| · n_b / n.
- ``brier``: multi-class, mean over samples of Σ_k (p_k − 1[y = k])². For K = 2 this is twice the
  binary score of the positive class (sklearn's ``brier_score_loss`` on p[:, 1]).
- ``fit_temperature``: T minimising the NLL of softmax(logits / T), searched on log T.

Label metrics (``confusion_matrix``, ``precision_recall_f1_support``, ``mean_absolute_error``,
``label_report``) take predicted labels, so they serve answers whose label is not the argmax of
their probabilities (the kNN's regression) as well. ``classes=None`` follows scikit-learn's
default: the macro mean is over the classes present in the labels or the predictions (what the
shard jobs' summaries report); ``classes=K`` is over all K (what the emotion report uses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

NLL_CLIP = 1e-12
ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [samples, classes], got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"{y.shape[0] if y.ndim else 0} labels for {p.shape[0]} samples")
    if p.shape[0] == 0:
        raise ValueError("no samples")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")
    return p, y.astype(np.int64)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    p, y = _check(probs, labels)
    return float(np.mean(np.argmax(p, axis=1) == y))


def per_class_f1(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """F1 of each of the K classes (0 where undefined)."""
    p, y = _check(probs, labels)
    k = p.shape[1]
    pred = np.argmax(p, axis=1)
    tp = np.bincount(y[pred == y], minlength=k).astype(np.float64)
    fp = np.bincount(pred, minlength=k) - tp
    fn = np.bincount(y, minlength=k) - tp
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over all K classes, absent ones included as 0 (see the module notes)."""
    return float(np.mean(per_class_f1(probs, labels)))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p, y = _check(probs, labels)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], NLL_CLIP))))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    p, y = _check(probs, labels)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # searchsorted(side="left") puts a confidence equal to an edge in the bin that edge closes,
    # i.e. bins are (lo, hi]; a confidence of 0 (impossible for a top-1) joins the first bin.
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, minlength=bins) - np.bincount(index, conf, minlength=bins))
    # Σ_b |Σ correct − Σ conf| / n  ==  Σ_b (n_b / n) · |acc_b − conf_b|
    return float(np.sum(gap[count > 0]) / len(y))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def softmax_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """NLL of softmax(logits / T), from log-softmax (no clipping: exact even for huge logits)."""
    z, y = _check(logits, labels)
    z = z / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def minimise_temperature(
    objective: Callable[[float], float], bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The T in bounds minimising objective(T), searched on log T (bounded Brent: deterministic).

    NLL(softmax(z / T)) is convex in 1/T, hence unimodal in log T, so a bounded 1-D search finds
    the global minimum; log T makes 0.5 and 2.0 equally far from 1.
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda s: objective(float(np.exp(s))),
        bounds=(np.log(lo), np.log(hi)),
        method="bounded",
        options={"xatol": 1e-7, "maxiter": 500},
    )
    best = float(np.exp(result.x))
    # Brent never evaluates the bounds themselves: keep one if it is better (monotone objective).
    candidates = [(objective(best), best), (objective(lo), lo), (objective(hi), hi)]
    return min(candidates, key=lambda c: (c[0], c[1] != best))[1]


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature T minimising the NLL of softmax(logits / T)."""
    z, y = _check(logits, labels)
    return minimise_temperature(lambda t: softmax_nll(z, y, t), bounds)


@dataclass
class EvaluationReport:
    """Metrics of one set of probabilities; with a fitted temperature, the same after scaling."""

    n: int
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    nll: float
    ece: float
    brier: float
    # Samples per class in the labels: tells which F1 values are of absent classes.
    support: dict[str, int] = field(default_factory=dict)
    temperature: float | None = None
    scaled: EvaluationReport | None = None
    # Rows: the label, columns: the prediction (scikit-learn's layout), in class order.
    confusion_matrix: list[list[int]] = field(default_factory=list)
    per_class_precision: dict[str, float] = field(default_factory=dict)
    per_class_recall: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], bins: int = ECE_BINS
) -> EvaluationReport:
    p, y = _check(probs, labels)
    if len(class_names) != p.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {p.shape[1]} classes")
    f1 = per_class_f1(p, y)
    counts = np.bincount(y, minlength=p.shape[1])
    precision, recall, _, _ = precision_recall_f1_support(p.argmax(axis=1), y, p.shape[1])
    return EvaluationReport(
        n=len(y),
        accuracy=accuracy(p, y),
        macro_f1=float(np.mean(f1)),
        per_class_f1={c: float(v) for c, v in zip(class_names, f1, strict=True)},
        nll=nll(p, y),
        ece=ece(p, y, bins),
        brier=brier(p, y),
        support={c: int(v) for c, v in zip(class_names, counts, strict=True)},
        confusion_matrix=confusion_matrix(p.argmax(axis=1), y, p.shape[1]).tolist(),
        per_class_precision={c: float(v) for c, v in zip(class_names, precision, strict=True)},
        per_class_recall={c: float(v) for c, v in zip(class_names, recall, strict=True)},
    )


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges [bins + 1], count, accuracy, mean confidence per bin; NaN where a bin is empty),
    with the bins of ``ece``: what a reliability diagram draws."""
    p, y = _check(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(index, correct, minlength=bins) / count
        mean_conf = np.bincount(index, conf, minlength=bins) / count
    return edges, count, acc, mean_conf


# Label metrics ------------------------------------------------------------------------------------
def _check_labels(predicted: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predicted)
    y = np.asarray(labels)
    if pred.shape != y.shape or y.ndim != 1:
        raise ValueError(f"{pred.shape} predictions for {y.shape} labels")
    if len(y) == 0:
        raise ValueError("no samples")
    for name, v in (("labels", y), ("predictions", pred)):
        if not np.issubdtype(v.dtype, np.integer) or v.min() < 0 or v.max() >= k:
            raise ValueError(f"{name} must be class indices in [0, {k})")
    return pred.astype(np.int64), y.astype(np.int64)


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts; row = label, column = prediction (scikit-learn's ``confusion_matrix``)."""
    pred, y = _check_labels(predicted, labels, k)
    out = np.zeros((k, k), np.int64)
    np.add.at(out, (y, pred), 1)
    return out


def precision_recall_f1_support(
    predicted: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class, as scikit-learn's ``precision_recall_fscore_support(labels=range(k),
    zero_division=0)``: 0 where a ratio is 0/0."""
    c = confusion_matrix(predicted, labels, k).astype(np.float64)
    tp = np.diag(c)
    true, pred = c.sum(axis=1), c.sum(axis=0)
    precision = np.divide(tp, pred, out=np.zeros(k), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros(k), where=true > 0)
    f1 = np.divide(2 * tp, true + pred, out=np.zeros(k), where=(true + pred) > 0)
    return precision, recall, f1, true.astype(np.int64)


def macro_f1_of_labels(
    predicted: np.ndarray, labels: np.ndarray, k: int, classes: int | None = None
) -> float:
    """Macro F1 over all k classes (``classes=k``) or, by default, over the classes present in the
    labels or the predictions (scikit-learn's ``f1_score(average="macro")`` without ``labels``)."""
    pred, y = _check_labels(predicted, labels, k)
    _, _, f1, _ = precision_recall_f1_support(pred, y, k)
    if classes is not None:
        return float(np.mean(f1))
    present = np.zeros(k, bool)
    present[y] = True
    present[pred] = True
    return float(np.mean(f1[present]))


def mean_absolute_error(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean |prediction − label| of ordinal labels (scikit-learn's ``mean_absolute_error``)."""
    pred, y = np.asarray(predicted, np.float64), np.asarray(labels, np.float64)
    if pred.shape != y.shape or len(y) == 0:
        raise ValueError(f"{pred.shape} predictions for {y.shape} labels")
    return float(np.mean(np.abs(pred - y)))


@dataclass
class LabelReport:
    """Figures of predicted labels against known ones (ordinal classes: with the MAE)."""

    n: int
    accuracy: float
    macro_f1: float
    mae: float | None
    per_class_f1: dict[str, float]
    # Recall of each class (the shard summaries' "per-class accuracy"); None for a class no label has.
    per_class_accuracy: dict[str, float | None]
    support: dict[str, int]
    predicted: dict[str, int]
    confusion_matrix: list[list[int]]
    nll: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_report(
    predicted: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    ordinal: bool = False,
    classes: int | None = None,
    probs: np.ndarray | None = None,
) -> LabelReport:
    """Accuracy, macro-F1 (see ``macro_f1_of_labels`` for ``classes``), MAE when ordinal,
    per-class F1 and accuracy (recall), the true and predicted distributions, the confusion
    matrix; the NLL when the probabilities are given."""
    k = len(class_names)
    pred, y = _check_labels(predicted, labels, k)
    c = confusion_matrix(pred, y, k)
    _, recall, f1, support = precision_recall_f1_support(pred, y, k)
    return LabelReport(
        n=len(y),
        accuracy=float(np.mean(pred == y)),
        macro_f1=macro_f1_of_labels(pred, y, k, classes),
        mae=mean_absolute_error(pred, y) if ordinal else None,
        per_class_f1={n: float(v) for n, v in zip(class_names, f1, strict=True)},
        per_class_accuracy={
            n: (float(r) if s else None) for n, r, s in zip(class_names, recall, support, strict=True)
        },
        support={n: int(v) for n, v in zip(class_names, support, strict=True)},
        predicted={n: int(v) for n, v in zip(class_names, c.sum(axis=0), strict=True)},
        confusion_matrix=c.tolist(),
        nll=nll(probs, y) if probs is not None else None,
    )
