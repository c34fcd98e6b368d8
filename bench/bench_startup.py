"""Start-up: from launching the suite on the default models to every health SERVING
(docs/benchmarks.md#targets).

    .venv/bin/python bench/bench_startup.py [--rounds 5]

Each round starts the whole suite as `make serve` and `make demo` do (launcher.suite: the three
services at once, then the gateway on their ports) and times it until every process answers
SERVING; each process's own moment (its ready file) is kept too, so the slowest one is named.
Baseline, measured in the same rounds: a bare Python process that imports grpc, starts a grpc.aio
server with the health service and reports ready — what any process of the suite costs before it
imports or loads anything of its own. Target: the suite ready ≤ 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402
from launcher.suite import SERVICES, Suite  # noqa: E402

_BARE_SERVER = """
import asyncio, grpc
from grpc_health.v1 import health, health_pb2_grpc

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print("ready", flush=True)
    await server.stop(None)

asyncio.run(main())
"""


def bare_process() -> float:
    """Seconds from spawning a bare grpc.aio server process to its "ready" line."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _BARE_SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the bare grpc.aio server did not start")
    elapsed = time.perf_counter() - start
    proc.wait(timeout=30)
    return elapsed


def suite_start(work: Path) -> tuple[float, dict[str, float]]:
    """Seconds to every health SERVING, and each process's ready file's moment since the start."""
    launched = time.time()
    start = time.perf_counter()
    suite = Suite(work).start()
    try:
        total = time.perf_counter() - start
        ready = {n: p.ready_file.stat().st_mtime - launched for n, p in suite.processes.items()}
    finally:
        suite.stop()
    return total, ready


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    totals, bare = [], []
    ready: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        suite_start(Path(tmp) / "warm-up")  # the page cache holds the models and libraries after it
        for i in range(args.rounds):
            bare.append(bare_process())
            total, each = suite_start(Path(tmp) / f"round-{i}")
            totals.append(total)
            for name, seconds in each.items():
                ready.setdefault(name, []).append(seconds)
    median, floor = statistics.median(totals), statistics.median(bare)
    per_process = {name: statistics.median(v) for name, v in ready.items()}
    slowest = max(SERVICES, key=lambda n: per_process[n])
    print(f"\nstart-up of the suite on the default models, {args.rounds} rounds (median seconds)")
    print(f"{'measure':<52}{'value':>10}{'target':>10}")
    print(f"{'suite ready (every health SERVING)':<52}{median:>9.2f}s{'≤ 5 s':>10}")
    for name, seconds in per_process.items():
        print(f"{'  ' + name + ' ready file written':<52}{seconds:>9.2f}s")
    print(f"{'bare grpc.aio server process ready (baseline)':<52}{floor:>9.2f}s")
    results.record(
        "bench_startup",
        [
            results.row(
                "suite on the default models: launched to every health SERVING (median)",
                median,
                "s",
                baseline=floor,
                target="≤ 5 s",
                meets_target=median <= 5.0,
                note=f"rounds {', '.join(f'{t:.2f}' for t in totals)}; slowest service {slowest}; "
                + ", ".join(f"{n} {s:.2f}" for n, s in per_process.items())
                + "; baseline: a bare grpc.aio server process",
            )
        ],
        settings=f"{args.rounds} rounds",
    )
    return 0 if median <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
