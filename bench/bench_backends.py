"""OnnxBackend.infer vs a bare onnxruntime InferenceSession.run, same model, input and threads.

    .venv/bin/python bench/bench_backends.py [--quick] [--archs resnet18 ...] [--batches 1 16]

The models are the four teacher/student architectures, seeded random init, exported by
`tools.modeller.export` in a subprocess (torch never loads in this process, so its threads cannot disturb
the timings) and cached under .cache/exports. Both sides use the backend's own session options
(intra_op 2, no spinning). Calls alternate between the two sides so drift on a shared machine
hits both alike; the table gives medians and their ratio (docs/benchmarks.md#targets: ratios within one run).

Two backend columns: the model as exported (its config's max_queue_delay applies when a request
is not a preferred batch size, as at batch 1), and the same model with the delay set to 0, which
isolates the backend's own cost (validation, batcher hop, executor thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402
from services.runtime.backends.onnx import CPU, OnnxBackend, OnnxConfig, session_options  # noqa: E402
from services.runtime.metrics import Metrics  # noqa: E402
from services.runtime.model_files import write_config  # noqa: E402
from services.runtime.repository import ModelRepository  # noqa: E402

ARCHS = ("resnet18", "tf_efficientnet_b3", "convnext_tiny", "mobilenetv3_large_100")
SEED = 1234
INPUT_SIZE = 224

_EXPORT = """
import sys
from pathlib import Path
from tools.modeller.export.timm_export import DEFAULT_CACHE, export_timm
base = Path(sys.argv[1])
for arch in sys.argv[2:]:
    export_timm(arch, None, 7, arch, base / arch, seed={seed}, input_size={size},
                cache_dir=DEFAULT_CACHE)
"""


def export_models(base: Path, archs: list[str]) -> None:
    """Export (or copy from the cache) each architecture into its own repository ``base/<arch>``,
    in a torch subprocess; one repository per model so the backend loads only what is measured."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _EXPORT.format(seed=SEED, size=INPUT_SIZE), str(base), *archs],
        cwd=ROOT,
        check=True,
    )
    print(f"models ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def add_nodelay_copy(repo: Path, arch: str) -> str:
    """The same ONNX file under another name whose config sets max_queue_delay to 0."""
    name = f"{arch}_nodelay"
    (repo / name / "1").mkdir(parents=True)
    os.link(repo / arch / "1" / "model.onnx", repo / name / "1" / "model.onnx")
    exported = ModelRepository(repo).get(arch).config
    assert exported is not None, f"{arch} has no readable config"
    config = mc.ModelConfig()
    config.CopyFrom(exported)
    config.name = name
    config.dynamic_batching.max_queue_delay_microseconds = 0
    write_config(repo / name, config)
    return name


async def measure(
    repo: Path, arch: str, batch: int, iters: int, warmup: int, config: OnnxConfig
) -> tuple[float, float, float]:
    """Median seconds of (plain session.run, backend as exported, backend without queue delay)."""
    nodelay = f"{arch}_nodelay"
    session = ort.InferenceSession(
        str(repo / arch / "1" / "model.onnx"), sess_options=session_options(config), providers=[CPU]
    )
    backend = OnnxBackend(ModelRepository(repo), config, Metrics("bench"))
    await backend.start()
    x = np.random.default_rng(0).standard_normal((batch, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    plain, served, bare = [], [], []
    try:
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            session.run(["logits"], {"input": x})
            t1 = time.perf_counter()
            await backend.infer(arch, {"input": x})
            t2 = time.perf_counter()
            await backend.infer(nodelay, {"input": x})
            t3 = time.perf_counter()
            if i >= warmup:
                plain.append(t1 - t0)
                served.append(t2 - t1)
                bare.append(t3 - t2)
    finally:
        await backend.close()
    return statistics.median(plain), statistics.median(served), statistics.median(bare)


async def run(args: argparse.Namespace) -> None:
    config = OnnxConfig(intra_op_threads=2, allow_spinning=False)
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        base = Path(tmp)
        export_models(base, args.archs)
        for arch in args.archs:
            add_nodelay_copy(base / arch, arch)
        header = (
            f"{'model':<24}{'batch':>6}{'ort run ms':>12}{'backend ms':>12}{'ratio':>8}"
            f"{'no-delay ms':>13}{'ratio':>8}"
        )
        print(
            f"ONNX Runtime {ort.__version__}, intra_op {config.intra_op_threads}, spinning off, "
            f"{os.cpu_count()} cores, medians of {args.iters} alternating calls"
        )
        print(header)
        print("-" * len(header))
        rows = []
        for arch in args.archs:
            for batch in args.batches:
                iters = max(3, args.iters // 4) if batch >= 16 else args.iters
                plain, served, bare = await measure(base / arch, arch, batch, iters, args.warmup, config)
                print(
                    f"{arch:<24}{batch:>6}{plain * 1e3:>12.2f}{served * 1e3:>12.2f}"
                    f"{served / plain:>8.3f}{bare * 1e3:>13.2f}{bare / plain:>8.3f}",
                    flush=True,
                )
                rows += [
                    results.row(
                        f"{arch}, batch {batch}: backend as exported vs bare session.run",
                        served * 1e3,
                        "ms",
                        baseline=plain * 1e3,
                    ),
                    results.row(
                        f"{arch}, batch {batch}: backend without queue delay vs bare session.run",
                        bare * 1e3,
                        "ms",
                        baseline=plain * 1e3,
                    ),
                ]
        results.record(
            "bench_backends",
            rows,
            quick=args.quick,
            settings=f"medians of {args.iters} alternating calls, intra_op {config.intra_op_threads}",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke run)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    args = parser.parse_args(argv)
    args.iters, args.warmup = (8, 2) if args.quick else (40, 5)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
