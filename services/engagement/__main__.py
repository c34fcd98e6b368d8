"""`tessera-engagement`: run the engagement service."""

from __future__ import annotations

import sys

from services.engagement.config import EngagementConfig
from services.engagement.pipeline import EngagementPipeline
from services.engagement.servicer import SERVICE_NAME, EngagementServicer
from services.runtime.backends.onnx import OnnxBackend
from services.runtime.backends.router import RoutingBackend
from services.runtime.backends.xgb import XgbBackend
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.reloader import RepositoryPoller
from services.runtime.repository import ModelRepository
from services.runtime.server import Servicer
from services.runtime.streams import Drain
from services.vision.faces import build_detector
from tessera.engagement.v1 import engagement_service_pb2_grpc as pb_grpc


async def build(config: EngagementConfig, metrics: Metrics) -> App:
    repository = ModelRepository(config.model_repository)
    # The temporal network runs on ONNX Runtime, the boosters on XGBoost: one backend routes both.
    ours = {config.temporal_model, *config.xgboost_models.values()}
    backend = RoutingBackend(
        repository,
        [
            OnnxBackend(repository, config.onnx, metrics, serves=ours.__contains__),
            XgbBackend(repository, config.xgb, metrics, serves=ours.__contains__),
        ],
    )
    await backend.start()
    detector = build_detector(config.detector, config.model_repository)  # the kind is read here, at start
    pipeline = EngagementPipeline(config, repository, backend, detector, metrics)
    poller = RepositoryPoller(backend, config.repository_poll_seconds)

    drain = Drain(config.server.drain_streams_after_seconds)
    servicer = EngagementServicer(pipeline, drain)
    return App(
        [Servicer(SERVICE_NAME, servicer, pb_grpc.add_EngagementServiceServicer_to_server)],
        cleanup=backend.close,
        background=[poller],
        drain=drain,
    )


def main() -> int:
    return run("engagement", EngagementConfig, build)


if __name__ == "__main__":
    sys.exit(main())
