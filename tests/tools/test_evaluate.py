"""tools.modeller.evaluate: the metrics against scikit-learn and explicit references, temperature fitting on
data with a known temperature, and the CLI end to end against the real suite."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.special import softmax
from skimage import data as skdata
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, log_loss

from launcher.suite import ROOT, Suite
from services.fusion.emotion import CLASS_NAMES, fuse_logits, fused_logits
from services.fusion.rules import parse_rules
from tessera_client import TesseraClient
from tools.modeller.evaluate import metrics
from tools.modeller.evaluate.__main__ import main
from tools.modeller.evaluate.emotion import Answers, parse_label, summarise

K = 7


def _random_case(seed: int, n: int = 500, truth_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Random probabilities; the labels use only the first classes, so some are absent from truth."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(K, 0.7), size=n)
    labels = rng.integers(0, truth_classes, size=n)
    return probs, labels


def ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al., one sample at a time: bins (lo, hi], |acc - conf| weighted by the bin's share."""
    edges = np.linspace(0, 1, bins + 1)
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, p in enumerate(probs):
        conf = p.max()
        for b in range(bins):
            if edges[b] < conf <= edges[b + 1]:
                members[b].append(i)
                break
    total = 0.0
    for idx in members:
        if idx:
            acc = np.mean([probs[i].argmax() == labels[i] for i in idx])
            conf = np.mean([probs[i].max() for i in idx])
            total += len(idx) / len(labels) * abs(acc - conf)
    return total


# (a) metrics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_equal_scikit_learn(seed: int) -> None:
    probs, labels = _random_case(seed)
    pred = probs.argmax(axis=1)
    assert metrics.accuracy(probs, labels) == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    expected = f1_score(labels, pred, labels=range(K), average=None, zero_division=0)
    np.testing.assert_allclose(metrics.per_class_f1(probs, labels), expected, atol=1e-12)
    assert metrics.macro_f1(probs, labels) == pytest.approx(
        f1_score(labels, pred, labels=range(K), average="macro", zero_division=0), abs=1e-12
    )
    assert metrics.nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(K)), rel=1e-10)


def test_macro_f1_counts_a_class_absent_from_truth_and_prediction_as_zero() -> None:
    probs, labels = _random_case(3, truth_classes=5)
    probs[:, 6] = 0.0  # never predicted either
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    f1 = metrics.per_class_f1(probs, labels)
    assert f1[6] == 0.0 and 6 not in labels and 6 not in pred
    assert metrics.macro_f1(probs, labels) == pytest.approx(f1.sum() / K)
    assert metrics.macro_f1(probs, labels) == pytest.approx(
        f1_score(labels, pred, labels=range(K), average="macro", zero_division=0), abs=1e-12
    )


def test_nll_clips_a_zero_probability_at_1e_12() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert metrics.nll(probs, np.array([1, 0])) == pytest.approx((-np.log(1e-12) - np.log(0.5)) / 2)


@pytest.mark.parametrize("bins", [15, 10, 1])
def test_ece_equals_a_per_sample_reference(bins: int) -> None:
    for seed in range(3):
        probs, labels = _random_case(seed, truth_classes=K)
        assert metrics.ece(probs, labels, bins) == pytest.approx(
            ece_reference(probs, labels, bins), abs=1e-12
        )


def test_ece_puts_a_confidence_on_an_edge_in_the_bin_it_closes() -> None:
    # 0.6 closes bin (0.5, 0.6] of 10; a wrong half-open choice would move it to (0.6, 0.7].
    probs = np.array([[0.6, 0.4], [0.65, 0.35]])
    labels = np.array([0, 1])
    assert metrics.ece(probs, labels, 10) == pytest.approx(ece_reference(probs, labels, 10), abs=1e-12)


def test_ece_is_zero_when_every_bin_is_calibrated() -> None:
    rows, labels = [], []
    for conf, n_correct in ((0.5, 10), (0.75, 15), (0.9, 18), (1.0, 20)):
        for i in range(20):
            p = np.full(K, (1 - conf) / (K - 1))
            p[2] = conf
            rows.append(p)
            labels.append(2 if i < n_correct else 4)
    assert metrics.ece(np.array(rows), np.array(labels)) == pytest.approx(0.0, abs=1e-12)


def test_brier_is_the_multiclass_sum_of_squares() -> None:
    probs, labels = _random_case(4, truth_classes=K)
    explicit = np.mean(
        [sum((probs[i, k] - (labels[i] == k)) ** 2 for k in range(K)) for i in range(len(labels))]
    )
    assert metrics.brier(probs, labels) == pytest.approx(explicit, rel=1e-12)
    # scikit-learn >= 1.7 has the multi-class form too (unscaled when asked).
    assert metrics.brier(probs, labels) == pytest.approx(
        brier_score_loss(labels, probs, labels=range(K), scale_by_half=False), rel=1e-10
    )


