"""Thin gRPC servicer of the engagement service: validate, delegate, map to messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.engagement.pipeline import EngagementPipeline, FrameFace, ModelOutputs
from services.engagement.stream import Clip, LiveWindow, check_fps
from services.fusion.affect_enum import AFFECT_VALUES
from services.runtime.errors import InvalidArgument, ServingError, item_status
from services.runtime.streams import Drain, until_drained
from services.vision.inputs import image_from_pb
from tessera.common.v1 import common_pb2
from tessera.engagement.v1 import engagement_service_pb2 as pb
from tessera.engagement.v1 import engagement_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngagementService"].full_name

ClipMessage = pb.ScoreClipRequest | pb.StreamVideoRequest


def outputs_to_pb(outputs: ModelOutputs | None) -> list[pb.ModelOutput]:
    if outputs is None:
        return []
    return [
        pb.ModelOutput(
            model=model,
            affects=[
                pb.AffectProbabilities(affect=AFFECT_VALUES[affect], probabilities=probs.tolist())
                for affect, probs in by_affect.items()
            ],
        )
        for model, by_affect in outputs.items()
    ]


def face_box(face: FrameFace) -> common_pb2.BoundingBox | None:
    b = face.box
    return None if b is None else common_pb2.BoundingBox(x=b.x, y=b.y, width=b.w, height=b.h)


async def clip_header(stream: AsyncIterator[ClipMessage]) -> pb.ClipHeader:
    first = await anext(stream, None)
    if first is None:
        raise InvalidArgument("empty stream: send a ClipHeader, then frames")
    if first.WhichOneof("item") != "header":
        raise InvalidArgument("the first message of a clip must be its ClipHeader")
    return first.header


def frame_of(msg: ClipMessage, frames_before: int) -> common_pb2.VideoFrame:
    if msg.WhichOneof("item") != "frame":
        raise InvalidArgument(
            f"message {frames_before + 2} of the stream is not a frame (one ClipHeader, first)"
        )
    return msg.frame


class EngagementServicer(pb_grpc.EngagementServiceServicer):
    def __init__(self, pipeline: EngagementPipeline, drain: Drain | None = None) -> None:
        self.pipeline = pipeline
        self.drain = drain or Drain()

    async def ScoreClip(
        self, request_iterator: AsyncIterator[pb.ScoreClipRequest], context: grpc.aio.ServicerContext
    ) -> pb.ScoreClipResponse:
        stream = aiter(request_iterator)
        try:
            header = await clip_header(stream)
            clip = Clip(self.pipeline, self.pipeline.require("engagement scoring"))
            async for msg in stream:
                frame = frame_of(msg, clip.received)
                if not clip.received:
                    # Checked with the first frame (before any work): a clip without frames, or
                    # with a second header, is reported as such first.
                    check_fps(header.fps)
                try:
                    await clip.add(image_from_pb(frame.image), frame.timestamp_us)
                except ServingError as exc:
                    exc.message = f"frame {clip.received} (t={frame.timestamp_us} µs): {exc.message}"
                    raise
            if not clip.received:
                raise InvalidArgument("the clip has no frames")
            outputs = await clip.finish()
        except ServingError:
            # Answering while the client still writes makes grpc report INTERNAL to it instead of
            # our status: read (without decoding) what it sends, up to the clip limit, first.
            await drain(stream, self.pipeline.config.max_frames_per_clip)
            raise
        return pb.ScoreClipResponse(
            clip_id=header.clip_id,
            outputs=outputs_to_pb(outputs),
            frames_received=clip.received,
            frames_with_face=clip.with_face,
            models=[m.info() for m in self.pipeline.served_models()],
        )

    async def StreamVideo(
        self, request_iterator: AsyncIterator[pb.StreamVideoRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamVideoResponse]:
        stream = aiter(request_iterator)
        try:
            check_fps((await clip_header(stream)).fps)
            window = LiveWindow(self.pipeline, self.pipeline.require("live engagement"))
        except ServingError:
            await drain(stream, self.pipeline.config.max_frames_per_clip)  # see ScoreClip
            raise

        async def answers() -> AsyncIterator[pb.StreamVideoResponse]:
            async for msg in stream:
                timestamp = msg.frame.timestamp_us
                try:
                    image = image_from_pb(frame_of(msg, window.received).image)
                    face, outputs = await window.add(image, timestamp)
                except ServingError as exc:
                    # One bad message is reported on its answer; a live stream goes on.
                    code, message = item_status(exc)
                    yield pb.StreamVideoResponse(
                        timestamp_us=timestamp, status=common_pb2.ItemStatus(code=code, message=message)
                    )
                    continue
                yield pb.StreamVideoResponse(
                    timestamp_us=timestamp,
                    face=face_box(face),
                    has_face=face.box is not None,
                    outputs=outputs_to_pb(outputs),
                )

        async for answer in until_drained(answers(), self.drain, "engagement live stream"):
            yield answer

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.info() for m in self.pipeline.served_models()])


async def drain(stream: AsyncIterator[object], limit: int) -> None:
    """Consume at most limit more messages of a client stream."""
    for _ in range(limit):
        if await anext(stream, None) is None:
            return
