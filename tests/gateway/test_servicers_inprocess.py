"""The emotion, engagement and gateway servicers in this process: each served by a real grpc.aio
server (the interceptor that maps domain errors to statuses included) on 127.0.0.1, built by the
process's own `build` from a small model repository, and called over a real channel.

What a servicer answers, and the status of bad and empty requests, without starting a suite."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import pytest_asyncio
from skimage import data as skdata

from gateway.__main__ import build as build_gateway
from gateway.config import GatewayConfig
from launcher.suite import ROOT
from services.emotion.__main__ import build as build_emotion
from services.emotion.config import EmotionConfig
from services.engagement.__main__ import build as build_engagement
from services.engagement.config import EngagementConfig
from services.fusion.affect_enum import AFFECT_NAMES
from services.fusion.rules import AFFECTS
from services.runtime.auth import Authorizer
from services.runtime.config import ProcessConfig, load_config
from services.runtime.metrics import Metrics
from services.runtime.process import App
from services.runtime.server import Servicer, ServingProcess
from tessera.common.v1 import common_pb2
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.emotion.v1 import emotion_service_pb2_grpc as emotion_grpc
from tessera.engagement.v1 import engagement_service_pb2 as engagement_pb
from tessera.engagement.v1 import engagement_service_pb2_grpc as engagement_grpc
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as proxylabel_grpc
from tests.helpers.suites import CACHE
from tools.builders.blazeface import build_blazeface
from tools.builders.engagement_demo import build_engagement_demo
from tools.builders.fer_student import build_fer_student
from tools.modeller.engagement.generate import encode_jpeg, make_clip_with_boxes

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "in-process-token"
CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
LEVELS = {"engagement": 3, "boredom": 0, "confusion": 2, "frustration": 1}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fer student, the face detectors and the engagement demo models (cached builds)."""
    repo = tmp_path_factory.mktemp("inprocess-repo")
    build_fer_student(repo, CACHE)
    build_blazeface(repo, CACHE)
    build_engagement_demo(repo, CACHE)
    return repo


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def clip() -> list[common_pb2.Image]:
    """Twelve frames with their face boxes (the services skip detection)."""
    frames, boxes = make_clip_with_boxes(LEVELS, n_frames=12, seed=5)
    return [
        common_pb2.Image(encoded=encode_jpeg(f), faces=[common_pb2.BoundingBox(x=x, y=y, width=w, height=h)])
        for f, (x, y, w, h) in zip(frames, boxes, strict=True)
    ]


def _config(model: type[Any], process: str, **overrides: Any) -> Any:
    """The process's config from its defaults (no file, no environment), no /metrics server."""
    return load_config(model, process, overrides={"server": {"metrics_port": None}, **overrides}, environ={})


@contextlib.asynccontextmanager
async def _serving(
    process: str, config: ProcessConfig, build: Callable[[Any, Metrics], Awaitable[App]]
) -> AsyncIterator[str]:
    """What `tessera-<process>` serves, served here on a free port; yields its target."""
    metrics = Metrics(process)
    app = await build(config, metrics)
    server = ServingProcess(
        process, config.server, app.servicers, metrics, Authorizer(config.auth), app.drain
    )
    port = await server.start()
    await app.on_start(server)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await app.cleanup()


@contextlib.asynccontextmanager
async def _channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        yield channel


async def _status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), err.value.details() or ""


# ------------------------------------------------------------------------------------------------
# Emotion
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def targets(repo: Path) -> AsyncIterator[dict[str, str]]:
    """The emotion and the engagement service, each serving the repository."""
    async with contextlib.AsyncExitStack() as stack:
        served = {}
        for process, model, build in (
            ("emotion", EmotionConfig, build_emotion),
            ("engagement", EngagementConfig, build_engagement),
        ):
            config = _config(model, process, model_repository=str(repo), repository_poll_seconds=None)
            served[process] = await stack.enter_async_context(_serving(process, config, build))
        yield served


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emotion(targets: dict[str, str]) -> AsyncIterator[emotion_grpc.EmotionServiceStub]:
    async with _channel(targets["emotion"]) as channel:
        yield emotion_grpc.EmotionServiceStub(channel)


