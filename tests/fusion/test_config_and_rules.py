"""Config loading, the fusion rules file, and the pure fusion functions against references."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax

from gateway.config import GatewayConfig
from services.emotion.config import EmotionConfig
from services.fusion.emotion import fuse_logits, members_for, resolve_temperature
from services.fusion.engagement import Smoother, decide
from services.fusion.proxylabel import labels_of, soft_vote
from services.fusion.rules import (
    EmotionRules,
    FusionRules,
    ProxyLabelRules,
    RulesError,
    RulesStore,
    Smoothing,
    parse_rules,
)
from services.runtime.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_config_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 1000, grace_seconds: 3}\nmax_images_per_request: 4\n")
    env = {"TESSERA_EMOTION__SERVER__PORT": "2000", "TESSERA_GATEWAY__SERVER__PORT": "9"}
    config = load_config(EmotionConfig, "emotion", path, {"server": {"grace_seconds": 7.5}}, environ=env)
    assert config.server.port == 2000  # env over file; another process's variable ignored
    assert config.server.grace_seconds == 7.5  # explicit override over file
    assert config.max_images_per_request == 4


@pytest.mark.parametrize(
    "text,needle",
    [
        ("server: {prot: 1}", "unknown key 'server.prot'"),
        ("detector: {scale_factor: 1.1, colour: x}", "unknown key 'detector.colour'"),
        ("server: {port: -1}", "'server.port'"),
        ("[1, 2]", "mapping"),
        ("server: {port: [", "not valid YAML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        load_config(EmotionConfig, "emotion", path, environ={})
    assert needle in str(err.value)


def test_env_values_parse_as_yaml_scalars_and_lists() -> None:
    env = {"TESSERA_GATEWAY__AUTH__TOKENS": '["a", "b"]', "TESSERA_GATEWAY__HEALTH_POLL_SECONDS": "0.5"}
    config = load_config(GatewayConfig, "gateway", environ=env)
    assert config.auth.tokens == ["a", "b"] and config.health_poll_seconds == 0.5


def test_shipped_rules_file_is_valid_and_matches_the_design() -> None:
    rules, version = parse_rules((ROOT / "config" / "fusion_rules.yaml").read_text())
    assert rules.emotion.default_mode == "student"
    assert members_for(rules.emotion, "ensemble", "research") == {
        "emotion_rn18": 0.4,
        "emotion_b3": 0.4,
        "emotion_cnxt": 0.2,
    }
    # The file adds the pretrained ensemble (tests/emotion/test_pretrained_ensemble.py) and serves it in
    # mode ENSEMBLE; the research one is the schema's default.
    assert rules.emotion.ensemble == "pretrained"
    assert rules.emotion.ensembles["research"] == FusionRules().emotion.ensembles["research"]
    assert rules.proxylabel.mode == "ensemble" and rules.proxylabel.alpha == 0.8
    assert rules.engagement.affects["boredom"][0].confidence_above == 0.35
    assert version.startswith("2026-11-23@")
    # Otherwise the file spells out the defaults.
    assert rules.model_copy(update={"emotion": FusionRules().emotion}) == FusionRules(version="2026-11-23")
    assert (
        rules.emotion.model_copy(
            update={"ensemble": "research", "ensembles": FusionRules().emotion.ensembles}
        )
        == FusionRules().emotion
    )


@pytest.mark.parametrize(
    "text,needle",
    [
        ("emotion: {wieghts: 1}", "unknown key 'emotion.wieghts'"),
        ("emotion: {default_mode: teacher}", "'emotion.default_mode'"),
        ("emotion: {members: [{model: a, weight: 0}]}", "must not all be zero"),
        ("engagement: {affects: {boredom: [{use: temporal, confidence_above: 0.3}]}}", "last rule"),
        ("proxylabel: {alpha: 1.5}", "'proxylabel.alpha'"),
        ("proxylabel: {knn: {weighting: cosine}}", "'proxylabel.knn.weighting'"),
    ],
)
def test_rules_errors_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(RulesError) as err:
        parse_rules(text, "rules.yaml")
    assert needle in str(err.value)


def test_rules_reload_without_restart_and_keep_old_rules_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("emotion: {fusion_space: logit}\n")
    versions, errors = [], []
    store = RulesStore(path, check_interval=0.0, on_change=versions.append, on_error=errors.append)
    rules, v1 = store.current()
    assert rules.emotion.fusion_space == "logit" and versions == [v1]

    path.write_text("emotion: {fusion_space: prob}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    rules, v2 = store.current()
    assert rules.emotion.fusion_space == "prob" and v2 != v1 and versions == [v1, v2]

    path.write_text("emotion: {fusion_space: nonsense}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    rules, v3 = store.current()
    assert rules.emotion.fusion_space == "prob" and v3 == v2
    assert len(errors) == 1 and "fusion_space" in errors[0]
    store.current()
    assert len(errors) == 1  # a bad file is reported once, not at every check


def test_logit_fusion_equals_the_formula() -> None:
    rng = np.random.default_rng(0)
    logits = {m: rng.normal(size=(5, 7)) * 3 for m in ("a", "b", "c")}
    weights = {"a": 0.4, "b": 0.4, "c": 0.2}
    expected = scipy_softmax((0.4 * logits["a"] + 0.4 * logits["b"] + 0.2 * logits["c"]) / 1.7, axis=1)
    np.testing.assert_allclose(fuse_logits(logits, weights, 1.7), expected, atol=1e-6)
    # Weights are normalised: 2/2/1 is the same ensemble.
    np.testing.assert_allclose(fuse_logits(logits, {"a": 2, "b": 2, "c": 1}, 1.7), expected, atol=1e-6)
    prob = fuse_logits(logits, weights, 2.0, space="prob")
    ref = sum(w * scipy_softmax(logits[m] / 2.0, axis=1) for m, w in weights.items())
    np.testing.assert_allclose(prob, ref, atol=1e-6)
    with pytest.raises(KeyError):
        fuse_logits({"a": logits["a"]}, weights, 1.0)


def test_temperature_precedence() -> None:
    plain = EmotionRules()
    assert resolve_temperature(plain, "student", 1.8) == 1.8
    assert resolve_temperature(plain, "student", 0.0) == 1.0
    assert resolve_temperature(plain, "ensemble", 1.8) == 1.0
    override = EmotionRules(temperature={"student": 2.5, "ensemble": 1.3})
    assert resolve_temperature(override, "student", 1.8) == 2.5
    assert resolve_temperature(override, "ensemble", None) == 1.3


def test_engagement_selective_fusion_follows_the_first_rule_that_holds() -> None:
    rules = FusionRules().engagement
    confident = np.array([0.1, 0.1, 0.7, 0.1])
    unsure = np.array([0.3, 0.3, 0.2, 0.2])
    xgb = np.array([0.05, 0.8, 0.1, 0.05])
    outputs = {
        "temporal": {"engagement": unsure, "boredom": confident, "confusion": unsure, "frustration": unsure},
        "xgboost": {a: xgb for a in ("engagement", "boredom", "confusion", "frustration")},
    }
    by_affect = {d.affect: d for d in decide(outputs, rules)}
    assert by_affect["engagement"].decided_by == "temporal"  # always the temporal model
    assert by_affect["boredom"].decided_by == "temporal" and by_affect["boredom"].level == 2
    assert by_affect["confusion"].decided_by == "xgboost" and by_affect["confusion"].level == 1
    assert by_affect["frustration"].confidence == pytest.approx(0.8)


def test_smoothing_ema_and_window() -> None:
    ema = Smoother(Smoothing(method="ema", alpha=0.5))
    a, b = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    ema.update(a)
    np.testing.assert_allclose(ema.update(b), [0.5, 0.5, 0, 0])
    window = Smoother(Smoothing(method="window", weights=[1, 3]))
    window.update(a)
    np.testing.assert_allclose(window.update(b), [0.25, 0.75, 0, 0])
    np.testing.assert_allclose(window.update(b), [0, 1.0, 0, 0])


def test_soft_vote_and_ties_go_to_the_lower_score() -> None:
    knn = np.array([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 1.0, 0]])
    mlp = np.array([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    fused = soft_vote(knn, mlp, ProxyLabelRules(alpha=0.8))
    np.testing.assert_allclose(fused[1], [0, 0, 0, 0, 0.2, 0.8], atol=1e-7)
    labels, confidence = labels_of(fused)
    assert labels.tolist() == [0, 5] and confidence[1] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="needs the mlp"):
        soft_vote(knn, None, ProxyLabelRules(mode="ensemble"))
    np.testing.assert_allclose(soft_vote(knn, None, ProxyLabelRules(mode="knn")), knn)
