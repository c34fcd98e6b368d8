"""Emotion: fuse member logits into calibrated probabilities (docs/operations.md#fusion-rules)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from services.fusion.numeric import softmax
from services.fusion.rules import EmotionModeName, EmotionRules

CLASS_NAMES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")


def resolve_temperature(
    rules: EmotionRules, mode: EmotionModeName, stored: float | None, ensemble: str | None = None
) -> float:
    """Which temperature wins. Student mode: the rules file's `emotion.temperature.student`; else
    the one stored beside the student; else 1.0. Ensemble mode, for the named (or default)
    ensemble: its own `temperature`; else `emotion.temperature.ensemble`; else 1.0 (an ensemble's
    fused logits are calibrated once, by the rules)."""
    if mode == "ensemble":
        _, ens = rules.ensemble_rules(ensemble)
        if ens.temperature is not None:
            return ens.temperature
        return rules.temperature.get("ensemble", 1.0)
    if mode in rules.temperature:
        return rules.temperature[mode]
    if stored and stored > 0:
        return stored
    return 1.0


def members_for(rules: EmotionRules, mode: EmotionModeName, ensemble: str | None = None) -> dict[str, float]:
    """Model name → weight for a mode (the student alone has weight 1; ensemble mode: the named
    ensemble, or the rules' default one). UnknownEnsemble for a name the rules do not define."""
    if mode == "student":
        return {rules.student: 1.0}
    _, ens = rules.ensemble_rules(ensemble)
    return {m.model: m.weight for m in ens.members}


def fusion_space_for(rules: EmotionRules, mode: EmotionModeName, ensemble: str | None = None) -> str:
    """The fusion space of a mode's members (one member of weight 1: both spaces agree)."""
    if mode == "student":
        return "logit"
    return rules.ensemble_rules(ensemble)[1].fusion_space


def _normalised(member_logits: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> dict[str, float]:
    """The weights scaled to sum to 1, so 0.4/0.4/0.2 and 2/2/1 mean the same ensemble."""
    missing = [m for m in weights if m not in member_logits]
    if missing:
        raise KeyError(f"no logits for members {missing}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("member weights sum to zero")
    return {m: w / total for m, w in weights.items()}


def fused_logits(member_logits: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Σ w_m·l_m (float64, normalised weights): the logit-space ensemble before its temperature and
    softmax (what a temperature is fitted on)."""
    # Started from a 0-d zero rather than sum's int 0, so the result is typed as an array.
    return sum(
        (
            w * np.asarray(member_logits[m], dtype=np.float64)
            for m, w in _normalised(member_logits, weights).items()
        ),
        np.zeros(()),
    )


def fuse_logits(
    member_logits: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    temperature: float,
    space: str = "logit",
) -> np.ndarray:
    """Probabilities [faces, classes] from each member's logits [faces, classes], weights normalised."""
    if space == "logit":
        return softmax(fused_logits(member_logits, weights) / temperature).astype(np.float32)
    if space == "prob":
        probs = sum(
            w * softmax(np.asarray(member_logits[m], dtype=np.float64) / temperature)
            for m, w in _normalised(member_logits, weights).items()
        )
        return np.asarray(probs, dtype=np.float32)
    raise ValueError(f"unknown fusion space {space!r}")
