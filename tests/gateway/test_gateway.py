"""Every public RPC through the real gateway: answers, and bad input with its documented status."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from scipy.special import softmax
from skimage import data as skdata

from launcher.suite import ROOT, Suite
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera_client import ItemError, TesseraClient
from tests.helpers.suites import start_suite

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


@pytest.fixture(scope="module")
def client(suite: Suite) -> TesseraClient:
    with TesseraClient(suite.gateway.target, timeout=60) as c:
        yield c


def _code(exc_info: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc_info.value.code()


def test_astronaut_in_student_mode_is_one_happy_face(client: TesseraClient, astronaut_jpeg: bytes) -> None:
    reply = client.classify([astronaut_jpeg], mode="student", return_member_logits=True)
    assert list(reply.class_names) == CLASSES
    assert reply.mode == pb.EMOTION_MODE_STUDENT and reply.rules_version
    assert [m.name for m in reply.models] == ["emotion_student"] and reply.models[0].version == "1"
    (image,) = reply.images
    assert image.status.code == 0 and len(image.faces) == 1
    face = image.faces[0]
    assert face.label == "Happy" and face.probabilities[3] > 0.9
    # No temperature in the rules or beside the fer model: probabilities are softmax(logits).
    (member,) = face.members
    np.testing.assert_allclose(face.probabilities, softmax(np.array(member.logits)), atol=1e-6)


def test_face_crop_and_caller_boxes_skip_detection(client: TesseraClient, astronaut_jpeg: bytes) -> None:
    (detected,) = client.classify_image(astronaut_jpeg)
    x, y, w, h = detected.box
    bgr = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    crop = bgr[y : y + h, x : x + w]
    (as_crop,) = client.classify_image(crop, face_crop=True)
    assert as_crop.label == "Happy" and as_crop.box == (0, 0, w, h)
    image = common_pb2.Image(
        encoded=astronaut_jpeg, faces=[common_pb2.BoundingBox(x=x, y=y, width=w, height=h)]
    )
    reply = client.classify([image])
    assert [f.box.x for f in reply.images[0].faces] == [x]
    assert reply.images[0].faces[0].label == "Happy"


def test_no_face_is_an_empty_answer(client: TesseraClient) -> None:
    assert client.classify_image(np.full((200, 200, 3), 127, np.uint8)) == []


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_grayscale_rgba_and_16bit_png_are_accepted(client: TesseraClient) -> None:
    bgr = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    variants = [_png(gray), _png(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)), _png(bgr.astype(np.uint16) * 257)]
    reply = client.classify(variants)
    for image in reply.images:
        assert image.status.code == 0, image.status.message
        assert [f.label for f in image.faces] == ["Happy"]


def test_bad_images_are_reported_per_image_and_the_others_answered(
    client: TesseraClient, astronaut_jpeg: bytes, png_bomb: bytes
) -> None:
    zero = common_pb2.Image(raw=common_pb2.RawImage(height=0, width=0, format=common_pb2.PIXEL_FORMAT_BGR8))
    cases = [b"\xff\xd8\xff\xe0 this is no jpeg", b"", zero, png_bomb, os.urandom(5000)]
    images = [c if isinstance(c, common_pb2.Image) else common_pb2.Image(encoded=c) for c in cases]
    reply = client.classify([*images, astronaut_jpeg])
    codes = [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert [i.status.code for i in reply.images[:-1]] == codes
    assert all(i.status.message for i in reply.images[:-1])
    assert "30000" in reply.images[3].status.message
    assert reply.images[-1].status.code == 0 and reply.images[-1].faces[0].label == "Happy"
    with pytest.raises(ItemError) as err:
        client.classify_image(png_bomb)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_png_bomb_does_not_grow_the_service_memory(
    suite: Suite, client: TesseraClient, png_bomb: bytes
) -> None:
    pid = suite.processes["emotion"].popen.pid

    def rss_mb() -> float:
        fields = Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()
        return int(fields[0]) / 1024

    before = rss_mb()
    for _ in range(3):
        with pytest.raises(ItemError):
            client.classify_image(png_bomb)
    assert rss_mb() - before < 100  # decoding it would take 900 MB


@pytest.mark.parametrize(
    "request_kwargs,code",
    [
        ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"images": [common_pb2.Image(encoded=b"x")] * 33}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ({"images": [common_pb2.Image(encoded=b"x")], "mode": 7}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_whole_request_problems_fail_before_work(
    client: TesseraClient, request_kwargs: dict, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ClassifyEmotion(pb.ClassifyEmotionRequest(**request_kwargs), timeout=10)
    assert _code(err) == code and err.value.details()


def test_ensemble_without_teachers_names_the_missing_models(
    client: TesseraClient, astronaut_jpeg: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        # The research ensemble: its timm teachers are not in the default repository.
        client.classify([astronaut_jpeg], mode="ensemble", ensemble="research")
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert all(m in err.value.details() for m in ("emotion_rn18", "emotion_b3", "emotion_cnxt"))


def test_clip_streams_validate_their_shape(client: TesseraClient, astronaut_jpeg: bytes) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(iter([]), timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    frame_first = [
        pb.ScoreClipRequest(frame=common_pb2.VideoFrame(image=common_pb2.Image(encoded=astronaut_jpeg)))
    ]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(iter(frame_first), timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "ClipHeader" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.StreamVideo(iter([]), timeout=10))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_score_texts_validates_rows(client: TesseraClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.score_texts([])
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.score_texts([{"id": str(i), "text": "x"} for i in range(4097)])
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # One bad row is reported on that row; the others are answered.
    reply = client.score_texts(
        [
            {"id": "ok", "text": "How do I boil an egg?", "response": "Simmer it 9 minutes."},
            {"id": "empty", "text": ""},
            {"id": "dim", "text": "hello", "embedding": [0.1] * 7},
        ]
    )
    assert [r.id for r in reply.rows] == ["ok", "empty", "dim"]
    assert reply.rows[0].status.code == 0 and 0 <= reply.rows[0].label <= 5
    assert sum(reply.rows[0].probabilities) == pytest.approx(1.0, abs=1e-5)
    assert reply.rows[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.rows[2].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "384" in reply.rows[2].status.message


def test_shard_paths_are_confined_to_the_roots(suite: Suite, client: TesseraClient, tmp_path_factory) -> None:
    root = tmp_path_factory.getbasetemp()
    outside = Path("/etc/hostname")
    link = root / "escape.parquet"
    if not link.exists():
        link.symlink_to(outside)
    cases = {
        str(outside): grpc.StatusCode.INVALID_ARGUMENT,
        str(root / ".." / ".." / "etc" / "hostname"): grpc.StatusCode.INVALID_ARGUMENT,
        str(link): grpc.StatusCode.INVALID_ARGUMENT,
        "": grpc.StatusCode.INVALID_ARGUMENT,
        str(root / "missing.parquet"): grpc.StatusCode.NOT_FOUND,
    }
    for path, code in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            list(client.score_shard(path, root / "out", timeout=10))
        assert _code(err) == code, (path, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        list(client.score_shard(root / "missing.parquet", "/tmp/../etc/out", timeout=10))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "output_path" in err.value.details()


def test_status_lists_models_versions_and_backends(client: TesseraClient) -> None:
    status = client.status()
    emotion = next(s for s in status.services if s.name == "emotion")
    # The student and the pretrained ensemble's other two members (the default repository).
    assert [(m.name, m.version, m.backend) for m in emotion.models] == [
        (name, "1", "onnxruntime") for name in ("emotion_facex", "emotion_pyemotion", "emotion_student")
    ]
    assert status.gateway_version and status.rules_version


def _rules_reload_errors(suite: Suite) -> float:
    """The gateway's count of rules files it refused at reload."""
    url = f"http://127.0.0.1:{suite.gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    match = re.search(r"^tessera_fusion_rules_reload_errors_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_rules_edits_change_answers_without_restart(
    tmp_path: Path, model_repository: Path, astronaut_jpeg: bytes
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "config" / "fusion_rules.yaml").read_text())
    suite = start_suite(tmp_path / "suite", model_repository, rules=rules, data_roots=(tmp_path,))
    try:
        with TesseraClient(suite.gateway.target) as client:
            first = client.classify([astronaut_jpeg])
            text = rules.read_text().replace("temperature: {}", "temperature: {student: 4.0}")
            rules.write_text(text)
            deadline = time.monotonic() + 10
            while (second := client.classify([astronaut_jpeg])).rules_version == first.rules_version:
                assert time.monotonic() < deadline, "rules not reloaded"
                time.sleep(0.2)
            p1, p2 = first.images[0].faces[0].probabilities[3], second.images[0].faces[0].probabilities[3]
            assert p2 < p1  # a higher temperature flattens the answer
            logits = np.log(
                np.array(first.images[0].faces[0].probabilities)
            )  # softmax(l) → l up to a constant
            np.testing.assert_allclose(
                second.images[0].faces[0].probabilities, softmax(logits / 4.0), atol=1e-5
            )
            # An invalid edit is refused: the previous rules stay in force. The gateway counts the
            # refusal, so the check runs once the edit was read, not after a guessed delay.
            refused = _rules_reload_errors(suite)
            rules.write_text("emotion: {temperature: {student: -1}}\n")
            deadline = time.monotonic() + 10
            while _rules_reload_errors(suite) == refused:
                assert time.monotonic() < deadline, "the invalid rules file was not read"
                time.sleep(0.1)
            third = client.classify([astronaut_jpeg])
            assert third.rules_version == second.rules_version
    finally:
        suite.stop()


def test_bearer_tokens_are_checked(tmp_path: Path, model_repository: Path) -> None:
    suite = start_suite(
        tmp_path,
        model_repository,
        data_roots=(tmp_path,),
        extra_env={"TESSERA_GATEWAY__AUTH__TOKENS": '["s3cret"]'},
    )
    try:
        for token in (None, "wrong"):
            with TesseraClient(suite.gateway.target, token=token) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.status()
                assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
        with TesseraClient(suite.gateway.target, token="s3cret") as client:
            assert client.status().rules_version
            assert client.health() == "SERVING"  # health stays open for probes
    finally:
        suite.stop()
