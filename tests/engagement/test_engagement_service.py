"""The engagement service through the real gateway, on the demo models (four XGBoost boosters on
HOG, the temporal network on face crops): a clip scored once, equal to an offline reference built
from the models' files; a live stream with per-frame emotion and smoothed engagement; bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import xgboost as xgb

from launcher.suite import Suite
from services.engagement.config import EngagementConfig
from services.engagement.features import HogParams, face_crop, hog_features
from services.engagement.pipeline import evenly_spaced
from services.fusion.affect_enum import AFFECT_NAMES
from services.fusion.engagement import decide
from services.fusion.rules import AFFECTS, FusionRules
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera_client import TesseraClient
from tests.helpers.suites import CACHE, start_suite
from tools.builders.blazeface import build_blazeface
from tools.builders.engagement_demo import build_engagement_demo
from tools.builders.fer_student import build_fer_student
from tools.modeller.engagement.generate import encode_jpeg, make_clip, make_clip_with_boxes

LEVELS = {"engagement": 3, "boredom": 0, "confusion": 2, "frustration": 1}
MAX_FRAMES = 120


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("engagement-repo")
    build_fer_student(repo, CACHE)
    build_blazeface(repo, CACHE)  # the face detector
    build_engagement_demo(repo, CACHE)
    return repo


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Iterator[Suite]:
    s = start_suite(
        tmp_path_factory.mktemp("suite"),
        repo,
        extra_env={"TESSERA_ENGAGEMENT__MAX_FRAMES_PER_CLIP": str(MAX_FRAMES)},
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(suite: Suite) -> Iterator[TesseraClient]:
    with TesseraClient(suite.gateway.target) as c:
        yield c


@pytest.fixture(scope="module")
def clip() -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    return make_clip_with_boxes(LEVELS, n_frames=60, seed=5)


def _code(err: pytest.ExceptionInfo) -> grpc.StatusCode:
    return err.value.code()


def _located(frame: np.ndarray, box: tuple[int, int, int, int]) -> common_pb2.Image:
    x, y, w, h = box
    return common_pb2.Image(
        encoded=encode_jpeg(frame), faces=[common_pb2.BoundingBox(x=x, y=y, width=w, height=h)]
    )


def _clip_messages(images: list[common_pb2.Image], fps: float = 30.0) -> Iterator[pb.ScoreClipRequest]:
    yield pb.ScoreClipRequest(header=pb.ClipHeader(clip_id="c", fps=fps))
    for i, image in enumerate(images):
        yield pb.ScoreClipRequest(frame=common_pb2.VideoFrame(timestamp_us=round(i * 1e6 / fps), image=image))


def _offline(repo: Path, frames: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> dict:
    """Both models straight from their files (xgboost.Booster, an ONNX Runtime session) on the
    frames as the service receives them (JPEG), at the given boxes; then the rules' decision."""
    import cv2

    decoded = [cv2.imdecode(np.frombuffer(encode_jpeg(f), np.uint8), cv2.IMREAD_COLOR) for f in frames]
    # The service grows a box by its detector's margins (caller boxes too).
    margins = EngagementConfig().crop_margins
    crops = np.stack([face_crop(f, b, margin=margins) for f, b in zip(decoded, boxes, strict=True)])
    xgb_out = {}
    for affect in AFFECTS:
        version_dir = repo / f"engagement_xgb_{affect}" / "1"
        params = HogParams.load(version_dir / "hog.json")
        booster = xgb.Booster(model_file=str(version_dir / "xgboost.json"))
        mean_hog = hog_features(crops, params).mean(axis=0, keepdims=True)
        xgb_out[affect] = booster.predict(xgb.DMatrix(mean_hog))[0]
    temporal_dir = repo / "engagement_temporal" / "1"
    pre = json.loads((temporal_dir / "preprocess.json").read_text())
    session = ort.InferenceSession(str(temporal_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    frames_in = session.get_inputs()[0].shape[1]
    picked = crops[evenly_spaced(len(crops), frames_in)].astype(np.float32) / 255.0
    picked = (picked - pre["mean"][0]) / pre["std"][0]
    probs = session.run([pre["output_name"]], {pre["input_name"]: picked[None, :, None]})[0][0]
    outputs = {"temporal": dict(zip(AFFECTS, probs, strict=True)), "xgboost": xgb_out}
    return {d.affect: d for d in decide(outputs, FusionRules().engagement)}


def test_clip_equals_the_offline_reference(client: TesseraClient, repo: Path, clip: tuple) -> None:
    frames, boxes = clip
    reply = client.stub.ScoreClip(
        _clip_messages([_located(f, b) for f, b in zip(frames, boxes, strict=True)]), timeout=60
    )
    assert reply.frames_received == 60 and reply.frames_with_face == 60 and reply.rules_version
    want = _offline(repo, frames, boxes)
    got = {AFFECT_NAMES[a.affect]: a for a in reply.affects}
    assert set(got) == set(AFFECTS)
    for affect, level in got.items():
        np.testing.assert_allclose(level.probabilities, want[affect].probabilities, atol=1e-5)
        assert level.level == want[affect].level
        assert (
            level.decided_by
            == {"temporal": "engagement_temporal", "xgboost": "engagement_xgb"}[want[affect].decided_by]
        )
    assert got["engagement"].decided_by == "engagement_temporal"  # the rules: always the temporal model
    models = {m.name: m for m in reply.models}
    assert {"engagement_temporal", *(f"engagement_xgb_{a}" for a in AFFECTS)} <= set(models)
    assert all(m.demo for m in models.values())


def test_clip_with_detection_finds_the_face_and_the_levels(client: TesseraClient) -> None:
    # Plain frames, the service detects (every few frames) and tracks: the demo models should
    # read the generated levels back on most affects.
    reply = client.score_clip([encode_jpeg(f) for f in make_clip(LEVELS, n_frames=45, seed=9)], fps=30)
    assert reply.frames_received == 45 and reply.frames_with_face >= 40
    levels = {AFFECT_NAMES[a.affect]: a.level for a in reply.affects}
    assert sum(levels[a] == LEVELS[a] for a in AFFECTS) >= 2, levels
    for a in reply.affects:
        assert sum(a.probabilities) == pytest.approx(1.0, abs=1e-5) and a.confidence == pytest.approx(
            max(a.probabilities)
        )


def test_stream_gives_every_frame_its_face_emotion_and_smoothed_engagement(client: TesseraClient) -> None:
    frames = make_clip(LEVELS, n_frames=60, seed=11)
    sent = [encode_jpeg(f) for f in frames]
    replies = list(client.stream_video(sent, fps=30, timeout=120))
    assert len(replies) == 60
    assert [r.timestamp_us for r in replies] == sorted(r.timestamp_us for r in replies) and replies[
        -1
    ].timestamp_us > 1.9e6
    with_face = [r for r in replies if r.face.width]
    assert len(with_face) >= 54
    for r in with_face:
        assert r.status.code == 0 and len(r.faces) == 1
        assert len(r.faces[0].probabilities) == 7 and sum(r.faces[0].probabilities) == pytest.approx(
            1, abs=1e-5
        )
    hops = [i for i, r in enumerate(replies) if r.engagement]
    assert hops == [14, 29, 44, 59]  # every 15th frame (hop_frames)
    for i in hops:
        assert {AFFECT_NAMES[level.affect] for level in replies[i].engagement} == set(AFFECTS)
        for level in replies[i].engagement:
            assert sum(level.probabilities) == pytest.approx(1.0, abs=1e-5)
            assert level.level == int(np.argmax(level.probabilities))


def test_a_bad_frame_in_a_stream_is_reported_on_it_and_the_stream_goes_on(client: TesseraClient) -> None:
    frames = [encode_jpeg(f) for f in make_clip(LEVELS, n_frames=20, seed=3)]
    frames[7] = b"\xff\xd8\xff not really a jpeg"
    replies = list(client.stream_video(frames, fps=30, timeout=60))
    assert len(replies) == 20
    assert replies[7].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "JPEG" in replies[7].status.message or "jpeg" in replies[7].status.message.lower()
    assert all(r.status.code == 0 for i, r in enumerate(replies) if i != 7)
    assert sum(bool(r.face.width) for r in replies[8:]) >= 10


def test_clip_bad_input_gets_the_documented_status(client: TesseraClient, png_bomb: bytes) -> None:
    good = [encode_jpeg(f) for f in make_clip(LEVELS, n_frames=12, seed=1)]
    with pytest.raises(grpc.RpcError) as err:
        client.score_clip([*good[:5], b"garbage", *good[5:]])
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "frame 6" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.score_clip([png_bomb])
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        client.score_clip(good * (MAX_FRAMES // len(good) + 1))
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_frames_per_clip" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(iter([pb.ScoreClipRequest(header=pb.ClipHeader(clip_id="x"))]), timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "no frames" in err.value.details()
    two_headers = [pb.ScoreClipRequest(header=pb.ClipHeader()), pb.ScoreClipRequest(header=pb.ClipHeader())]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(iter(two_headers), timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "not a frame" in err.value.details()


def test_a_clip_without_a_face_is_answered_with_no_levels(client: TesseraClient) -> None:
    blank = encode_jpeg(np.full((240, 320, 3), 128, np.uint8))
    reply = client.score_clip([blank] * 10)
    assert reply.frames_received == 10 and reply.frames_with_face == 0 and not reply.affects


def test_missing_models_are_named(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    build_fer_student(repo, CACHE)
    suite = start_suite(tmp_path / "suite", repo)
    try:
        with TesseraClient(suite.gateway.target) as c:
            # Every time, though the service answers while the client is still sending frames.
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    c.score_clip([encode_jpeg(np.zeros((48, 64, 3), np.uint8))] * 10)
                assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
                assert (
                    "engagement_temporal" in err.value.details()
                    and "engagement_xgb_boredom" in err.value.details()
                )
                with pytest.raises(grpc.RpcError) as err:
                    list(c.stream_video([encode_jpeg(np.zeros((48, 64, 3), np.uint8))] * 10))
                assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        suite.stop()


def test_hostile_frames(client: TesseraClient, png_bomb: bytes) -> None:
    frames, boxes = make_clip_with_boxes(LEVELS, n_frames=12, seed=2)
    # Raw pixels are accepted like JPEG.
    raw = client.score_clip(frames, fps=30)
    assert raw.frames_received == 12 and raw.frames_with_face >= 10 and len(raw.affects) == 4
    # A caller's box outside the frame is the caller's error, named with its frame.
    outside = [_located(f, b) for f, b in zip(frames, boxes, strict=True)]
    del outside[3].faces[:]
    outside[3].faces.append(common_pb2.BoundingBox(x=5000, y=5000, width=10, height=10))
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(_clip_messages(outside), timeout=30)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "frame 4" in err.value.details()
    # In a live stream, a decompression bomb and an empty image fail alone.
    live = [encode_jpeg(f) for f in frames]
    live[2], live[5] = png_bomb, common_pb2.Image()
    replies = list(client.stream_video(live, fps=30, timeout=60))
    assert len(replies) == 12
    assert replies[2].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert replies[5].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert all(r.status.code == 0 for i, r in enumerate(replies) if i not in (2, 5))
    # One frame over the gateway's message limit ends the call with RESOURCE_EXHAUSTED.
    huge = np.zeros((1500, 1500, 3), np.uint8)  # 6.75 MB raw, over the 4 MB test limit
    with pytest.raises(grpc.RpcError) as err:
        client.score_clip([huge])
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_clip_members_on_request_refuse_to_the_answer(client: TesseraClient) -> None:
    frames = [encode_jpeg(f) for f in make_clip(LEVELS, n_frames=20, seed=4)]
    plain = client.score_clip(frames, fps=30)
    assert not plain.members
    reply = client.score_clip(frames, fps=30, return_member_outputs=True)
    members = {
        m.model: {AFFECT_NAMES[a.affect]: np.asarray(a.probabilities) for a in m.affects}
        for m in reply.members
    }
    assert set(members) == {"engagement_temporal", "engagement_xgb"}
    # The members, fused by the rules, are the answer.
    fused = {
        d.affect: d
        for d in decide(
            {"temporal": members["engagement_temporal"], "xgboost": members["engagement_xgb"]},
            FusionRules().engagement,
        )
    }
    for level in reply.affects:
        np.testing.assert_allclose(
            level.probabilities, fused[AFFECT_NAMES[level.affect]].probabilities, atol=1e-6
        )
