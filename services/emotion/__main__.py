"""`tessera-emotion`: run the emotion service."""

from __future__ import annotations

import ctypes
import os
import sys

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
from services.runtime.server import Servicer, ServingProcess
from services.vision.faces import build_detector
from tessera.emotion.v1 import emotion_service_pb2_grpc as pb_grpc


async def build(config: EmotionConfig, metrics: Metrics) -> App:
    repository = ModelRepository(config.model_repository)
    backend: Backend = (
        TritonBackend(repository, config.triton, metrics)
        if config.backend == "triton"
        else OnnxBackend(repository, config.onnx, metrics, serves=config.serves)
    )
    await backend.start()
    detector = build_detector(config.detector, config.model_repository)  # the kind is read here, at start
    pipeline = EmotionPipeline(config, repository, backend, detector, metrics)
    poller = RepositoryPoller(backend, config.repository_poll_seconds)

    async def on_start(server: ServingProcess) -> None:
        if isinstance(backend, TritonBackend):
            follow_triton(backend, server)

    return App(
        [Servicer(SERVICE_NAME, EmotionServicer(pipeline), pb_grpc.add_EmotionServiceServicer_to_server)],
        on_start=on_start,
        cleanup=backend.close,
        background=[poller],
    )


def follow_triton(backend: TritonBackend, server: ServingProcess) -> None:
    """The service's health entry follows Triton's reachability: NOT_SERVING while its models
    cannot run, so readiness probes and the gateway see it; SERVING once a call or a probe (the
    repository poll) gets through again. The process's own entry ("") stays SERVING: it is what
    liveness probes ask, and restarting the service would not bring Triton back."""

    async def publish(reachable: bool) -> None:
        await server.set_serving(SERVICE_NAME, reachable)

    backend.follow(publish)


# glibc raises its mmap threshold (up to 32 MB) each time a big block is freed; after that,
# image-sized buffers come from the malloc arenas, whose freed pages stay resident. A fixed
# threshold makes every buffer over it a mapping of its own, returned to the system when freed;
# the cost is a page fault per page of each such buffer. Measured over three runs of three
# identical bursts of 6000² photos (RSS after bursts 1 → 3): 288 → 296, 323 → 330, 317 → 350 MB
# without it; 265 → 274, 269 → 276, 270 → 277 MB at 128 KiB; 278 → 286 MB at 1 MiB; 285 → 313 MB
# at 4 MiB. 1 MiB keeps a face's buffers (a decoded 224² crop is 150 KB, its float input 602 KB)
# in the arenas, where mapping them for each request cost 0.2 ms of a 224² crop's 1 ms decode and
# preprocessing, while photos and batches still map. (Two arenas, MALLOC_ARENA_MAX=2, changed
# nothing measurable.) Set at start, before any worker thread; an operator's
# MALLOC_MMAP_THRESHOLD_ in the environment wins.
MMAP_THRESHOLD_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold; False when not set (another libc, or the environment sets it)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def main() -> int:
    fix_mmap_threshold()
    return run("emotion", EmotionConfig, build)


if __name__ == "__main__":
    sys.exit(main())
