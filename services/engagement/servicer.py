"""Thin gRPC servicer of the engagement service: validate, delegate, map to messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from tessera.common.v1 import common_pb2
from tessera.engagement.v1 import engagement_service_pb2 as pb
from tessera.engagement.v1 import engagement_service_pb2_grpc as pb_grpc

from services.engagement.config import EngagementConfig
from services.runtime.errors import InvalidArgument, ServingError
from services.runtime.servicing import pipeline_missing, present_models, require_models

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngagementService"].full_name


class EngagementServicer(pb_grpc.EngagementServiceServicer):
    def __init__(self, config: EngagementConfig) -> None:
        self.config = config

    def _models(self) -> list[str]:
        return [self.config.temporal_model, self.config.xgboost_model]

    async def ScoreClip(self, request_iterator: AsyncIterator[pb.ScoreClipRequest],
                        context: grpc.aio.ServicerContext) -> pb.ScoreClipResponse:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream, None)
            if first is None:
                raise InvalidArgument("empty stream: send a ClipHeader, then frames")
            if first.WhichOneof("item") != "header":
                raise InvalidArgument("the first message of a clip must be its ClipHeader")
            require_models(self.config.model_repository, self._models(), "engagement scoring")
            raise pipeline_missing("engagement scoring")
        except ServingError:
            # Answering while the client still writes makes grpc report INTERNAL to it instead of
            # our status: read (without decoding) what it sends, up to the clip limit, first.
            await drain(stream, self.config.max_frames_per_clip)
            raise

    async def StreamVideo(self, request_iterator: AsyncIterator[pb.StreamVideoRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamVideoResponse]:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream, None)
            if first is None:
                raise InvalidArgument("empty stream: send a ClipHeader, then frames")
            require_models(self.config.model_repository, self._models(), "live engagement")
            raise pipeline_missing("live engagement")
        except ServingError:
            await drain(stream, self.config.max_frames_per_clip)  # see ScoreClip
            raise
        if False:  # pragma: no cover - makes this an async generator
            yield pb.StreamVideoResponse()

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        present = present_models(self.config.model_repository)
        return pb.ListModelsResponse(models=[
            common_pb2.ModelInfo(name=m, backend="onnxruntime") for m in self._models() if m in present])


async def drain(stream: AsyncIterator[object], limit: int) -> None:
    """Consume at most limit more messages of a client stream."""
    for _ in range(limit):
        if await anext(stream, None) is None:
            return
