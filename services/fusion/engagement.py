"""Engagement: selective fusion of the two models per affect, prior correction, smoothing."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from services.fusion.rules import AFFECTS, EngagementRules, PriorCorrection, Smoothing


@dataclass(frozen=True)
class AffectDecision:
    affect: str
    level: int
    probabilities: np.ndarray
    decided_by: str
    confidence: float


def correct_priors(probs: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """p ∝ p / prior^strength, renormalised."""
    adjusted = probs / np.power(prior, strength)
    renormalised: np.ndarray = adjusted / adjusted.sum()
    return renormalised


def decide(outputs: Mapping[str, Mapping[str, np.ndarray]], rules: EngagementRules) -> list[AffectDecision]:
    """outputs: role ("temporal" | "xgboost") → affect → four probabilities.

    For each affect the first rule that holds decides; a rule naming a model that gave no
    output for the affect does not hold.
    """
    decisions = []
    for affect in AFFECTS:
        for rule in rules.affects[affect]:
            probs = outputs.get(rule.use, {}).get(affect)
            if probs is None:
                continue
            p = np.asarray(probs, dtype=np.float64)
            if rule.confidence_above is not None and p.max() <= rule.confidence_above:
                continue
            if rules.prior_correction and affect in rules.prior_correction.priors:
                pc: PriorCorrection = rules.prior_correction
                p = correct_priors(p, np.asarray(pc.priors[affect]), pc.strength)
            level = int(np.argmax(p))
            decisions.append(AffectDecision(affect, level, p.astype(np.float32), rule.use, float(p[level])))
            break
    return decisions


class Smoother:
    """Per-affect temporal smoothing of a live stream's probabilities."""

    def __init__(self, config: Smoothing) -> None:
        self.config = config
        self._ema: np.ndarray | None = None
        self._window: deque[np.ndarray] = deque(maxlen=max(1, len(config.weights)))

    def update(self, probs: ArrayLike) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        if self.config.method == "none":
            return p
        if self.config.method == "ema":
            a = self.config.alpha
            self._ema = p if self._ema is None else a * p + (1 - a) * self._ema
            return self._ema
        self._window.append(p)
        w = np.asarray(self.config.weights[-len(self._window) :], dtype=np.float64)
        smoothed: np.ndarray = (w[:, None] * np.stack(self._window)).sum(axis=0) / w.sum()
        return smoothed
