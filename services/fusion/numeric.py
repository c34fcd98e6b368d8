"""Numerically stable helpers shared by the fusion functions."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    probabilities: np.ndarray = e / np.sum(e, axis=axis, keepdims=True)
    return probabilities
