"""The emotion ensemble at batch 1 through the gateway vs its members' own ONNX Runtime times
(docs/benchmarks.md#targets: ≤ 1.1 × the sum).

    .venv/bin/python bench/bench_ensemble.py [--iters 20]

The three teachers (resnet18, tf_efficientnet_b3, convnext_tiny at 224 px, random weights — the
speed does not depend on them) are exported into one repository with the student. Each round
times one ensemble request (a 224² face crop flagged as a crop, so no detection) through the
gateway, then one bare `InferenceSession.run` of each member on a preprocessed crop, with the
same ONNX Runtime settings the service uses; the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_emotion import crop_jpeg  # noqa: E402
from bench import results  # noqa: E402
from tessera_client import TesseraClient  # noqa: E402
from launcher.suite import Suite  # noqa: E402
from services.emotion.config import EmotionConfig  # noqa: E402
from services.runtime.backends.onnx import session_options  # noqa: E402
from tessera.gateway.v1 import gateway_service_pb2 as pb  # noqa: E402
from tools.builders.fer_student import build_fer_student  # noqa: E402

MEMBERS = {"emotion_rn18": "resnet18", "emotion_b3": "tf_efficientnet_b3", "emotion_cnxt": "convnext_tiny"}
_EXPORT = """
import sys
from pathlib import Path
from tools.modeller.export.timm_export import DEFAULT_CACHE, export_timm
repo = Path(sys.argv[1])
for pair in sys.argv[2:]:
    name, arch = pair.split("=")
    export_timm(arch, None, 7, name, repo, seed=7, input_size=224, cache_dir=DEFAULT_CACHE)
"""


def member_sessions(repo: Path) -> dict[str, tuple[ort.InferenceSession, np.ndarray]]:
    """Each member's session (the service's ONNX Runtime settings) and its preprocessed crop."""
    import cv2

    from services.vision.preprocess import load_params, preprocess_faces

    crop = cv2.imdecode(np.frombuffer(crop_jpeg(), np.uint8), cv2.IMREAD_COLOR)
    options = session_options(EmotionConfig().onnx)
    out = {}
    for name in MEMBERS:
        params = load_params(repo / name / "1" / "preprocess.json")
        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        out[name] = (session, preprocess_faces([crop], params))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-ensemble-") as tmp:
        repo = Path(tmp) / "repo"
        build_fer_student(repo, ROOT / ".cache")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _EXPORT, str(repo), *(f"{n}={a}" for n, a in MEMBERS.items())],
                       cwd=ROOT, check=True)
        print(f"teachers ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        sessions = member_sessions(repo)
        request = pb.ClassifyEmotionRequest(images=[{"encoded": crop_jpeg(), "is_face_crop": True}],
                                            mode=pb.EMOTION_MODE_ENSEMBLE)
        ensemble: list[float] = []
        members: dict[str, list[float]] = {name: [] for name in MEMBERS}
        with Suite(Path(tmp) / "suite", repository=repo) as suite, TesseraClient(suite.gateway.target) as client:
            for i in range(args.iters + 2):  # two warm-up rounds
                t = time.perf_counter()
                client.stub.ClassifyEmotion(request, timeout=60)
                took = time.perf_counter() - t
                runs = {}
                for name, (session, x) in sessions.items():
                    t = time.perf_counter()
                    session.run(None, {session.get_inputs()[0].name: x})
                    runs[name] = time.perf_counter() - t
                if i >= 2:
                    ensemble.append(took)
                    for name, seconds in runs.items():
                        members[name].append(seconds)
    member_ms = {name: statistics.median(t) * 1e3 for name, t in members.items()}
    per_round = [e / sum(m) for e, m in zip(ensemble, zip(*members.values(), strict=True), strict=True)]
    total, served = sum(member_ms.values()), statistics.median(ensemble) * 1e3
    print(f"\nemotion ensemble, batch 1 (224² crop, no detection), medians of {args.iters} alternating rounds")
    for name, ms in member_ms.items():
        print(f"  {name:<14} ({MEMBERS[name]:<18}) bare session.run {ms:>8.1f} ms")
    print(f"  {'sum of the members':<36}{total:>16.1f} ms")
    print(f"  {'ensemble through the gateway':<36}{served:>16.1f} ms   ratio {served / total:.3f}   target ≤ 1.1")
    q = statistics.quantiles(per_round, n=4)
    print(f"  per-round ratios: median {statistics.median(per_round):.3f}, quartiles {q[0]:.3f}–{q[2]:.3f}")
    results.record("bench_ensemble", [
        results.row("ensemble (resnet18 + tf_efficientnet_b3 + convnext_tiny) at batch 1 through the gateway "
                    "vs the sum of the members' bare session.run", served, "ms", baseline=total,
                    target="≤ 1.1",
                    meets_target=served / total <= 1.1,
                    note=f"per-round median {statistics.median(per_round):.2f}; "
                    + ", ".join(f"{n} {ms:.1f} ms" for n, ms in member_ms.items())),
    ], quick=args.iters < 20, settings=f"medians of {args.iters} alternating rounds")
    return 0 if served / total <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
