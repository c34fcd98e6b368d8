"""Recovery after a service restart: how long after a restarted service is ready does the gateway
serve it again (docs/benchmarks.md)?

    .venv/bin/python bench/bench_recovery.py [--rounds 5]

Each round kills the emotion service (SIGKILL), starts it again on its port, and times
(a) the restarted process from start to health SERVING, and (b) the gateway from that moment to
its first OK `ClassifyEmotion`: (b) is what the gateway adds to a restart (its channel's
reconnect backoff). Printed: medians, and (b) beside the service's own start-up (a).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skimage import data as skdata  # noqa: E402

from bench import results  # noqa: E402
from launcher.suite import Suite  # noqa: E402
from tessera_client import TesseraClient  # noqa: E402


def first_ok(client: TesseraClient, photo: bytes, limit: float = 60.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        try:
            client.classify_image(photo, timeout=5)
            return time.perf_counter() - start
        except grpc.RpcError:
            time.sleep(0.01)
    raise SystemExit("the gateway did not serve the restarted service within a minute")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    photo = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    ready, reconnect = [], []
    with (
        Suite(Path(tempfile.mkdtemp(prefix="bench-recovery-"))) as suite,
        TesseraClient(suite.gateway.target, timeout=30) as client,
    ):
        client.classify_image(photo)
        for _ in range(args.rounds):
            suite.kill("emotion")
            start = time.perf_counter()
            suite.restart("emotion")
            ready.append(time.perf_counter() - start)
            reconnect.append(first_ok(client, photo))
    print(f"emotion restart → SERVING: median {statistics.median(ready):.2f} s over {args.rounds} rounds")
    print(
        f"then the gateway's first OK: median {statistics.median(reconnect) * 1e3:.0f} ms "
        f"(max {max(reconnect) * 1e3:.0f} ms); ratio to the service's own start-up "
        f"{statistics.median(reconnect) / statistics.median(ready):.2f}"
    )
    results.record(
        "bench_recovery",
        [
            results.row(
                "emotion killed and restarted: the gateway's first OK after SERVING vs the service's "
                "own start-up",
                statistics.median(reconnect) * 1e3,
                "ms",
                baseline=statistics.median(ready) * 1e3,
                note=f"medians of {args.rounds} rounds, max {max(reconnect) * 1e3:.0f} ms",
            ),
        ],
        quick=args.rounds < 5,
        settings=f"{args.rounds} rounds",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
