"""tessera-evaluate end to end on a running suite (its own rules file, which search-weights rewrites): every
command's figures equal those computed here from RPC answers fetched independently; --faces detect on whole
photos; the cache; the figures; the rules file it writes is served."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.special import softmax
from skimage import data as skdata
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, mean_absolute_error

from launcher.suite import ROOT, Suite
from services.fusion.emotion import CLASS_NAMES, fuse_logits, fused_logits
from services.fusion.rules import AFFECTS, parse_rules
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxy_pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as proxy_grpc
from tessera_client import TesseraClient
from tests.helpers.images import png_size
from tests.helpers.suites import start_suite
from tools.modeller.engagement.generate import encode_jpeg, make_clip
from tools.modeller.evaluate import figures
from tools.modeller.evaluate.__main__ import main
from tools.modeller.evaluate.metrics import fit_temperature
from tools.modeller.evaluate.weights import search, split_rows
from tools.modeller.proxylabel.generate import SCORE_SHARES, conversation

K = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "fusion_rules.yaml"
    shutil.copy(ROOT / "config" / "fusion_rules.yaml", path)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_repository: Path, rules_file: Path) -> Suite:
    s = start_suite(
        tmp_path_factory.mktemp("evaluate_suite"),
        model_repository,
        rules=rules_file,
        data_roots=(tmp_path_factory.getbasetemp(),),
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(live: Suite) -> TesseraClient:
    with TesseraClient(live.gateway.target, timeout=60) as c:
        yield c


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """Whole photos, no boxes: the astronaut (one face, Happy), coffee (no face), two astronauts side by
    side (two faces), and faces pasted whole on plain canvases (astronaut crops, LFW faces)."""
    folder = tmp_path_factory.mktemp("photos")
    astro = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(folder / "astronaut.jpg"), astro)
    cv2.imwrite(str(folder / "coffee.jpg"), cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "two.jpg"), np.concatenate([astro, astro[:, ::-1]], axis=1))
    rows = [
        {"path": "astronaut.jpg", "label": "Happy", "source": "skimage", "split": "val"},
        {"path": "coffee.jpg", "label": "Neutral", "source": "skimage", "split": "test"},
        {"path": "two.jpg", "label": "Happy", "source": "skimage", "split": "test"},
    ]
    crop = astro[81:175, 178:272]
    for i, side in enumerate((96, 128, 160, 200)):
        canvas = np.full((3 * side, 3 * side, 3), 128, np.uint8)
        canvas[side : 2 * side, side : 2 * side] = cv2.resize(crop[:, ::-1] if i % 2 else crop, (side, side))
        cv2.imwrite(str(folder / f"canvas_{side}.png"), canvas)
        rows.append(
            {
                "path": f"canvas_{side}.png",
                "label": ("Happy", "Surprise", "Happy", "Sad")[i],
                "source": "canvas",
                "split": ("val", "test")[i % 2],
            }
        )
    lfw = skdata.lfw_subset()
    for i, label in enumerate(("Neutral", "Sad", "Angry", "Fear", "Happy", "Neutral")):
        canvas = np.full((400, 400), 100, np.uint8)
        canvas[120:280, 120:280] = cv2.resize(
            (lfw[i] * 255).astype(np.uint8), (160, 160), interpolation=cv2.INTER_CUBIC
        )
        cv2.imwrite(str(folder / f"lfw_{i}.png"), canvas)
        rows.append(
            {"path": f"lfw_{i}.png", "label": label, "source": "lfw", "split": ("val", "test")[i % 2]}
        )
    return folder, rows


def _served(
    client: TesseraClient, folder: Path, rows: list[dict[str, str]], ensemble: str = "pretrained"
) -> tuple[list[int], np.ndarray, dict[str, np.ndarray], list[str], list]:
    """Asked here, without the tool: (indices of the rows with one face, their probabilities, member
    logits, the other rows' outcome, the reply)."""
    reply = client.classify(
        [(folder / r["path"]).read_bytes() for r in rows], ensemble=ensemble, return_member_logits=True
    )
    one = [i for i, image in enumerate(reply.images) if len(image.faces) == 1]
    probs = np.array([reply.images[i].faces[0].probabilities for i in one], np.float64)
    members: dict[str, list] = {}
    for i in one:
        for m in reply.images[i].faces[0].members:
            members.setdefault(m.model, []).append(list(m.logits))
    others = [
        "no_face" if not image.faces else "several_faces" for image in reply.images if len(image.faces) != 1
    ]
    return one, probs, {m: np.array(v, np.float32) for m, v in members.items()}, others, reply


def _labels(rows: list[dict[str, str]], index: list[int]) -> np.ndarray:
    return np.array([CLASS_NAMES.index(rows[i]["label"]) for i in index])


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))


