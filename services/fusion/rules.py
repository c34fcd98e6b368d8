"""The fusion rules file: schema, validation, version and reload without restart.

One YAML file drives every final answer (docs/operations.md#fusion-rules). Unknown keys are errors. The version
is the file's declared ``version`` (if any) joined to a hash of its content, so an edit that
forgets to bump the declared version still changes the version callers see.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from services.runtime.config import StrictModel, describe_validation_error

log = logging.getLogger(__name__)

EmotionModeName = Literal["ensemble", "student"]
AffectName = Literal["engagement", "boredom", "confusion", "frustration"]
AFFECTS: tuple[AffectName, ...] = ("engagement", "boredom", "confusion", "frustration")


class EmotionMember(StrictModel):
    model: str = Field(min_length=1)
    weight: float = Field(ge=0)


def _research_members() -> list[EmotionMember]:
    return [
        EmotionMember(model="emotion_rn18", weight=0.4),
        EmotionMember(model="emotion_b3", weight=0.4),
        EmotionMember(model="emotion_cnxt", weight=0.2),
    ]


# The ensemble a rules file gets when it names none (the research's three timm teachers); the
# shipped file adds `pretrained` and makes it the one mode ENSEMBLE uses.
DEFAULT_ENSEMBLE = "research"
ENSEMBLE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class EnsembleRules(StrictModel):
    """One named emotion ensemble: its members and how their logits are fused."""

    members: list[EmotionMember] = Field(min_length=1)
    # logit: softmax(sum(w_i * l_i) / T); prob: sum(w_i * softmax(l_i / T)).
    fusion_space: Literal["logit", "prob"] = "logit"
    # This ensemble's temperature; absent: emotion.temperature.ensemble, else 1.0.
    temperature: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> EnsembleRules:
        if sum(m.weight for m in self.members) <= 0:
            raise ValueError("ensemble member weights must not all be zero")
        if len({m.model for m in self.members}) != len(self.members):
            raise ValueError("ensemble members must be distinct models")
        return self


class UnknownEnsemble(KeyError):
    """A request or the rules name an ensemble the rules do not define."""


class EmotionRules(StrictModel):
    default_mode: EmotionModeName = "student"
    student: str = "emotion_student"
    # The ensemble of mode ENSEMBLE when a request names none.
    ensemble: str = DEFAULT_ENSEMBLE
    ensembles: dict[str, EnsembleRules] = Field(
        default_factory=lambda: {DEFAULT_ENSEMBLE: EnsembleRules(members=_research_members())}
    )
    # Overrides per mode; absent: the student's stored temperature, or for an ensemble its own
    # `temperature`, else 1.0. `ensemble` here applies to every ensemble that sets none.
    temperature: dict[EmotionModeName, float] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: object) -> object:
        """The old form, `emotion.members` / `emotion.fusion_space`: the members and space of the
        one ensemble `emotion.ensemble` names (default `research`, members the research teachers)."""
        if not isinstance(data, dict) or not ({"members", "fusion_space"} & data.keys()):
            return data
        if "ensembles" in data:
            raise ValueError(
                "emotion.members and emotion.fusion_space are the one-ensemble form: with "
                "emotion.ensembles, set them under emotion.ensembles.<name>"
            )
        data = dict(data)
        one: dict[str, object] = {
            "members": data.pop("members") if "members" in data else _research_members()
        }
        if "fusion_space" in data:
            one["fusion_space"] = data.pop("fusion_space")
        name = data.get("ensemble", DEFAULT_ENSEMBLE)  # not a string: reported on `emotion.ensemble`
        data["ensembles"] = {name if isinstance(name, str) else DEFAULT_ENSEMBLE: one}
        return data

    @model_validator(mode="after")
    def _check(self) -> EmotionRules:
        bad = [name for name in self.ensembles if not re.fullmatch(ENSEMBLE_NAME, name)]
        if bad:
            raise ValueError(f"ensemble names must match {ENSEMBLE_NAME}: {', '.join(repr(b) for b in bad)}")
        if self.ensemble not in self.ensembles:
            raise ValueError(
                f"emotion.ensemble names {self.ensemble!r}, which emotion.ensembles does not define "
                f"(defined: {', '.join(sorted(self.ensembles)) or 'none'})"
            )
        if any(t <= 0 for t in self.temperature.values()):
            raise ValueError("temperatures must be > 0")
        return self

    def ensemble_rules(self, name: str | None = None) -> tuple[str, EnsembleRules]:
        """(name, rules) of the named ensemble, or of the default one; UnknownEnsemble otherwise."""
        name = name or self.ensemble
        if name not in self.ensembles:
            raise UnknownEnsemble(name)
        return name, self.ensembles[name]

    # The default ensemble's members and space, as the one-ensemble form had them.
    @property
    def members(self) -> list[EmotionMember]:
        return self.ensembles[self.ensemble].members

    @property
    def fusion_space(self) -> Literal["logit", "prob"]:
        return self.ensembles[self.ensemble].fusion_space


class EngagementRule(StrictModel):
    """Use `use`'s output when its confidence for the affect is above the bound (or always)."""

    use: Literal["temporal", "xgboost"]
    confidence_above: float | None = Field(None, ge=0, le=1)