async def test_emotion_answers_the_logits_of_each_face(
    emotion: emotion_grpc.EmotionServiceStub, astronaut_jpeg: bytes
) -> None:
    reply = await emotion.InferFaces(
        emotion_pb.InferFacesRequest(
            images=[common_pb2.Image(encoded=astronaut_jpeg)], models=["emotion_student"]
        ),
        timeout=30,
    )
    assert list(reply.class_names) == CLASSES
    assert [(m.name, m.version, m.backend, m.demo) for m in reply.models] == [
        ("emotion_student", "1", "onnxruntime", False)
    ]
    (image,) = reply.images
    assert image.status.code == 0 and len(image.faces) == 1
    (member,) = image.faces[0].members
    assert member.model == "emotion_student" and CLASSES[int(np.argmax(member.logits))] == "Happy"
    listed = await emotion.ListModels(emotion_pb.ListModelsRequest(), timeout=10)
    assert [m.name for m in listed.models] == ["emotion_student"]  # not the detectors


async def test_emotion_bad_input(emotion: emotion_grpc.EmotionServiceStub, astronaut_jpeg: bytes) -> None:
    good = common_pb2.Image(encoded=astronaut_jpeg)
    code, details = await _status_of(
        emotion.InferFaces(emotion_pb.InferFacesRequest(images=[good], models=["emotion_nope"]), timeout=10)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "emotion_nope" in details
    code, details = await _status_of(
        emotion.InferFaces(
            emotion_pb.InferFacesRequest(images=[good], models=["emotion_student"] * 2), timeout=10
        )
    )
    assert code == INVALID and "more than once" in details
    # An undecodable image is reported on itself; the others are answered.
    reply = await emotion.InferFaces(
        emotion_pb.InferFacesRequest(
            images=[common_pb2.Image(encoded=b"\xff\xd8\xff not a jpeg"), good], models=["emotion_student"]
        ),
        timeout=30,
    )
    assert reply.images[0].status.code == INVALID.value[0] and not reply.images[0].faces
    assert reply.images[1].status.code == 0 and len(reply.images[1].faces) == 1


async def test_emotion_empty_requests(
    emotion: emotion_grpc.EmotionServiceStub, astronaut_jpeg: bytes
) -> None:
    code, details = await _status_of(emotion.InferFaces(emotion_pb.InferFacesRequest(), timeout=10))
    assert code == INVALID and "no models" in details
    code, details = await _status_of(
        emotion.InferFaces(emotion_pb.InferFacesRequest(models=["emotion_student"]), timeout=10)
    )
    assert code == INVALID and "no images" in details


# ------------------------------------------------------------------------------------------------
# Engagement
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engagement(targets: dict[str, str]) -> AsyncIterator[engagement_grpc.EngagementServiceStub]:
    async with _channel(targets["engagement"]) as channel:
        yield engagement_grpc.EngagementServiceStub(channel)


def _clip_messages(
    images: list[common_pb2.Image], cls: type = engagement_pb.ScoreClipRequest, fps: float = 30.0
) -> Iterator[Any]:
    yield cls(header=engagement_pb.ClipHeader(clip_id="c", fps=fps))
    for i, image in enumerate(images):
        yield cls(frame=common_pb2.VideoFrame(timestamp_us=i * 33_333, image=image))


async def test_engagement_scores_a_clip_with_both_models(
    engagement: engagement_grpc.EngagementServiceStub, clip: list[common_pb2.Image]
) -> None:
    reply = await engagement.ScoreClip(_clip_messages(clip), timeout=60)
    assert reply.clip_id == "c" and reply.frames_received == 12 and reply.frames_with_face == 12
    outputs = {
        o.model: {AFFECT_NAMES[a.affect]: list(a.probabilities) for a in o.affects} for o in reply.outputs
    }
    assert set(outputs) == {"engagement_temporal", "engagement_xgb"}
    for by_affect in outputs.values():
        assert set(by_affect) == set(AFFECTS)
        for probs in by_affect.values():
            assert len(probs) == 4 and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert {"engagement_temporal", *(f"engagement_xgb_{a}" for a in AFFECTS)} == {
        m.name for m in reply.models
    }
    assert all(m.demo for m in reply.models)


async def test_engagement_bad_input(
    engagement: engagement_grpc.EngagementServiceStub, clip: list[common_pb2.Image]
) -> None:
    code, details = await _status_of(engagement.ScoreClip(_clip_messages(clip, fps=0.0), timeout=30))
    assert code == INVALID and "fps" in details
    frame_first = list(_clip_messages(clip))[1:]
    code, details = await _status_of(engagement.ScoreClip(iter(frame_first), timeout=30))
    assert code == INVALID and "ClipHeader" in details
    # A live stream reports a bad frame on its answer and goes on.
    frames = list(clip[:6])
    frames[2] = common_pb2.Image(encoded=b"\xff\xd8\xff not a jpeg")
    answers = [
        a
        async for a in engagement.StreamVideo(
            _clip_messages(frames, engagement_pb.StreamVideoRequest), timeout=60
        )
    ]
    assert len(answers) == 6
    assert answers[2].status.code == INVALID.value[0] and not answers[2].has_face
    assert all(a.status.code == 0 and a.has_face for i, a in enumerate(answers) if i != 2)


async def test_engagement_empty_requests(engagement: engagement_grpc.EngagementServiceStub) -> None:
    code, details = await _status_of(engagement.ScoreClip(iter([]), timeout=10))
    assert code == INVALID and "empty stream" in details
    code, details = await _status_of(engagement.ScoreClip(_clip_messages([]), timeout=10))
    assert code == INVALID and "no frames" in details


# ------------------------------------------------------------------------------------------------
# Gateway, in front of the two services above and a stand-in proxylabel service for shard jobs
class ShardJobsStandIn(proxylabel_grpc.ProxyLabelServiceServicer):
    """Answers the shard-job RPCs the gateway mirrors, keeping what each request carried."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, float | None]] = []

    def _job(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        state: int = proxylabel_pb.SHARD_JOB_STATE_RUNNING,
    ) -> proxylabel_pb.ShardJob:
        self.seen.append((method, request, context.time_remaining()))
        return proxylabel_pb.ShardJob(job_id=getattr(request, "job_id", "") or "listed", state=state)

    async def GetShardJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return proxylabel_pb.GetShardJobResponse(job=self._job("GetShardJob", request, context))

    async def ListShardJobs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return proxylabel_pb.ListShardJobsResponse(jobs=[self._job("ListShardJobs", request, context)] * 2)

    async def CancelShardJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        job = self._job("CancelShardJob", request, context, proxylabel_pb.SHARD_JOB_STATE_CANCELLED)
        return proxylabel_pb.CancelShardJobResponse(job=job)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return proxylabel_pb.ListModelsResponse()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxylabel() -> AsyncIterator[tuple[str, ShardJobsStandIn]]:
    stand_in = ShardJobsStandIn()
    name = proxylabel_pb.DESCRIPTOR.services_by_name["ProxyLabelService"].full_name

    async def build(_config: ProcessConfig, _metrics: Metrics) -> App:
        return App([Servicer(name, stand_in, proxylabel_grpc.add_ProxyLabelServiceServicer_to_server)])

    async with _serving("proxylabel", _config(ProcessConfig, "proxylabel"), build) as target:
        yield target, stand_in


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    targets: dict[str, str], proxylabel: tuple[str, ShardJobsStandIn]
) -> AsyncIterator[pb_grpc.GatewayServiceStub]:
    config = _config(
        GatewayConfig,
        "gateway",
        rules_path=str(ROOT / "config" / "fusion_rules.yaml"),
        targets={**targets, "proxylabel": proxylabel[0]},
        auth={"tokens": [TOKEN]},
        health_poll_seconds=0.2,
    )
    async with _serving("gateway", config, build_gateway) as target, _channel(target) as channel:
        yield pb_grpc.GatewayServiceStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)


async def test_gateway_fuses_the_emotion_services_logits(
    gateway: pb_grpc.GatewayServiceStub, astronaut_jpeg: bytes
) -> None:
    reply = await gateway.ClassifyEmotion(
        pb.ClassifyEmotionRequest(
            images=[common_pb2.Image(encoded=astronaut_jpeg)],
            mode=pb.EMOTION_MODE_STUDENT,
            return_member_logits=True,
        ),
        timeout=30,
        metadata=AUTH,
    )
    assert (
        reply.mode == pb.EMOTION_MODE_STUDENT and reply.rules_version and list(reply.class_names) == CLASSES
    )
    (face,) = reply.images[0].faces
    assert face.label == "Happy" and sum(face.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert [m.model for m in face.members] == ["emotion_student"]


async def test_gateway_scores_a_clip_by_the_rules(
    gateway: pb_grpc.GatewayServiceStub, clip: list[common_pb2.Image]
) -> None:
    messages = [pb.ScoreClipRequest(header=pb.ClipHeader(clip_id="g", fps=30))]
    messages += [
        pb.ScoreClipRequest(frame=common_pb2.VideoFrame(timestamp_us=i * 33_333, image=image))
        for i, image in enumerate(clip)
    ]
    reply = await gateway.ScoreClip(iter(messages), timeout=60, metadata=AUTH)
    assert reply.clip_id == "g" and reply.frames_with_face == 12 and reply.rules_version
    assert {AFFECT_NAMES[a.affect] for a in reply.affects} == set(AFFECTS)
    assert {a.decided_by for a in reply.affects} <= {"engagement_temporal", "engagement_xgb"}


async def test_gateway_bad_and_empty_requests(
    gateway: pb_grpc.GatewayServiceStub, astronaut_jpeg: bytes
) -> None:
    image = common_pb2.Image(encoded=astronaut_jpeg)
    code, details = await _status_of(
        gateway.ClassifyEmotion(pb.ClassifyEmotionRequest(images=[image], mode=99), timeout=10, metadata=AUTH)
    )
    assert code == INVALID and "unknown emotion mode" in details
    code, details = await _status_of(
        gateway.ClassifyEmotion(
            pb.ClassifyEmotionRequest(images=[image], ensemble="no_such_ensemble"), timeout=10, metadata=AUTH
        )
    )
    assert code == INVALID and "unknown ensemble" in details
    code, details = await _status_of(
        gateway.ClassifyEmotion(pb.ClassifyEmotionRequest(), timeout=10, metadata=AUTH)
    )
    assert code == INVALID and "no images" in details
    code, _ = await _status_of(gateway.ClassifyEmotion(pb.ClassifyEmotionRequest(images=[image]), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_gateway_mirrors_shard_jobs_with_the_caller_and_the_deadline(
    gateway: pb_grpc.GatewayServiceStub, proxylabel: tuple[str, ShardJobsStandIn]
) -> None:
    stand_in = proxylabel[1]
    stand_in.seen.clear()
    got = await gateway.GetShardJob(pb.GetShardJobRequest(job_id="j1"), timeout=5, metadata=AUTH)
    listed = await gateway.ListShardJobs(pb.ListShardJobsRequest(), timeout=5, metadata=AUTH)
    cancelled = await gateway.CancelShardJob(pb.CancelShardJobRequest(job_id="j2"), timeout=5, metadata=AUTH)
    assert got == pb.GetShardJobResponse(
        job=proxylabel_pb.ShardJob(job_id="j1", state=proxylabel_pb.SHARD_JOB_STATE_RUNNING)
    )
    assert [j.job_id for j in listed.jobs] == ["listed", "listed"]
    assert cancelled.job.job_id == "j2" and cancelled.job.state == proxylabel_pb.SHARD_JOB_STATE_CANCELLED
    assert [method for method, _, _ in stand_in.seen] == ["GetShardJob", "ListShardJobs", "CancelShardJob"]
    for _, request, remaining in stand_in.seen:
        # The gateway's token holds every scope: its caller is an admin, named by the token's entry.
        assert request.caller == proxylabel_pb.Caller(name="config-1", admin=True)
        # The caller's 5 s (give or take the clocks' rounding), not the gateway's 30 s cap.
        assert remaining is not None and 0 < remaining < 10
    assert [request.job_id for _, request, _ in stand_in.seen if hasattr(request, "job_id")] == ["j1", "j2"]
