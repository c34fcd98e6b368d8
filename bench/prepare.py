"""Build, once, what the timed benchmarks cache, so `make bench` does it while the soak runs
instead of inside the timed scripts: the shards of bench_shards.py's default size (under
.cache/bench/) and the timm exports of bench_backends.py, bench_emotion.py and bench_ensemble.py
(under .cache/exports/). Each script still builds whatever is missing itself; this only moves the
work earlier. Nothing here is timed.

    .venv/bin/python bench/prepare.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_backends, bench_emotion, bench_ensemble, bench_shards  # noqa: E402


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-prepare-") as tmp:
        base = Path(tmp)
        bench_backends.export_models(base / "backends", list(bench_backends.ARCHS))
        subprocess.run(
            [sys.executable, "-c", bench_emotion.EXPORT_SCRIPT, str(base / "emotion")], cwd=ROOT, check=True
        )
        subprocess.run(
            [
                sys.executable,
                "-c",
                bench_ensemble.EXPORT_SCRIPT,
                str(base / "ensemble"),
                *(f"{n}={a}" for n, a in bench_ensemble.MEMBERS.items()),
            ],
            cwd=ROOT,
            check=True,
        )
    defaults = {"rows": 300_000, "labelled": 30_000, "dim": 1024}  # bench_shards.py's defaults
    bench_shards.shards(defaults["rows"], defaults["labelled"], defaults["dim"])
    print(f"benchmark caches ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
