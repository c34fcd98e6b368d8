"""How a scored shard compares with the scores it already had (`gpt_scores`): confusion counts,
kept per part in the manifest, and the figures a job's summary reports from their sum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.proxylabel.knn import NUM_CLASSES


@dataclass(frozen=True)
class Evaluation:
    rows_labelled: int
    accuracy: float
    macro_f1: float
    mean_absolute_error: float
    per_class_accuracy: list[float]


def evaluate(confusion: np.ndarray) -> Evaluation | None:
    """Figures of a confusion matrix (rows: known score, columns: proxy label), as scikit-learn
    computes them: macro-F1 over the scores present in either (F1 0 where undefined); per-class
    accuracy is the recall of each score, NaN for a score no labelled row has."""
    c = np.asarray(confusion, np.float64)
    n = c.sum()
    if n == 0:
        return None
    tp = np.diag(c)
    true, pred = c.sum(axis=1), c.sum(axis=0)
    present = (true + pred) > 0
    f1 = np.divide(2 * tp, true + pred, out=np.zeros_like(tp), where=(true + pred) > 0)
    distance = np.abs(np.arange(NUM_CLASSES)[:, None] - np.arange(NUM_CLASSES)[None, :])
    recall = np.divide(tp, true, out=np.full_like(tp, np.nan), where=true > 0)
    return Evaluation(
        int(n),
        float(tp.sum() / n),
        float(f1[present].mean()),
        float((c * distance).sum() / n),
        recall.tolist(),
    )


def confusion_of(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    out = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(out, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    return out
