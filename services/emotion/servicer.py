"""Thin gRPC servicer of the emotion service: protobuf ↔ pipeline types, nothing else."""

from __future__ import annotations

import grpc

from services.emotion.pipeline import EmotionPipeline, ImageOutput
from services.emotion.stop import StopSignal
from services.runtime.errors import item_status
from services.vision.inputs import image_from_pb
from tessera.common.v1 import common_pb2
from tessera.emotion.v1 import emotion_service_pb2 as pb
from tessera.emotion.v1 import emotion_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmotionService"].full_name


def image_to_pb(out: ImageOutput) -> pb.ImageFaces:
    code, message = item_status(out.error)
    return pb.ImageFaces(
        status=common_pb2.ItemStatus(code=code, message=message),
        faces=[
            pb.Face(
                box=common_pb2.BoundingBox(x=f.box.x, y=f.box.y, width=f.box.w, height=f.box.h),
                detection_score=f.box.score,
                members=[pb.MemberLogits(model=name, logits=row.tolist()) for name, row in f.logits.items()],
            )
            for f in out.faces
        ],
    )


class EmotionServicer(pb_grpc.EmotionServiceServicer):
    def __init__(self, pipeline: EmotionPipeline) -> None:
        self.pipeline = pipeline

    async def InferFaces(
        self, request: pb.InferFacesRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferFacesResponse:
        served = self.pipeline.check_models(list(request.models))
        # The pipeline's worker threads cannot be cancelled: they check this between stages. gRPC
        # cancels this coroutine when the caller cancels or the deadline passes; `finally` then
        # tells the threads (and on any other end of the call, so nothing outlives it).
        stop = StopSignal.for_call(context)
        try:
            outputs = await self.pipeline.run([image_from_pb(i) for i in request.images], served, stop)
        finally:
            stop.cancel()
        return pb.InferFacesResponse(
            images=[image_to_pb(o) for o in outputs],
            models=[m.info() for m in served],
            class_names=list(served[0].class_names),
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.info() for m in self.pipeline.served_models()])