def _check_figures(out: Path, report: dict, kinds: dict[str, str]) -> None:
    markdown = (out / "report.md").read_text()
    for key, kind in kinds.items():
        name = report["figures"][key]
        assert (out / name).stat().st_size > 1000
        assert png_size(out / name) == figures.pixel_size(kind), name
        assert f"]({name})" in markdown


# Emotion ----------------------------------------------------------------------------------------------------
def test_emotion_on_whole_photos_detects_faces_and_reports_the_rest(
    live: Suite,
    client: TesseraClient,
    photos: tuple[Path, list[dict[str, str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, rows = photos
    manifest = _write_csv(folder / "photos.csv", rows)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert (
        main(
            [
                "emotion",
                str(manifest),
                "--gateway",
                live.gateway.target,
                "--ensemble",
                "pretrained",
                "--fit-temperature",
                "--out",
                str(out),
                "--cache",
                str(cache),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["faces"] == "detect" and report["ensemble"] == "pretrained" and report["mode"] == "ensemble"
    assert report["skipped_by_reason"] == {"no_face": 1, "several_faces": 1}
    assert [(s["path"], s["reason"]) for s in report["skipped_rows"]] == [
        ("coffee.jpg", "no_face"),
        ("two.jpg", "several_faces"),
    ]
    assert "--faces detect" in printed and "coffee.jpg" in printed and "two.jpg" in printed

    one, probs, members, others, reply = _served(client, folder, rows)
    assert sorted(others) == ["no_face", "several_faces"] and report["scored"] == len(one) == len(rows) - 2
    astronaut = reply.images[0].faces[0]
    assert astronaut.label == "Happy" and max(astronaut.probabilities) > 0.9  # a wrong answer no more
    y = _labels(rows, one)
    m = report["metrics"]
    pred = probs.argmax(axis=1)
    assert m["n"] == len(y) and m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(
        f1_score(y, pred, labels=range(K), average="macro", zero_division=0), abs=1e-12
    )
    assert m["nll"] == pytest.approx(_nll(probs, y), rel=1e-5)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(K)).tolist()
    weights = {"emotion_student": 1 / 3, "emotion_facex": 1 / 3, "emotion_pyemotion": 1 / 3}
    assert report["weights"] == pytest.approx(weights)
    assert m["temperature"] == pytest.approx(fit_temperature(fused_logits(members, weights), y), rel=1e-6)
    for name, logits in members.items():
        alone = softmax(logits.astype(np.float64), axis=1)
        mm = report["member_metrics"][name]
        assert mm["accuracy"] == pytest.approx(accuracy_score(y, alone.argmax(axis=1)), abs=1e-12)
        assert mm["nll"] == pytest.approx(_nll(alone, y), rel=1e-6)
    lfw = [j for j, i in enumerate(one) if rows[i]["source"] == "lfw"]
    by = report["by_source"]["lfw"]["fused"]
    assert by["n"] == len(lfw) and by["accuracy"] == pytest.approx(
        accuracy_score(y[lfw], pred[lfw]), abs=1e-12
    )
    assert set(report["by_source"]) == {"canvas", "lfw", "skimage"}
    _check_figures(out, report, {"reliability": "reliability", "confusion": "confusion"})

    # Again: every answer from the cache. Then a run killed after two answers resumes from them.
    again = tmp_path / "again"
    assert (
        main(
            [
                "emotion",
                str(manifest),
                "--gateway",
                live.gateway.target,
                "--ensemble",
                "pretrained",
                "--out",
                str(again),
                "--cache",
                str(cache),
                "--quiet",
            ]
        )
        == 0
    )
    second = json.loads((again / "report.json").read_text())
    assert second["from_cache"] == len(rows) and second["metrics"]["accuracy"] == m["accuracy"]
    (cached,) = cache.glob("emotion-*.jsonl")
    lines = cached.read_text().splitlines()
    cached.write_text(
        "\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2]
    )  # header, 2 rows, a torn line
    assert (
        main(
            [
                "emotion",
                str(manifest),
                "--gateway",
                live.gateway.target,
                "--ensemble",
                "pretrained",
                "--out",
                str(again),
                "--cache",
                str(cache),
                "--quiet",
            ]
        )
        == 0
    )
    third = json.loads((again / "report.json").read_text())
    assert third["from_cache"] == 2 and third["metrics"]["confusion_matrix"] == m["confusion_matrix"]


def test_crop_mode_sends_whole_photos_as_crops(
    live: Suite, photos: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    folder, rows = photos
    manifest = _write_csv(tmp_path / "crops.csv", [{**r, "path": str(folder / r["path"])} for r in rows[:3]])
    out = tmp_path / "out"
    assert (
        main(
            [
                "emotion",
                str(manifest),
                "--gateway",
                live.gateway.target,
                "--mode",
                "student",
                "--faces",
                "crop",
                "--out",
                str(out),
                "--no-cache",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["faces"] == "crop" and report["scored"] == 3 and report["skipped"] == 0
    assert "--faces crop" in (out / "report.md").read_text()


def test_export_softlabels_writes_every_row(
    live: Suite, client: TesseraClient, photos: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    folder, rows = photos
    manifest = _write_csv(folder / "soft.csv", rows)
    assert (
        main(
            [
                "export-softlabels",
                str(manifest),
                "--gateway",
                live.gateway.target,
                "--ensemble",
                "pretrained",
                "--out",
                str(tmp_path),
                "--no-cache",
                "--quiet",
            ]
        )
        == 0
    )
    table = pq.read_table(tmp_path / "softlabels.parquet")
    assert table.num_rows == len(rows) and table.column("path").to_pylist() == [r["path"] for r in rows]
    status = table.column("status").to_pylist()
    assert table.column("skip_reason").to_pylist()[1:3] == ["no_face", "several_faces"]
    one, probs, members, _, reply = _served(client, folder, rows)
    assert [i for i, s in enumerate(status) if s == "ok"] == one
    for name, logits in members.items():
        got = np.array([v for v in table.column(f"logits_{name}").to_pylist() if v is not None], np.float32)
        np.testing.assert_array_equal(got, logits)
    got = np.array([v for v in table.column("probabilities").to_pylist() if v is not None])
    np.testing.assert_allclose(got, probs, atol=1e-7)
    assert table.column("predicted").to_pylist()[0] == "Happy"
    assert {table.column("temperature").to_pylist()[i] for i in one} == {1.0}
    assert dict(table.column("model_versions").to_pylist()[0]) == {m.name: m.version for m in reply.models}
    meta = json.loads(table.schema.metadata[b"tessera.softlabels"])
    assert meta["members"] == ["emotion_student", "emotion_facex", "emotion_pyemotion"]
    assert meta["class_names"] == list(CLASS_NAMES) and meta["rules_version"] == [reply.rules_version]


def test_search_weights_writes_rules_the_gateway_serves(
    live: Suite,
    client: TesseraClient,
    rules_file: Path,
    photos: tuple[Path, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    folder, rows = photos
    manifest = _write_csv(folder / "weights.csv", rows)
    one, _, members, _, before = _served(client, folder, rows)
    out = tmp_path / "out"
    assert (
        main(
            [
                "search-weights",
                str(manifest),
                "--gateway",
                live.gateway.target,
                "--ensemble",
                "pretrained",
                "--write-rules",
                str(rules_file),
                "--out",
                str(out),
                "--cache",
                str(tmp_path / "c"),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    # The same search on the logits fetched here, on the manifest's val/test split.
    y = _labels(rows, one)
    val, test, _ = split_rows(
        y, [rows[i]["split"] for i in one], val_split=None, test_split=None, val_fraction=0.5, seed=0
    )
    assert report["validation_rows"] == len(val) and report["test_rows"] == len(test)
    best = search({m: v[val] for m, v in members.items()}, y[val])[0]
    assert report["best"]["weights"] == best.weights and report["best"]["space"] == best.space
    assert report["best"]["temperature"] == pytest.approx(best.temperature, rel=1e-9)
    _check_figures(out, report, {"ranking": "weights"})

    # The gateway takes the written file (its version is the file's) and answers by it.
    text = rules_file.read_text()
    version = parse_rules(text)[1]
    deadline = time.monotonic() + 20
    while client.status().rules_version != version:
        assert time.monotonic() < deadline, "the gateway did not load the written rules"
        time.sleep(0.2)
    _, ens = parse_rules(text)[0].emotion.ensemble_rules("pretrained")
    assert {m.model: m.weight for m in ens.members} == best.weights and ens.fusion_space == best.space
    after = client.classify(
        [(folder / "astronaut.jpg").read_bytes()], ensemble="pretrained", return_member_logits=True
    )
    face = after.images[0].faces[0]
    logits = {m.model: np.array([m.logits], np.float32) for m in face.members}
    weights = {m: w for m, w in best.weights.items() if w > 0}
    expected = fuse_logits(logits, weights, ens.temperature, ens.fusion_space)[0]
    np.testing.assert_allclose(face.probabilities, expected, atol=1e-6)
    assert not np.allclose(face.probabilities, before.images[0].faces[0].probabilities, atol=1e-4)


# Engagement -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    """Generated clips with known levels: folders of JPEG frames, one AVI file, one missing clip."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(3)
    rows: list[dict[str, object]] = []
    for i in range(8):
        levels = [int(v) for v in rng.integers(0, 4, 4)]
        frames = make_clip(levels, 30, seed=100 + i)
        if i == 0:
            h, w = frames[0].shape[:2]
            writer = cv2.VideoWriter(str(folder / "clip0.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (w, h))
            for frame in frames:
                writer.write(frame)
            writer.release()
            path = "clip0.avi"
        else:
            path = f"clip{i}"
            (folder / path).mkdir()
            for j, frame in enumerate(frames):
                (folder / path / f"{j:04d}.jpg").write_bytes(encode_jpeg(frame))
        rows.append({"path": path, **dict(zip(AFFECTS, levels, strict=True)), "source": ("a", "b")[i % 2]})
    rows.append({"path": "missing", **{a: 0 for a in AFFECTS}, "source": "a"})
    return folder, rows


def test_engagement_per_affect_and_model_equals_the_rpc_answers(
    live: Suite, client: TesseraClient, clips: tuple[Path, list[dict[str, object]]], tmp_path: Path
) -> None:
    folder, rows = clips
    listing = _write_csv(folder / "clips.csv", rows)
    out = tmp_path / "out"
    assert (
        main(
            [
                "engagement",
                str(listing),
                "--gateway",
                live.gateway.target,
                "--sweep-threshold",
                "--out",
                str(out),
                "--cache",
                str(tmp_path / "c"),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [("missing", "unreadable")]
    fused, temporal, xgb, truth = [], [], [], []
    for r in rows[:-1]:
        path = folder / str(r["path"])
        if path.is_dir():
            reply = client.score_clip(
                [p.read_bytes() for p in sorted(path.iterdir())], return_member_outputs=True
            )
        else:
            reply = client.score_video_file(path, return_member_outputs=True)
        if not reply.affects:
            continue
        truth.append([r[a] for a in AFFECTS])
        fused.append([a.level for a in reply.affects])
        outs = {o.model: [int(np.argmax(a.probabilities)) for a in o.affects] for o in reply.members}
        temporal.append(outs["engagement_temporal"])
        xgb.append(outs["engagement_xgb"])
    truth_a = np.array(truth)
    assert report["scored"] == len(truth) >= 6
    for answer, levels in (("fused", fused), ("temporal", temporal), ("xgboost", xgb)):
        levels_a = np.array(levels)
        for j, affect in enumerate(AFFECTS):
            got = report["metrics"][answer][affect]
            assert got["accuracy"] == pytest.approx(accuracy_score(truth_a[:, j], levels_a[:, j]), abs=1e-12)
            assert got["macro_f1"] == pytest.approx(
                f1_score(truth_a[:, j], levels_a[:, j], average="macro", zero_division=0), abs=1e-12
            )
            assert got["mae"] == pytest.approx(mean_absolute_error(truth_a[:, j], levels_a[:, j]), abs=1e-12)
            assert (
                got["confusion_matrix"]
                == confusion_matrix(truth_a[:, j], levels_a[:, j], labels=range(4)).tolist()
            )
            assert list(got["predicted"].values()) == np.bincount(levels_a[:, j], minlength=4).tolist()
    assert report["reproduced_mismatches"] == 0
    sweep = report["sweep"]
    for j, affect in enumerate(AFFECTS):  # c = 0: the temporal network alone; c = 1: XGBoost alone
        assert sweep["macro_f1"][affect][0] == pytest.approx(
            f1_score(truth_a[:, j], np.array(temporal)[:, j], average="macro", zero_division=0), abs=1e-12
        )
        assert sweep["macro_f1"][affect][-1] == pytest.approx(
            f1_score(truth_a[:, j], np.array(xgb)[:, j], average="macro", zero_division=0), abs=1e-12
        )
    assert (
        parse_rules(sweep["snippet"])[0].engagement.affects["boredom"][0].confidence_above
        == sweep["best"]["boredom"]
    )
    assert set(report["by_source"]) == {"a", "b"}
    _check_figures(
        out, report, {"confusion": "confusion_grid", "levels": "distribution", "threshold_sweep": "sweep"}
    )


# Proxy labels ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    rng = np.random.default_rng(21)
    n = 36
    quality = rng.choice(6, size=n, p=np.array(SCORE_SHARES) / sum(SCORE_SHARES))
    rows = []
    for i, q in enumerate(quality):
        messages = conversation(rng, int(q))
        rows.append(
            {
                "id": f"r{i}",
                "prompt": "\n\n".join(m["content"] for m in messages if m["role"] == "user"),
                "response": "\n\n".join(m["content"] for m in messages if m["role"] == "assistant"),
                "gpt_scores": float(q) if i >= 3 else None,
            }
        )  # three unlabelled rows
    rows[5]["prompt"] = rows[5]["response"] = ""  # labelled, but nothing to score
    path = tmp_path_factory.mktemp("shard") / "labelled.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def test_proxylabel_knn_mlp_and_soft_vote_equal_the_rpc_answers(
    live: Suite,
    client: TesseraClient,
    model_repository: Path,
    shard: tuple[Path, list[dict[str, object]]],
    tmp_path: Path,
) -> None:
    path, rows = shard
    out = tmp_path / "out"
    rules = ROOT / "config" / "fusion_rules.yaml"
    assert (
        main(
            [
                "proxylabel",
                str(path),
                "--repo",
                str(model_repository),
                "--rules",
                str(rules),
                "--sweep",
                "--folds",
                "3",
                "--k",
                "3",
                "5",
                "--weighting",
                "softmax",
                "uniform",
                "--tau",
                "0.1",
                "--alpha",
                "0",
                "0.5",
                "0.8",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["labelled"] == 33 and report["scored"] == 32
    assert [(s["line"], s["path"], s["message"]) for s in report["skipped"]] == [(5, "r5", "empty text")]
    labelled = [r for r in rows if r["gpt_scores"] is not None and r["prompt"]]
    y = np.array([int(r["gpt_scores"]) for r in labelled])
    text_rows = [
        proxy_pb.TextRow(id=str(r["id"]), text=str(r["prompt"]), response=str(r["response"]))
        for r in labelled
    ]
    # The members, from the proxylabel service itself; the soft vote, from the gateway.
    with grpc.insecure_channel(live.processes["proxylabel"].target) as channel:
        direct = proxy_grpc.ProxyLabelServiceStub(channel).ScoreTexts(
            proxy_pb.ScoreTextsRequest(rows=text_rows, run_knn=True, run_mlp=True), timeout=60
        )
    knn_label = np.array([r.knn_label for r in direct.rows])
    mlp = np.array([r.mlp_probabilities for r in direct.rows])
    served = client.score_texts(text_rows)
    vote = np.array([r.label for r in served.rows])
    for answer, pred in (("knn", knn_label), ("mlp", mlp.argmax(axis=1)), ("soft_vote", vote)):
        got = report["metrics"][answer]
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12), answer
        assert got["macro_f1"] == pytest.approx(
            f1_score(y, pred, average="macro", zero_division=0), abs=1e-12
        )
        assert got["mae"] == pytest.approx(mean_absolute_error(y, pred), abs=1e-12)
        assert got["confusion_matrix"] == confusion_matrix(y, pred, labels=range(6)).tolist()
    assert report["metrics"]["mlp"]["nll"] == pytest.approx(_nll(mlp, y), rel=1e-4)
    assert report["self_matches"] == 0 and report["served_answer"] == "soft_vote"
    sweep = report["sweep"]
    assert len(sweep["settings"]) == 4 and sweep["folds"] == 3
    assert parse_rules(sweep["rules_snippet"])[0].proxylabel.alpha == sweep["best"]["best_alpha"]
    _check_figures(
        out, report, {"confusion": "confusion_grid", "scores": "distribution", "alpha_sweep": "sweep"}
    )
