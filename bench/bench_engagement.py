"""Live video through the gateway: one 640×480 stream at 30 fps, then two at once
(docs/benchmarks.md#targets).

    .venv/bin/python bench/bench_engagement.py [--seconds 20] [--fps 30] [--streams 2]

Frames of a generated webcam clip are sent as JPEG at the given rate over one StreamVideo call;
every frame is answered with its tracked face and that face's emotion (the gateway asks the
emotion service), and every hop with the smoothed engagement. Measured: frame-to-answer latency
(p50 / p95 / max) and whether a backlog grows (median latency of the last second vs the first).
Targets: keeps up, p95 ≤ 100 ms, for one stream and for `--streams` at once (two by default: two
webcams on one 2-core machine). For scale, the same frames through the engagement pipeline in
this process, one after another, give the per-frame cost without any network hop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402
from launcher.suite import Suite  # noqa: E402
from tessera_client import TesseraClient  # noqa: E402
from tools.modeller.engagement.generate import encode_jpeg, make_clip  # noqa: E402

LEVELS = {"engagement": 3, "boredom": 0, "confusion": 2, "frustration": 1}


def stream(target: str, frames: list[bytes], fps: float) -> tuple[list[float], int, int]:
    """Send frames paced at fps; (latency per frame in s, frames with a face, engagement updates)."""
    sent_at: dict[int, float] = {}
    lock = threading.Lock()

    def paced():
        start = time.perf_counter()
        for i, frame in enumerate(frames):
            delay = start + i / fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with lock:
                sent_at[i] = time.perf_counter()
            yield frame

    latencies, faces, hops = [], 0, 0
    with TesseraClient(target) as client:
        for i, reply in enumerate(client.stream_video(paced(), fps=fps, timeout=600)):
            now = time.perf_counter()
            with lock:
                latencies.append(now - sent_at[i])
            faces += bool(reply.faces)
            hops += bool(reply.engagement)
    return latencies, faces, hops


def in_process(repo: Path, frames: list[bytes]) -> float:
    """Median seconds per frame through the engagement pipeline alone (decode, track, crop, HOG,
    the models on hop frames), no gRPC."""
    from services.engagement.config import EngagementConfig
    from services.engagement.pipeline import EngagementPipeline
    from services.engagement.stream import LiveWindow
    from services.runtime.backends.onnx import OnnxBackend
    from services.runtime.backends.router import RoutingBackend
    from services.runtime.backends.xgb import XgbBackend
    from services.runtime.metrics import Metrics
    from services.runtime.repository import ModelRepository
    from services.vision.faces import build_detector
    from services.vision.inputs import ImageInput

    async def run() -> float:
        config = EngagementConfig(model_repository=repo)
        metrics, repository = Metrics("bench"), ModelRepository(repo)
        backend = RoutingBackend(
            repository,
            [OnnxBackend(repository, config.onnx, metrics), XgbBackend(repository, config.xgb, metrics)],
        )
        await backend.start()
        try:
            pipeline = EngagementPipeline(
                config, repository, backend, build_detector(config.detector, repo), metrics
            )
            window = LiveWindow(pipeline, pipeline.require("bench"))
            times = []
            for frame in frames:
                t = time.perf_counter()
                await window.add(ImageInput(encoded=frame))
                times.append(time.perf_counter() - t)
            return float(np.median(times))
        finally:
            await backend.close()

    return asyncio.run(run())


@dataclass
class LiveRun:
    """Streams sent at once, each paced at the rate: latencies (ms) per stream and what came back."""

    latencies: list[np.ndarray]
    faces: int
    hops: int

    @property
    def all_ms(self) -> np.ndarray:
        return np.concatenate(self.latencies)

    def backlog(self, fps: float) -> tuple[float, float]:
        """Median latency of the second second and of the last one, over the streams (ms)."""
        second = int(fps)
        first = float(np.median(np.concatenate([ms[second : 2 * second] for ms in self.latencies])))
        last = float(np.median(np.concatenate([ms[-second:] for ms in self.latencies])))
        return first, last


def live(target: str, frames: list[bytes], fps: float, streams: int) -> LiveRun:
    """`streams` StreamVideo calls at once (a thread each), every one sending `frames` at fps."""
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda _: stream(target, frames, fps), range(streams)))
    return LiveRun(
        [np.asarray(lat) * 1000 for lat, _, _ in runs], sum(f for _, f, _ in runs), sum(h for _, _, h in runs)
    )


def live_rows(run: LiveRun, streams: int, n: int, fps: float) -> tuple[list[dict], bool]:
    """Printed lines and result rows of one live run; whether it kept up with p95 ≤ 100 ms."""
    ms = run.all_ms
    first, last = run.backlog(fps)
    p95 = float(np.percentile(ms, 95))
    what = "one 640×480 JPEG stream" if streams == 1 else f"{streams} 640×480 JPEG streams at once"
    print(f"\nlive video: {what}, {fps:.0f} fps, {n} frames each, through the gateway")
    print(f"{'measure':<52}{'value':>12}{'target':>12}")
    print(f"{'frames answered':<52}{len(ms):>12}{n * streams:>12}")
    print(f"{'frames with a face (and its emotion)':<52}{run.faces:>12}")
    print(f"{'engagement updates':<52}{run.hops:>12}")
    print(f"{'frame-to-answer p50':<52}{np.median(ms):>9.1f} ms")
    print(f"{'frame-to-answer p95':<52}{p95:>9.1f} ms{'≤ 100 ms':>12}")
    print(f"{'frame-to-answer max':<52}{ms.max():>9.1f} ms")
    print(
        f"{'backlog: median of the last second vs the second':<52}{last:>6.1f} vs {first:.1f} ms{'no growth':>12}"
    )
    keeps_up = len(ms) == n * streams and last < first + 50
    rows = [
        results.row(
            f"{what} at {fps:.0f} fps through the gateway: frame-to-answer p95",
            p95,
            "ms",
            target="≤ 100 ms",
            meets_target=p95 <= 100,
            note=f"p50 {np.median(ms):.1f} ms, max {ms.max():.1f} ms; {len(ms)}/{n * streams} answered, "
            f"{run.faces} with a face, {run.hops} engagement updates",
        ),
        results.row(
            f"{what}, backlog: median latency of the last second vs the second",
            last,
            "ms",
            baseline=first,
            target="keeps up (no growth)",
            meets_target=keeps_up,
        ),
    ]
    return rows, keeps_up and p95 <= 100


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument(
        "--streams", type=int, default=2, help="streams at once in the second run (the first has one)"
    )
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository")
    args = p.parse_args()
    n = int(args.seconds * args.fps)
    # A 4-second generated clip, looped: generating every frame would take longer than the run.
    base = [encode_jpeg(f) for f in make_clip(LEVELS, n_frames=min(n, 120), seed=3)]
    frames = [base[i % len(base)] for i in range(n)]
    per_frame = in_process(args.repo, frames[:300])
    rows, ok = [], True
    with (
        tempfile.TemporaryDirectory(prefix="tessera-bench-engagement-") as tmp,
        Suite(Path(tmp), repository=args.repo) as suite,
    ):
        stream(suite.gateway.target, base[:30], args.fps)  # warm-up: sessions, first detections
        for streams in sorted({1, args.streams}):
            run_rows, run_ok = live_rows(
                live(suite.gateway.target, frames, args.fps, streams), streams, n, args.fps
            )
            rows += run_rows
            ok = ok and run_ok
    print(
        f"\n{'engagement pipeline in process, per frame (median)':<52}{per_frame * 1000:>9.1f} ms{'< 33 ms':>12}"
    )
    rows.append(
        results.row(
            "engagement pipeline in process, per frame (median)",
            per_frame * 1000,
            "ms",
            target="< 33 ms",
            meets_target=per_frame * 1000 < 33,
        )
    )
    results.record(
        "bench_engagement",
        rows,
        quick=args.seconds < 20,
        settings=f"{args.seconds:g} s at {args.fps:g} fps; 1 and {args.streams} streams",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
