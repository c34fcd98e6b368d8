"""Emotion serving benchmarks, as ratios against baselines measured in the same run (DESIGN.md §8).

    .venv/bin/python bench/bench_emotion.py [--quick]

1. Latency, batch 1: a 224×224 face crop (flagged as a crop, so no detection) through the gateway
   to an emotion service whose student is a mobilenetv3_large_100 export, vs the same pipeline in
   process (decode, preprocess, ONNX Runtime, fusion). The added p50 is compared with the floor: a
   bare two-hop grpc.aio echo (client → proxy → server) of the same request bytes.
   Target: added p50 ≤ 1.25 × floor.
2. Throughput at 32 concurrent clients through the gateway vs the same pipeline in process with
   32 concurrent callers sharing the dynamic batcher. Target ≥ 0.8.
3. The default student (fer mini-Xception) end to end on skimage's astronaut, split by stage.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
from skimage import data as skdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import TesseraClient  # noqa: E402
from launcher.suite import Suite  # noqa: E402
from services.emotion.config import EmotionConfig  # noqa: E402
from services.emotion.pipeline import EmotionPipeline, ImageInput  # noqa: E402
from services.fusion.emotion import fuse_logits  # noqa: E402
from services.runtime.backends.onnx import OnnxBackend  # noqa: E402
from services.runtime.metrics import Metrics  # noqa: E402
from services.runtime.repository import ModelRepository  # noqa: E402
from services.vision.faces import build_detector  # noqa: E402
from tessera.gateway.v1 import gateway_service_pb2 as pb  # noqa: E402
from tools.models.fer_student import build_fer_student  # noqa: E402

_EXPORT = """
import sys
from pathlib import Path
from tools.export.timm_export import DEFAULT_CACHE, export_timm
export_timm("mobilenetv3_large_100", None, 7, "emotion_student", Path(sys.argv[1]), seed=7, input_size=224,
            clahe=None, cache_dir=DEFAULT_CACHE)
"""


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def crop_jpeg() -> bytes:
    bgr = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    return cv2.imencode(".jpg", cv2.resize(bgr[60:280, 150:370], (224, 224)))[1].tobytes()


# ---------------------------------------------------------------------------------- the floor
_ECHO = """
import asyncio, sys, grpc

async def main():
    async def echo(request, context):
        return request
    ident = lambda b: b
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, ident, ident)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    forward = channel.unary_unary("/bench.Echo/Echo", request_serializer=ident, response_deserializer=ident)

    async def proxy(request, context):
        return await forward(request, timeout=10)
    proxy_handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(proxy, ident, ident)})
    front = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    front.add_generic_rpc_handlers([proxy_handler])
    front_port = front.add_insecure_port("127.0.0.1:0")
    await front.start()
    print(front_port, flush=True)
    await front.wait_for_termination()

