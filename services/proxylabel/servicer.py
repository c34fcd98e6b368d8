"""Thin gRPC servicer of the proxylabel service: validate, delegate, map to messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.paths import confine
from services.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from services.runtime.servicing import pipeline_missing, present_models, require_models
from tessera.common.v1 import common_pb2
from tessera.proxylabel.v1 import proxylabel_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProxyLabelService"].full_name


class ProxyLabelServicer(pb_grpc.ProxyLabelServiceServicer):
    def __init__(self, config: ProxyLabelConfig) -> None:
        self.config = config

    def _needed(self, run_knn: bool, run_mlp: bool) -> list[str]:
        c = self.config
        return [c.embedder_model] + ([c.knn_model] if run_knn else []) + ([c.mlp_model] if run_mlp else [])

    async def ScoreTexts(self, request: pb.ScoreTextsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ScoreTextsResponse:
        if not request.rows:
            raise InvalidArgument("no rows to score")
        if len(request.rows) > self.config.max_rows_per_request:
            raise ResourceExhausted(
                f"{len(request.rows)} rows exceed the limit of {self.config.max_rows_per_request} per request")
        if not (request.run_knn or request.run_mlp):
            raise InvalidArgument("ask for run_knn, run_mlp or both")
        require_models(self.config.model_repository, self._needed(request.run_knn, request.run_mlp),
                       "proxy labelling")
        raise pipeline_missing("proxy labelling")

    async def ScoreShard(self, request: pb.ScoreShardRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.ScoreShardResponse]:
        source = confine(request.input_path, self.config.input_roots, "input_path")
        confine(request.output_path, self.config.output_roots, "output_path")
        if not source.is_file():
            raise NotFound(f"shard {request.input_path!r} does not exist")
        mode = request.rules.mode
        run_knn = mode in (pb.PROXY_MODE_KNN, pb.PROXY_MODE_ENSEMBLE)
        run_mlp = mode in (pb.PROXY_MODE_MLP, pb.PROXY_MODE_ENSEMBLE)
        if not (run_knn or run_mlp):
            raise InvalidArgument("the job's rules name no proxylabel mode")
        require_models(self.config.model_repository, self._needed(run_knn, run_mlp), "shard scoring")
        raise pipeline_missing("shard scoring")
        if False:  # pragma: no cover - makes this an async generator
            yield pb.ScoreShardResponse()

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        present = present_models(self.config.model_repository)
        c = self.config
        return pb.ListModelsResponse(models=[
            common_pb2.ModelInfo(name=m, backend="onnxruntime")
            for m in (c.embedder_model, c.knn_model, c.mlp_model) if m in present])
