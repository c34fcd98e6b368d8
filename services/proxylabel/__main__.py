"""`python -m services.proxylabel`: run the proxylabel service."""

from __future__ import annotations

import sys

from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc

from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.pipeline import ProxyLabelPipeline
from services.proxylabel.servicer import SERVICE_NAME, ProxyLabelServicer
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.repository import ModelRepository
from services.runtime.server import Servicer


async def build(config: ProxyLabelConfig, metrics: Metrics) -> App:
    repository = ModelRepository(config.model_repository) if config.model_repository.is_dir() else None
    backend = None
    if repository is not None:
        # ONNX Runtime settings are the runtime's defaults until the service config grows an `onnx` section.
        backend = OnnxBackend(repository, getattr(config, "onnx", OnnxConfig()), metrics)
        await backend.start()
        pipeline = await ProxyLabelPipeline.load(config, repository, backend, metrics)
    else:
        pipeline = ProxyLabelPipeline(config, None, metrics)

    async def cleanup() -> None:
        if backend is not None:
            await backend.close()

    return App([Servicer(SERVICE_NAME, ProxyLabelServicer(config, pipeline),
                         pb_grpc.add_ProxyLabelServiceServicer_to_server)], cleanup=cleanup)


def main() -> int:
    return run("proxylabel", ProxyLabelConfig, build)


if __name__ == "__main__":
    sys.exit(main())
