"""`tessera-emotion`: run the emotion service."""

from __future__ import annotations

import sys

from tessera.emotion.v1 import emotion_service_pb2_grpc as pb_grpc

from services.emotion.config import EmotionConfig
from services.emotion.pipeline import EmotionPipeline
from services.emotion.servicer import SERVICE_NAME, EmotionServicer
from services.runtime.backends.base import Backend
from services.runtime.backends.onnx import OnnxBackend
from services.runtime.backends.triton import TritonBackend
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.reloader import RepositoryPoller
from services.runtime.repository import ModelRepository
from services.runtime.server import Servicer
from services.vision.faces import build_detector


async def build(config: EmotionConfig, metrics: Metrics) -> App:
    repository = ModelRepository(config.model_repository)
    backend: Backend = (TritonBackend(repository, config.triton, metrics) if config.backend == "triton"
                        else OnnxBackend(repository, config.onnx, metrics, serves=config.serves))
    await backend.start()
    pipeline = EmotionPipeline(config, repository, backend, build_detector(config.detector), metrics)
    poller = RepositoryPoller(backend, config.repository_poll_seconds)

    return App([Servicer(SERVICE_NAME, EmotionServicer(pipeline), pb_grpc.add_EmotionServiceServicer_to_server)],
               cleanup=backend.close, background=[poller])


def main() -> int:
    return run("emotion", EmotionConfig, build)


if __name__ == "__main__":
    sys.exit(main())
