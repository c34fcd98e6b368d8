"""Engagement input sanity through the real gateway: a clip or stream header's fps must be a finite
number above 0 (INVALID_ARGUMENT for the whole call otherwise), and frame timestamps may not go
backwards (INVALID_ARGUMENT naming the frame on ScoreClip; that frame's own status on StreamVideo,
whose stream goes on)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from launcher.suite import Suite
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera_client import TesseraClient
from tests.helpers.suites import CACHE, start_suite
from tools.builders.blazeface import build_blazeface
from tools.builders.engagement_demo import build_engagement_demo
from tools.builders.fer_student import build_fer_student
from tools.modeller.engagement.generate import encode_jpeg, make_clip

LEVELS = {"engagement": 2, "boredom": 1, "confusion": 0, "frustration": 3}
FRAMES = 12
STEP_US = 33_333  # 30 fps
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("engagement-inputs-repo")
    build_fer_student(repo, CACHE)
    build_blazeface(repo, CACHE)  # the face detector
    build_engagement_demo(repo, CACHE)
    return repo


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Iterator[Suite]:
    s = start_suite(tmp_path_factory.mktemp("suite"), repo)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(suite: Suite) -> Iterator[TesseraClient]:
    with TesseraClient(suite.gateway.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    return [encode_jpeg(f) for f in make_clip(LEVELS, n_frames=FRAMES, seed=3)]


def _messages(
    cls: type, frames: Sequence[bytes], fps: float, stamps: Sequence[int] | None = None
) -> Iterator[object]:
    yield cls(header=pb.ClipHeader(clip_id="inputs", fps=fps))
    for i, frame in enumerate(frames):
        stamp = i * STEP_US if stamps is None else stamps[i]
        yield cls(frame=common_pb2.VideoFrame(timestamp_us=stamp, image=common_pb2.Image(encoded=frame)))


@pytest.mark.parametrize("fps", [math.nan, math.inf, 0.0, -30.0])
def test_a_bad_header_fps_fails_the_whole_call(
    client: TesseraClient, frames: list[bytes], fps: float
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(_messages(pb.ScoreClipRequest, frames, fps), timeout=30)
    assert err.value.code() == INVALID and "fps" in err.value.details(), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.StreamVideo(_messages(pb.StreamVideoRequest, frames, fps), timeout=30))
    assert err.value.code() == INVALID and "fps" in err.value.details(), err.value.details()


def test_a_good_fps_and_steady_timestamps_are_answered(client: TesseraClient, frames: list[bytes]) -> None:
    # Equal timestamps are not backwards: two frames may share a capture time.
    stamps = [0, 0, *(i * STEP_US for i in range(1, FRAMES - 1))]
    reply = client.stub.ScoreClip(_messages(pb.ScoreClipRequest, frames, 29.97, stamps), timeout=30)
    assert reply.frames_received == FRAMES
    stream = _messages(pb.StreamVideoRequest, frames, 29.97, stamps)
    replies = list(client.stub.StreamVideo(stream, timeout=30))
    assert len(replies) == FRAMES and all(r.status.code == 0 for r in replies)


def test_a_clip_timestamp_going_backwards_names_the_frame(client: TesseraClient, frames: list[bytes]) -> None:
    stamps = [i * STEP_US for i in range(FRAMES)]
    stamps[4] = stamps[2]  # frame 5 (1-based) goes back to frame 3's time
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ScoreClip(_messages(pb.ScoreClipRequest, frames, 30.0, stamps), timeout=30)
    assert err.value.code() == INVALID
    assert "frame 5" in err.value.details() and "backwards" in err.value.details(), err.value.details()


def test_a_stream_timestamp_going_backwards_is_that_frames_status(
    client: TesseraClient, frames: list[bytes]
) -> None:
    stamps = [i * STEP_US for i in range(FRAMES)]
    stamps[6] = 1  # one frame back in time; the next ones go on from frame 6's clock
    stream = _messages(pb.StreamVideoRequest, frames, 30.0, stamps)
    replies = list(client.stub.StreamVideo(stream, timeout=60))
    assert len(replies) == FRAMES  # every frame answered: the stream went on
    assert replies[6].status.code == INVALID.value[0] and "backwards" in replies[6].status.message
    assert all(r.status.code == 0 for i, r in enumerate(replies) if i != 6), [r.status for r in replies]
    assert sum(r.face.width > 0 for r in replies[7:]) >= 3  # frames after it are still tracked