asyncio.run(main())
"""


def echo_floor(payload: bytes, n: int) -> float:
    """p50 of a bare client → proxy → server grpc.aio echo (servers in their own process)."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            for _ in range(20):
                call(payload, timeout=10)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                call(payload, timeout=10)
                times.append(time.perf_counter() - t)
        return p50(times)
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------- in process
class InProcess:
    """The emotion pipeline plus fusion, without gRPC."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    async def __aenter__(self) -> InProcess:
        config = EmotionConfig(model_repository=self.repo)
        self.metrics = Metrics("bench")
        repository = ModelRepository(self.repo)
        self.backend = OnnxBackend(repository, config.onnx, self.metrics)
        await self.backend.start()
        self.pipeline = EmotionPipeline(config, repository, self.backend, build_detector(config.detector),
                                        self.metrics)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.backend.close()

    async def classify(self, image: ImageInput) -> np.ndarray:
        (out,) = await self.pipeline.run([image], ["emotion_student"])
        logits = np.stack([f.logits["emotion_student"] for f in out.faces])
        return fuse_logits({"emotion_student": logits}, {"emotion_student": 1.0}, 1.0)

    async def latency(self, image: ImageInput, n: int) -> float:
        for _ in range(20):
            await self.classify(image)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await self.classify(image)
            times.append(time.perf_counter() - t)
        return p50(times)

    async def throughput(self, image: ImageInput, clients: int, seconds: float) -> float:
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await self.classify(image)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return done / (time.perf_counter() - start)


def gateway_latency(client: TesseraClient, request: pb.ClassifyEmotionRequest, n: int) -> float:
    for _ in range(20):
        client.stub.ClassifyEmotion(request, timeout=30)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.stub.ClassifyEmotion(request, timeout=30)
        times.append(time.perf_counter() - t)
    return p50(times)


def gateway_throughput(target: str, request: pb.ClassifyEmotionRequest, clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with TesseraClient(target) as client:
            while time.perf_counter() < stop:
                client.stub.ClassifyEmotion(request, timeout=30)
                counts[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def stage_split(repo: Path, n: int) -> dict[str, float]:
    """Mean ms per stage of the default student on the astronaut, in process."""
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()

    async def run() -> dict[str, float]:
        async with InProcess(repo) as ip:
            await ip.classify(ImageInput(encoded=jpeg))
            before = _stage_sums(ip.metrics)
            total = []
            for _ in range(n):
                t = time.perf_counter()
                await ip.classify(ImageInput(encoded=jpeg))
                total.append(time.perf_counter() - t)
            after = _stage_sums(ip.metrics)
            split = {k: (after[k] - before.get(k, 0.0)) / n * 1000 for k in after}
            split["end to end"] = p50(total) * 1000
            return split

    return asyncio.run(run())


def _stage_sums(metrics: Metrics) -> dict[str, float]:
    sums: dict[str, float] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "tessera_stage_duration_seconds_sum":
                sums[s.labels["stage"]] = sums.get(s.labels["stage"], 0.0) + s.value
            if s.name == "tessera_model_inference_seconds_sum":
                sums["infer"] = sums.get("infer", 0.0) + s.value
    return sums


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    n, seconds = (50, 2.0) if args.quick else (300, 10.0)
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    try:
        repo = work / "repo"
        subprocess.run([sys.executable, "-c", _EXPORT, str(repo)], cwd=ROOT, check=True)
        crop = crop_jpeg()
        image = ImageInput(encoded=crop, is_face_crop=True)
        request = pb.ClassifyEmotionRequest(images=[{"encoded": crop, "is_face_crop": True}])

        in_p50 = asyncio.run(_latency(repo, image, n))
        with Suite(work / "suite", repository=repo) as suite:
            with TesseraClient(suite.gateway.target) as client:
                gw_p50 = gateway_latency(client, request, n)
            gw_tput = gateway_throughput(suite.gateway.target, request, 32, seconds)
        in_tput = asyncio.run(_throughput(repo, image, seconds))
        floor = echo_floor(request.SerializeToString(), n)

        added = gw_p50 - in_p50
        print("\nemotion student (mobilenetv3_large_100, 224² crop), 2 cores")
        print(f"{'measure':<44}{'value':>12}{'ratio':>10}{'target':>10}")
        print(f"{'in-process pipeline p50':<44}{in_p50 * 1e3:>10.2f}ms")
        print(f"{'through gateway p50':<44}{gw_p50 * 1e3:>10.2f}ms")
        print(f"{'two-hop grpc.aio echo p50 (floor)':<44}{floor * 1e3:>10.2f}ms")
        print(f"{'added by gateway + service hop':<44}{added * 1e3:>10.2f}ms{added / floor:>10.2f}{'≤ 1.25':>10}")
        print(f"{'in-process throughput, 32 callers':<44}{in_tput:>9.1f}/s")
        print(f"{'gateway throughput, 32 clients':<44}{gw_tput:>9.1f}/s{gw_tput / in_tput:>10.2f}{'≥ 0.8':>10}")

        default_repo = work / "default"
        build_fer_student(default_repo, ROOT / ".cache")
        split = stage_split(default_repo, max(20, n // 5))
        print("\ndefault student (fer mini-Xception) on astronaut 512², in process, mean ms per request")
        for stage, ms in split.items():
            print(f"  {stage:<14}{ms:>8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


async def _latency(repo: Path, image: ImageInput, n: int) -> float:
    async with InProcess(repo) as ip:
        return await ip.latency(image, n)


async def _throughput(repo: Path, image: ImageInput, seconds: float) -> float:
    async with InProcess(repo) as ip:
        await ip.latency(image, 10)
        return await ip.throughput(image, 32, seconds)


if __name__ == "__main__":
    sys.exit(main())
