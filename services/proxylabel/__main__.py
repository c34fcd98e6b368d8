"""`tessera-proxylabel`: run the proxylabel service."""

from __future__ import annotations

import sys

from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc

from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.pipeline import ProxyLabelPipeline
from services.proxylabel.runner import ShardJobs
from services.proxylabel.servicer import SERVICE_NAME, ProxyLabelServicer
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.reloader import RepositoryPoller
from services.runtime.repository import ModelRepository
from services.runtime.server import Servicer
from services.runtime.streams import Drain


class IndexWatcher:
    """Tells the poller when the kNN index's files changed: the ONNX backend does not own that
    entry. Runs after the backend's reload, whose rescan it reads."""

    def __init__(self, repository: ModelRepository, name: str) -> None:
        self.repository, self.name = repository, name
        self.seen = self._fingerprint()

    def _fingerprint(self) -> tuple:
        if self.name not in self.repository:
            return ()
        entry = self.repository.get(self.name)
        return (entry.fingerprint, entry.error)

    async def reload(self) -> list[str]:
        now = self._fingerprint()
        if now == self.seen:
            return []
        self.seen = now
        return [self.name]


async def build(config: ProxyLabelConfig, metrics: Metrics) -> App:
    # Shard jobs are tasks of the process, not of the calls that watch them; they stop with it.
    jobs = ShardJobs(config)
    drain = Drain(config.server.drain_streams_after_seconds)
    if not config.model_repository.is_dir():
        pipeline = ProxyLabelPipeline(config, None, metrics)
        return App([Servicer(SERVICE_NAME, ProxyLabelServicer(config, pipeline, jobs, drain),
                             pb_grpc.add_ProxyLabelServiceServicer_to_server)],
                   background=[jobs], drain=drain)
    repository = ModelRepository(config.model_repository)
    # ONNX Runtime settings are the runtime's defaults until the service config grows an `onnx` section.
    ours = {config.mlp_model, config.embedder_model}  # the kNN index is the pipeline's own
    backend = OnnxBackend(repository, getattr(config, "onnx", OnnxConfig()), metrics, serves=ours.__contains__)
    await backend.start()
    pipeline = await ProxyLabelPipeline.load(config, repository, backend, metrics)
    servicer = ProxyLabelServicer(config, pipeline, jobs, drain)

    async def swap(changed: list[str]) -> None:
        # A new pipeline for new requests; a shard job keeps the one it was planned with.
        servicer.pipeline = await ProxyLabelPipeline.load(config, repository, backend, metrics,
                                                          previous=servicer.pipeline)

    poller = RepositoryPoller(backend, config.repository_poll_seconds, on_change=swap,
                              also=[IndexWatcher(repository, config.knn_model)])

    # Jobs stop (releasing their locks) before cleanup closes the backend they score with.
    return App([Servicer(SERVICE_NAME, servicer, pb_grpc.add_ProxyLabelServiceServicer_to_server)],
               cleanup=backend.close, background=[poller, jobs], drain=drain)


def main() -> int:
    return run("proxylabel", ProxyLabelConfig, build)


if __name__ == "__main__":
    sys.exit(main())