class Smoothing(StrictModel):
    method: Literal["ema", "window", "none"] = "ema"
    alpha: float = Field(0.3, gt=0, le=1)
    # Weighted window, oldest first; normalised when applied.
    weights: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Smoothing:
        if self.method == "window" and (
            not self.weights or any(w < 0 for w in self.weights) or sum(self.weights) <= 0
        ):
            raise ValueError("window smoothing needs non-negative weights with a positive sum")
        return self


class PriorCorrection(StrictModel):
    """p ∝ p / prior^strength, per affect: the per-sample form of the research's rebalancing."""

    strength: float = Field(1.0, ge=0)
    priors: dict[AffectName, list[float]]

    @model_validator(mode="after")
    def _check(self) -> PriorCorrection:
        for affect, prior in self.priors.items():
            if len(prior) != 4 or any(p <= 0 for p in prior):
                raise ValueError(f"priors.{affect}: need four positive class priors")
        return self


def _default_engagement_rules() -> dict[AffectName, list[EngagementRule]]:
    selective = [EngagementRule(use="temporal", confidence_above=0.35), EngagementRule(use="xgboost")]
    return {
        "engagement": [EngagementRule(use="temporal")],
        "boredom": selective,
        "confusion": selective,
        "frustration": selective,
    }


class EngagementRules(StrictModel):
    temporal_model: str = "engagement_temporal"
    xgboost_model: str = "engagement_xgb"
    affects: dict[AffectName, list[EngagementRule]] = Field(default_factory=_default_engagement_rules)
    smoothing: dict[AffectName, Smoothing] = Field(default_factory=lambda: {a: Smoothing() for a in AFFECTS})
    prior_correction: PriorCorrection | None = None

    @model_validator(mode="after")
    def _check(self) -> EngagementRules:
        for affect, rules in self.affects.items():
            if rules and rules[-1].confidence_above is not None:
                raise ValueError(f"affects.{affect}: the last rule must hold always (no confidence_above)")
        missing = [a for a in AFFECTS if not self.affects.get(a)]
        if missing:
            raise ValueError(f"affects: at least one rule is needed for {', '.join(missing)}")
        return self


class KnnRules(StrictModel):
    """kNN options; a field left out keeps the value stored with the index."""

    k: int | None = Field(None, ge=1, le=4096)
    tau: float | None = Field(None, gt=0)
    weighting: Literal["softmax", "power", "uniform"] | None = None
    power_alpha: float | None = Field(None, gt=0)
    aggregation: Literal["vote", "regression"] | None = None
    similarity_threshold: float | None = Field(None, ge=-1, le=1)
    prior_calibration: bool | None = None


class ProxyLabelRules(StrictModel):
    mode: Literal["knn", "mlp", "ensemble"] = "ensemble"
    # ensemble: alpha * mlp + (1 - alpha) * knn.
    alpha: float = Field(0.8, ge=0, le=1)
    knn: KnnRules = KnnRules()


class FusionRules(StrictModel):
    version: str | None = None
    emotion: EmotionRules = EmotionRules()
    engagement: EngagementRules = EngagementRules()
    proxylabel: ProxyLabelRules = ProxyLabelRules()


class RulesError(ValueError):
    """The rules file is invalid; the message names the file and the key."""


def parse_rules(text: str, source: str = "<rules>") -> tuple[FusionRules, str]:
    """Validate rules text; returns the rules and their version."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RulesError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RulesError(f"{source} must hold a mapping at the top level")
    try:
        rules = FusionRules.model_validate(data)
    except ValidationError as exc:
        raise RulesError(f"invalid fusion rules in {source}: {describe_validation_error(exc)}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    version = f"{rules.version}@{digest}" if rules.version else digest
    return rules, version


class RulesStore:
    """Holds the rules in force; re-reads the file when it changes, keeping the old rules if the
    new file is invalid (an operator's typo must not take the gateway down)."""

    def __init__(
        self,
        path: Path,
        check_interval: float = 1.0,
        on_change: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.check_interval = check_interval
        self._on_change = on_change
        self._on_error = on_error
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._rules, self._version = parse_rules(self.path.read_text(), str(path))
        self._next_check = time.monotonic() + check_interval
        if on_change:
            on_change(self._version)

    def _file_stamp(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size

    def current(self) -> tuple[FusionRules, str]:
        """The rules in force and their version (checks the file at most once per interval)."""
        now = time.monotonic()
        if now >= self._next_check:
            with self._lock:
                if now >= self._next_check:
                    self._next_check = now + self.check_interval
                    self._maybe_reload()
        return self._rules, self._version

    def _maybe_reload(self) -> None:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            # Remember the stamp even if the file is bad: report a bad file once, not every interval.
            self._stamp = stamp
            rules, version = parse_rules(self.path.read_text(), str(self.path))
        except (OSError, RulesError) as exc:
            log.error("fusion rules not reloaded, keeping version %s: %s", self._version, exc)
            if self._on_error:
                self._on_error(str(exc))
            return
        changed = version != self._version
        self._rules, self._version = rules, version
        if changed:
            log.info("fusion rules reloaded: version %s", version)
            if self._on_change:
                self._on_change(version)