def test_binary_brier_is_twice_sklearns_positive_class_score() -> None:
    rng = np.random.default_rng(5)
    p1 = rng.random(300)
    y = rng.integers(0, 2, 300)
    probs = np.stack([1 - p1, p1], axis=1)
    # Σ_k over two classes counts the same squared error twice: (p1 - y)² + ((1-p1) - (1-y))².
    assert metrics.brier(probs, y) == pytest.approx(2 * brier_score_loss(y, p1), rel=1e-12)


def test_report_names_classes_and_rejects_bad_input() -> None:
    probs, labels = _random_case(6)
    report = metrics.evaluate(probs, labels, CLASS_NAMES)
    assert list(report.per_class_f1) == list(CLASS_NAMES) and report.support["Neutral"] == 0
    assert report.to_dict()["macro_f1"] == report.macro_f1 and report.n == len(labels)
    with pytest.raises(ValueError, match="class indices"):
        metrics.accuracy(probs, np.full(len(labels), K))
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(probs, labels[:-1])


# (b) temperature ---------------------------------------------------------------------------------
@pytest.mark.parametrize("true_t", [0.5, 2.0, 3.0])
def test_fit_temperature_recovers_a_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(int(true_t * 10))
    logits = rng.normal(0, 3, size=(20_000, K))
    p = softmax(logits / true_t, axis=1)
    # Inverse-CDF sampling of one label per row from softmax(z / T0).
    labels = (rng.random((len(p), 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    fitted = metrics.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    before = metrics.nll(softmax(logits, axis=1), labels)
    after = metrics.nll(softmax(logits / fitted, axis=1), labels)
    assert after <= before
    assert metrics.fit_temperature(logits, labels) == fitted  # deterministic


def test_fit_temperature_stays_in_bounds() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    # Perfectly separated: the NLL keeps falling as T → 0, so the lower bound is the answer.
    assert metrics.fit_temperature(logits, np.array([0, 1]), bounds=(0.1, 10.0)) == pytest.approx(
        0.1, rel=1e-3
    )


def test_fused_logits_are_what_fuse_logits_scales() -> None:
    rng = np.random.default_rng(7)
    members = {m: rng.normal(0, 4, size=(50, K)).astype(np.float32) for m in ("a", "b", "c")}
    weights = {"a": 2.0, "b": 2.0, "c": 1.0}
    for t in (0.7, 1.0, 2.5):
        np.testing.assert_allclose(
            softmax(fused_logits(members, weights) / t, axis=1), fuse_logits(members, weights, t), atol=1e-7
        )


def test_labels_are_names_in_any_case_or_indices() -> None:
    assert [parse_label(x) for x in ("Angry", "happy", " NEUTRAL ", "0", "6", "7", "joy", "-1")] == [
        0,
        3,
        6,
        0,
        6,
        None,
        None,
        None,
    ]


def _ensemble_answers(space: str, temperature: float, seed: int = 8) -> tuple[Answers, object, str]:
    """What the gateway would answer in ensemble mode under rules with a temperature override."""
    rules, version = parse_rules(
        f"emotion: {{default_mode: ensemble, fusion_space: {space}, "
        f"temperature: {{ensemble: {temperature}}}}}"
    )
    rng = np.random.default_rng(seed)
    n = 400
    weights = {m.model: m.weight for m in rules.emotion.members}
    members = {m: rng.normal(0, 3, size=(n, K)).astype(np.float32) for m in weights}
    labels = rng.integers(0, K, n)
    served = fuse_logits(members, weights, temperature, space)
    answers = Answers(
        labels=labels.tolist(),
        probabilities=served.tolist(),
        members={m: v.tolist() for m, v in members.items()},
        class_names=list(CLASS_NAMES),
        modes={"ensemble"},
        rules_versions={version},
    )
    return answers, rules, version


def test_ensemble_temperature_is_fitted_on_the_weighted_logits() -> None:
    answers, rules, version = _ensemble_answers("logit", 1.5)
    ev = summarise(answers, 400, rules, version, fit=True, manifest="m", gateway="g", rules_file="r")
    assert ev.rules_match and ev.served_temperature == 1.5 and ev.served_reproduced_max_abs_diff == 0.0
    assert ev.temperature_source == "rules file: emotion.temperature.ensemble"
    assert ev.weights == pytest.approx({"emotion_rn18": 0.4, "emotion_b3": 0.4, "emotion_cnxt": 0.2})
    labels = np.array(answers.labels)
    members = {m: np.array(v, dtype=np.float32) for m, v in answers.members.items()}
    expected = metrics.fit_temperature(
        sum(w * members[m].astype(np.float64) for m, w in ev.weights.items()), labels
    )
    assert ev.metrics.temperature == pytest.approx(expected, rel=1e-9)
    # The printed line is valid rules: pasted into a file, it serves the fitted temperature.
    pasted, _ = parse_rules(ev.rules_snippet)
    assert pasted.emotion.temperature == {"ensemble": round(expected, 4)}


def test_prob_space_temperature_minimises_the_nll_of_the_served_fusion() -> None:
    answers, rules, version = _ensemble_answers("prob", 1.0)
    ev = summarise(answers, 400, rules, version, fit=True, manifest="m", gateway="g", rules_file="r")
    assert ev.served_reproduced_max_abs_diff == 0.0
    members = {m: np.array(v, dtype=np.float32) for m, v in answers.members.items()}
    labels = np.array(answers.labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    nlls = [metrics.nll(fuse_logits(members, ev.weights, t, "prob"), labels) for t in grid]
    assert ev.metrics.temperature == pytest.approx(grid[int(np.argmin(nlls))], rel=0.01)
    assert ev.metrics.scaled.nll <= min(nlls) + 1e-9


def test_rules_that_are_not_the_gateways_are_flagged() -> None:
    answers, _, _ = _ensemble_answers("logit", 1.5)
    other, other_version = parse_rules("emotion: {default_mode: ensemble}")
    ev = summarise(answers, 400, other, other_version, fit=False, manifest="m", gateway="g", rules_file="r")
    assert not ev.rules_match and ev.served_temperature == 1.0 and ev.served_reproduced_max_abs_diff > 0.01
    assert any("are not r" in w for w in ev.warnings)


# (c) end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(suite: Suite) -> TesseraClient:
    with TesseraClient(suite.gateway.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def faces(
    tmp_path_factory: pytest.TempPathFactory, client: TesseraClient, astronaut_jpeg: bytes
) -> tuple[Path, list[dict[str, str]]]:
    """Face images on disk and manifest rows for them: astronaut crops at several sizes (and
    mirrored), LFW faces upscaled to 96 px, and the whole astronaut with its box."""
    folder = tmp_path_factory.mktemp("evaluate")
    (face,) = client.classify_image(astronaut_jpeg)
    x, y, w, h = face.box
    bgr = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    crop = bgr[y : y + h, x : x + w]
    (folder / "img").mkdir()
    rows = []
    for i, size in enumerate((64, 96, 128, 200)):
        for flip in (False, True):
            image = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
            name = f"astro_{size}{'_flip' if flip else ''}.png"
            cv2.imwrite(str(folder / "img" / name), image[:, ::-1] if flip else image)
            rows.append({"path": f"img/{name}", "label": ("Happy", "happy", "3", "Surprise")[i]})
    lfw = skdata.lfw_subset()[:4]
    for i, (gray, label) in enumerate(zip(lfw, ("Neutral", "sad", "0", "Fear"), strict=True)):
        image = cv2.resize((gray * 255).astype(np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / "img" / f"lfw_{i}.png"), image)
        rows.append({"path": f"img/lfw_{i}.png", "label": label})
    cv2.imwrite(str(folder / "img" / "astronaut.jpg"), bgr)
    rows.append(
        {"path": "img/astronaut.jpg", "label": "Happy", "x": str(x), "y": str(y), "w": str(w), "h": str(h)}
    )
    return folder, rows


def _write_manifest(
    path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("path", "label", "x", "y", "w", "h")
) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _direct(client: TesseraClient, folder: Path, rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Served probabilities and student logits of the rows, asked for here, without the tool."""
    from tessera.common.v1 import common_pb2

    images = []
    for r in rows:
        data = (folder / r["path"]).read_bytes()
        box = (
            [common_pb2.BoundingBox(x=int(r["x"]), y=int(r["y"]), width=int(r["w"]), height=int(r["h"]))]
            if r.get("x")
            else []
        )
        images.append(common_pb2.Image(encoded=data, faces=box, is_face_crop=not box))
    reply = client.classify(images, mode="student", return_member_logits=True)
    assert all(len(i.faces) == 1 for i in reply.images)
    probs = np.array([i.faces[0].probabilities for i in reply.images], dtype=np.float64)
    (member,) = {m.model for i in reply.images for m in i.faces[0].members}
    logits = np.array([i.faces[0].members[0].logits for i in reply.images], dtype=np.float64)
    assert member == "emotion_student"
    return probs, logits


def test_cli_reports_what_the_gateway_serves(
    suite: Suite,
    client: TesseraClient,
    faces: tuple[Path, list[dict[str, str]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, rows = faces
    manifest = _write_manifest(folder / "manifest.csv", rows)
    out = folder / "report.json"
    code = main(
        [
            "emotion",
            str(manifest),
            "--gateway",
            suite.gateway.target,
            "--mode",
            "student",
            "--batch",
            "5",
            "--fit-temperature",
            "--json",
            str(out),
            "--quiet",
            "--faces",
            "crop",
            "--no-cache",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["rows"] == report["scored"] == m["n"] == len(rows) and report["skipped"] == 0
    assert report["mode"] == "student" and report["rules_match"] and report["served_temperature"] == 1.0
    assert "stored beside emotion_student" in report["temperature_source"]
    assert report["served_reproduced_max_abs_diff"] < 1e-6

    labels = np.array([parse_label(r["label"]) for r in rows])
    probs, logits = _direct(client, folder, rows)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(axis=1)), abs=1e-12)
    assert m["nll"] == pytest.approx(
        -np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))), rel=1e-5
    )
    assert m["ece"] == pytest.approx(ece_reference(probs, labels), abs=1e-5)
    assert m["macro_f1"] == pytest.approx(
        f1_score(labels, probs.argmax(axis=1), labels=range(K), average="macro", zero_division=0), abs=1e-12
    )
    fitted = metrics.fit_temperature(logits, labels)
    assert m["temperature"] == pytest.approx(fitted, rel=1e-4)
    assert m["scaled"]["nll"] <= m["nll"] + 1e-9
    assert f"temperature: {{student: {round(fitted, 4):g}}}" in report["rules_snippet"]
    assert "accuracy" in printed and report["rules_snippet"] in printed
    assert parse_rules(report["rules_snippet"])[0].emotion.temperature == {"student": round(fitted, 4)}


def test_a_mode_whose_models_are_not_served_exits_1(
    faces: tuple[Path, list[dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    # The default repository serves the ensemble (its pretrained members): the same repository
    # without two of them does not.
    from tests.helpers.suites import start_suite

    folder, rows = faces
    repo = folder / "without_members"
    repo.mkdir()
    for entry in (ROOT / "model_repository").iterdir():
        if entry.name not in ("emotion_facex", "emotion_pyemotion"):
            (repo / entry.name).symlink_to(entry)
    manifest = _write_manifest(folder / "ensemble.csv", rows[:2])
    alone = start_suite(folder / "suite_without_members", repo, data_roots=(folder,))
    try:
        assert (
            main(
                [
                    "emotion",
                    str(manifest),
                    "--gateway",
                    alone.gateway.target,
                    "--mode",
                    "ensemble",
                    "--quiet",
                    "--no-cache",
                ]
            )
            == 1
        )
    finally:
        alone.stop()
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_missing_and_undecodable_images_are_reported_per_image(
    suite: Suite, faces: tuple[Path, list[dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, rows = faces
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [
        *rows[:3],
        {"path": "img/nowhere.png", "label": "Sad"},
        {"path": "img/broken.png", "label": "Fear"},
    ]
    manifest = _write_manifest(folder / "bad_images.csv", bad, ("path", "label"))
    out = folder / "bad_images.json"
    code = main(
        [
            "emotion",
            str(manifest),
            "--gateway",
            suite.gateway.target,
            "--json",
            str(out),
            "--quiet",
            "--faces",
            "crop",
            "--no-cache",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report["scored"] == 3 and report["skipped"] == 2
    assert report["skipped_by_reason"] == {"unreadable": 1, "INVALID_ARGUMENT": 1}
    assert [(s["line"], s["path"]) for s in report["skipped_first"]] == [
        (5, "img/nowhere.png"),
        (6, "img/broken.png"),
    ]
    assert "img/nowhere.png" in printed and "img/broken.png" in printed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.png,Happy\n", "missing column(s) 'path'"),
        ("path,label\nimg/astro_64.png,Happy\nimg/astro_96.png,Joy\n", "line 3: unknown label 'Joy'"),
        ("path,label,x,y\na.png,Happy,1,2\n", "need all of x, y, w, h"),
        ("path,label,x,y,w,h\na.png,Happy,1,2,,\n", "line 2: a face box needs all"),
        ("path,label\n", "no rows"),
    ],
)
def test_bad_manifests_exit_2_naming_the_problem(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    # Nothing is sent for a bad manifest: no gateway is needed.
    assert main(["emotion", str(manifest), "--gateway", "127.0.0.1:1", "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emotion", str(tmp_path / "absent.csv"), "--quiet"]) == 2
    assert "cannot read manifest" in capsys.readouterr().err
    assert main(["emotion", str(tmp_path / "m.csv"), "--batch", "0"]) == 2
    assert main(["emotion", str(tmp_path / "m.csv"), "--mode", "teacher"]) == 2


def test_an_unreachable_gateway_exits_1(
    faces: tuple[Path, list[dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, rows = faces
    manifest = _write_manifest(folder / "unreachable.csv", rows[:2])
    assert main(["emotion", str(manifest), "--gateway", "127.0.0.1:1", "--timeout", "5", "--quiet"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
