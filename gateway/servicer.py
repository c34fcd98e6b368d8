"""The public gateway servicer: validate, route, fuse by the rules, answer."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc

from gateway import answers
from gateway.config import GatewayConfig
from gateway.routes import Routes
from services.fusion.affect_enum import AFFECT_NAMES
from services.fusion.emotion import members_for
from services.fusion.engagement import Smoother, decide
from services.fusion.rules import AFFECTS, AffectName, FusionRules, RulesStore, Smoothing
from services.runtime.auth import current_identity
from services.runtime.config import ALL_SCOPES
from services.runtime.errors import FailedPrecondition, ServingError, item_status
from services.runtime.servicing import check_batch_size
from services.runtime.streams import Drain, until_drained
from tessera.common.v1 import common_pb2
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.engagement.v1 import engagement_service_pb2 as engagement_pb
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
Answer = TypeVar("Answer", pb.GetShardJobResponse, pb.ListShardJobsResponse, pb.CancelShardJobResponse)
VERSION = "0.1.0"


def _engagement_message(msg: pb.ScoreClipRequest | pb.StreamVideoRequest, cls: type) -> object:
    """A clip/stream message as the engagement service takes it."""
    if msg.WhichOneof("item") == "header":
        return cls(header=engagement_pb.ClipHeader(clip_id=msg.header.clip_id, fps=msg.header.fps))
    return cls(frame=msg.frame)


class _Relay:
    """Forwards a caller's stream to a downstream call. A bad message raises in gRPC's sender task,
    where nobody would see it and the call would hang until its deadline: the error is kept, the
    downstream call cancelled, and the handler raises it (INVALID_ARGUMENT at once)."""

    def __init__(self) -> None:
        self.error: ServingError | None = None
        self.call: grpc.aio.Call | None = None

    async def messages(self, source: AsyncIterator[object]) -> AsyncIterator[object]:
        try:
            async for message in source:
                yield message
        except ServingError as exc:
            self.error = exc
            if self.call is not None:
                self.call.cancel()

    def raise_kept(self) -> None:
        if self.error is not None:
            raise self.error


def _shard_caller() -> proxylabel_pb.Caller | None:
    """The authenticated caller of the running call, for the proxylabel service's shard jobs (a
    job belongs to the caller that started it); None when the gateway is open."""
    identity = current_identity()
    if identity is None:
        return None
    return proxylabel_pb.Caller(name=identity.name, admin=identity.allows(ALL_SCOPES))


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(
        self, config: GatewayConfig, routes: Routes, rules: RulesStore, drain: Drain | None = None
    ) -> None:
        self.config = config
        self.routes = routes
        self.rules = rules
        self.drain = drain or Drain()

    async def ClassifyEmotion(
        self, request: pb.ClassifyEmotionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClassifyEmotionResponse:
        check_batch_size(len(request.images), self.config.max_images_per_request, "images")
        rules, version = self.rules.current()
        mode = answers.emotion_mode(request.mode, rules, request.ensemble)
        ensemble = answers.emotion_ensemble(mode, rules, request.ensemble)
        models = answers.emotion_models(mode, rules, ensemble)
        route = self.routes.emotion
        try:
            reply = await route.call(
                route.stub.InferFaces(
                    emotion_pb.InferFacesRequest(images=request.images, models=models),
                    timeout=self.routes.timeout(context),
                    metadata=route.metadata(),
                )
            )
        except FailedPrecondition as exc:
            raise answers.missing_members(exc, ensemble) from None
        return answers.emotion_answer(reply, mode, rules, request.return_member_logits, version, ensemble)

    async def ScoreClip(
        self,
        request_iterator: AsyncIterator[pb.ScoreClipRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ScoreClipResponse:
        with_members = False

        async def forward() -> AsyncIterator[object]:
            nonlocal with_members
            async for msg in request_iterator:
                if msg.WhichOneof("item") == "header":
                    with_members = msg.header.options.return_member_outputs
                yield _engagement_message(msg, engagement_pb.ScoreClipRequest)

        route = self.routes.engagement
        route.ensure_reachable()
        relay = _Relay()
        relay.call = call = route.stub.ScoreClip(
            relay.messages(forward()),
            timeout=self.routes.timeout(context, "stream"),
            metadata=route.metadata(),
        )
        try:
            reply = await route.call(call)
        except (ServingError, asyncio.CancelledError):
            relay.raise_kept()
            raise
        rules, version = self.rules.current()
        answer = answers.clip_answer(reply, rules, version)
        if with_members:
            answer.members.extend(reply.outputs)
        return answer

    async def StreamVideo(
        self,
        request_iterator: AsyncIterator[pb.StreamVideoRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamVideoResponse]:
        # A live stream outlives any grace period: a drain ends it (UNAVAILABLE) and the caller resumes.
        async for reply in until_drained(
            self._live(request_iterator, context), self.drain, "gateway live stream"
        ):
            yield reply

    async def _live(
        self,
        request_iterator: AsyncIterator[pb.StreamVideoRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamVideoResponse]:
        # The engagement service answers every message after the header, in order: keep each
        # frame until its answer comes, to ask the emotion service about the face it found. At
        # most `live_frames_in_flight` of them: past that the caller's frames are not read, and
        # gRPC's flow control holds back a caller that sends but does not read its answers.
        pending: deque[common_pb2.Image | None] = deque()
        room = asyncio.Semaphore(self.config.live_frames_in_flight)

        async def forward() -> AsyncIterator[object]:
            first = True
            async for msg in request_iterator:
                if not first:
                    await room.acquire()
                    pending.append(msg.frame.image if msg.WhichOneof("item") == "frame" else None)
                first = False
                yield _engagement_message(msg, engagement_pb.StreamVideoRequest)

        rules, version = self.rules.current()
        smoothers = {a: Smoother(rules.engagement.smoothing.get(a, Smoothing())) for a in AFFECTS}
        route = self.routes.engagement
        route.ensure_reachable()
        relay = _Relay()
        relay.call = call = route.stub.StreamVideo(
            relay.messages(forward()),
            timeout=self.routes.timeout(context, "stream"),
            metadata=route.metadata(),
        )

        def end_relay(_: grpc.aio.ServicerContext[Any, Any]) -> None:
            # However the caller's call ends (it left while its frames waited for room, or the
            # stream failed), `forward` must not wait for room forever, holding the relay open.
            call.cancel()
            room.release()

        context.add_done_callback(end_relay)  # type: ignore[arg-type]  # grpc-stubs: DoneCallback is a class, not a callable type
        try:
            with route.waiting_on(call):  # a frozen engagement service cuts the stream: UNAVAILABLE
                async for update in call:
                    image = None
                    if pending:
                        image = pending.popleft()
                        room.release()
                    yield await self._live_reply(update, image, rules, version, smoothers, context)
        except grpc.aio.AioRpcError as exc:
            relay.raise_kept()
            raise route.error(exc) from None
        except (ServingError, asyncio.CancelledError):
            relay.raise_kept()
            raise
        relay.raise_kept()

    async def _live_reply(
        self,
        update: engagement_pb.StreamVideoResponse,
        image: common_pb2.Image | None,
        rules: FusionRules,
        version: str,
        smoothers: dict[AffectName, Smoother],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.StreamVideoResponse:
        """The answer to one frame of a live stream: the engagement service's, fused by the rules
        and smoothed over the stream, with the emotion of the face it found."""
        reply = pb.StreamVideoResponse(
            timestamp_us=update.timestamp_us, rules_version=version, status=update.status
        )
        if update.has_face:
            reply.face.CopyFrom(update.face)
            if image is not None:
                await self._frame_emotion(reply, image, update.face, rules, context)
        if update.outputs:
            levels = answers.affect_levels(
                decide(answers.model_outputs(update.outputs, rules), rules.engagement), rules
            )
            for level in levels:
                smoothed = smoothers[AFFECT_NAMES[level.affect]].update(level.probabilities)
                level.probabilities[:] = smoothed.tolist()
                level.level = int(smoothed.argmax())
                level.confidence = float(smoothed.max())
            reply.engagement.extend(levels)
        return reply

    async def _frame_emotion(
        self,
        reply: pb.StreamVideoResponse,
        image: common_pb2.Image,
        face: common_pb2.BoundingBox,
        rules: FusionRules,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """The emotion of the face the engagement service tracks, in the rules' default mode. A
        failure is reported on the frame: the stream goes on."""
        located = common_pb2.Image()
        located.CopyFrom(image)
        del located.faces[:]
        located.faces.append(face)
        mode = rules.emotion.default_mode
        route = self.routes.emotion
        try:
            answer = await route.call(
                route.stub.InferFaces(
                    emotion_pb.InferFacesRequest(
                        images=[located], models=list(members_for(rules.emotion, mode))
                    ),
                    timeout=self.routes.timeout(context),
                    metadata=route.metadata(),
                )
            )
            faces = answers.emotion_answer(answer, mode, rules, False, "").images[0].faces
        except ServingError as exc:
            if reply.status.code == 0:
                code, message = item_status(exc)
                reply.status.CopyFrom(common_pb2.ItemStatus(code=code, message=f"emotion: {message}"))
            return
        reply.faces.extend(faces)

    async def ScoreTexts(
        self, request: pb.ScoreTextsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ScoreTextsResponse:
        check_batch_size(len(request.rows), self.config.max_rows_per_request, "rows")
        rules, version = self.rules.current()
        mode = rules.proxylabel.mode
        route = self.routes.proxylabel
        reply = await route.call(
            route.stub.ScoreTexts(
                proxylabel_pb.ScoreTextsRequest(
                    rows=request.rows,
                    knn=answers.knn_options(rules),
                    run_knn=mode in ("knn", "ensemble"),
                    run_mlp=mode in ("mlp", "ensemble"),
                ),
                timeout=self.routes.timeout(context),
                metadata=route.metadata(),
            )
        )
        return answers.texts_answer(reply, rules, version)

    async def ScoreShard(
        self, request: pb.ScoreShardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ScoreShardResponse]:
        # The job runs in the proxylabel service; this stream only watches it. A drain ends the
        # watch (UNAVAILABLE) and the caller re-attaches with the same request: the job goes on.
        watch = self._watch_shard(request, context, _shard_caller())
        async for reply in until_drained(watch, self.drain, "gateway shard job watch"):
            yield reply

    async def _watch_shard(
        self,
        request: pb.ScoreShardRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        caller: proxylabel_pb.Caller | None,
    ) -> AsyncIterator[pb.ScoreShardResponse]:
        rules, version = self.rules.current()
        route = self.routes.proxylabel
        route.ensure_reachable()  # known down: UNAVAILABLE now, and the caller re-attaches later
        call = route.stub.ScoreShard(
            proxylabel_pb.ScoreShardRequest(
                input_path=request.input_path,
                output_path=request.output_path,
                rules=answers.proxy_rules(rules, version),
                batch_rows=request.batch_rows,
                caller=caller,
            ),
            timeout=self.routes.timeout(context, "stream"),
            metadata=route.metadata(),
        )
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                yield pb.ScoreShardResponse(**{kind: getattr(event, kind)})
        except grpc.aio.AioRpcError as exc:
            raise route.error(exc) from None
        finally:
            call.cancel()  # the caller left: stop watching (the job itself goes on)

    async def GetShardJob(
        self, request: pb.GetShardJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetShardJobResponse:
        return await self._shard_jobs("GetShardJob", pb.GetShardJobResponse, context, job_id=request.job_id)

    async def ListShardJobs(
        self, request: pb.ListShardJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListShardJobsResponse:
        return await self._shard_jobs("ListShardJobs", pb.ListShardJobsResponse, context)

    async def CancelShardJob(
        self, request: pb.CancelShardJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelShardJobResponse:
        return await self._shard_jobs(
            "CancelShardJob", pb.CancelShardJobResponse, context, job_id=request.job_id
        )

    async def _shard_jobs(
        self, method: str, answer: type[Answer], context: grpc.aio.ServicerContext[Any, Any], **fields: str
    ) -> Answer:
        """The proxylabel service's shard-job RPC `method` for the running call's caller (jobs are
        the caller's own) within its deadline; the reply's fields, which the gateway's answer mirrors."""
        route = self.routes.proxylabel
        request = getattr(proxylabel_pb, f"{method}Request")(caller=_shard_caller(), **fields)
        reply = await route.call(
            getattr(route.stub, method)(
                request, timeout=self.routes.timeout(context), metadata=route.metadata()
            )
        )
        return answer(**{f.name: getattr(reply, f.name) for f in answer.DESCRIPTOR.fields})

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        await self.routes.refresh_all()
        _, version = self.rules.current()
        return pb.GetStatusResponse(
            services=[r.status() for r in self.routes.all], rules_version=version, gateway_version=VERSION
        )
