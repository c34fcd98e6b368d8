"""Proxy labels: soft voting of the kNN and MLP probabilities (docs/operations.md#fusion-rules)."""

from __future__ import annotations

import numpy as np

from services.fusion.rules import ProxyLabelRules


def soft_vote(knn: np.ndarray | None, mlp: np.ndarray | None, rules: ProxyLabelRules) -> np.ndarray:
    """Probabilities [rows, 6] by the rules' mode; ensemble = alpha*mlp + (1-alpha)*knn.

    A mode whose member output is missing is an error, never a silent fallback to the other.
    """
    needed = {"knn": ("knn",), "mlp": ("mlp",), "ensemble": ("knn", "mlp")}[rules.mode]
    given = {"knn": knn, "mlp": mlp}
    missing = [name for name in needed if given[name] is None]
    if missing:
        raise ValueError(f"proxylabel mode {rules.mode!r} needs the {' and '.join(missing)} probabilities")
    if rules.mode == "knn":
        return np.asarray(knn, dtype=np.float32)
    if rules.mode == "mlp":
        return np.asarray(mlp, dtype=np.float32)
    return (
        rules.alpha * np.asarray(mlp, np.float64) + (1 - rules.alpha) * np.asarray(knn, np.float64)
    ).astype(np.float32)


def labels_of(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, confidence) per row; ties go to the lower score, as numpy's argmax and
    scikit-learn do."""
    labels = np.argmax(probs, axis=1)
    return labels, probs[np.arange(len(probs)), labels]


def final_labels(
    fused: np.ndarray, rules: ProxyLabelRules, knn_labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(label, confidence) per row. In knn mode the kNN's own label decides (the vote's argmax,
    or the rounded weighted mean under regression), still reporting the vote's probabilities;
    otherwise the argmax of the fused probabilities."""
    if rules.mode == "knn" and knn_labels is not None:
        labels = np.asarray(knn_labels, dtype=np.int64)
        return labels, fused[np.arange(len(labels)), labels]
    return labels_of(fused)
