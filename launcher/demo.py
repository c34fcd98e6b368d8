"""`make demo`: start the suite, call every public RPC once with sample inputs, print the answers
and their latency, stop. Exits non-zero when an RPC answers with a status it should not."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
from skimage import data as skdata

from client import TesseraClient
from launcher.suite import ROOT, Suite

# Until a service's models and pipeline exist, FAILED_PRECONDITION is its documented answer.
EXPECTED = (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION)


def _sample_shard(root: Path) -> Path:
    """64 generated tulu-like rows with known scores, embedded by the served text embedder."""
    path = root / "demo_shard.parquet"
    if not path.exists():
        from services.proxylabel.embedder import embed_offline
        from tools.proxylabel.generate import write_shard

        embedder = ROOT / "model_repository" / "text_embedder"
        write_shard(path, 64, labelled_fraction=1.0, seed=7, row_group_rows=16, id_prefix="demo",
                    embed=lambda texts: embed_offline(embedder, texts),
                    embedder_name="sentence-transformers/all-MiniLM-L6-v2")
    return path


def _shard_summary(events: list[Any]) -> str:
    summary = events[-1].summary
    e = summary.evaluation
    return (f"{summary.rows_done} rows in {summary.seconds:.2f} s → {summary.output_path}; vs known scores: "
            f"accuracy {e.accuracy:.2f}, macro-F1 {e.macro_f1:.2f}, MAE {e.mean_absolute_error:.2f}")


def _call(name: str, fn: Callable[[], Any], show: Callable[[Any], str]) -> bool:
    start = time.perf_counter()
    try:
        result = fn()
        code, text = grpc.StatusCode.OK, show(result)
    except grpc.RpcError as exc:
        code, text = exc.code(), exc.details()
    ms = (time.perf_counter() - start) * 1000
    print(f"{name:<16} {code.name:<20} {ms:8.1f} ms  {text}")
    return code in EXPECTED


def main() -> int:
    astronaut = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    shard = _sample_shard(ROOT / "data" / "demo")
    out_dir = ROOT / "data" / "demo" / f"labels-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        t0 = time.perf_counter()
        with Suite(Path(tmp)) as suite:
            print(f"suite SERVING in {time.perf_counter() - t0:.1f} s; gateway at {suite.gateway.target}\n")
            with TesseraClient(suite.gateway.target) as client:
                ok = all([
                    _call("GetStatus", client.status, lambda r: "; ".join(
                        f"{s.name}: {', '.join(f'{m.name} v{m.version}' for m in s.models) or 'no models'}"
                        for s in r.services) + f" | rules {r.rules_version}"),
                    _call("ClassifyEmotion", lambda: client.classify_image(astronaut),
                          lambda faces: f"{len(faces)} face(s): " + ", ".join(
                              f"{f.label} p={f.probabilities[f.label]:.3f} at {f.box}" for f in faces)),
                    _call("ClassifyEmotion", lambda: client.classify_image(astronaut, mode="ensemble"),
                          lambda faces: f"ensemble: {len(faces)} face(s)"),
                    _call("ScoreClip", lambda: client.score_clip([astronaut] * 30, fps=30, clip_id="demo"),
                          lambda r: ", ".join(f"affect {a.affect}: level {a.level}" for a in r.affects)),
                    _call("StreamVideo", lambda: list(client.stream_video([astronaut] * 10, fps=30)),
                          lambda r: f"{len(r)} updates"),
                    _call("ScoreTexts", lambda: client.score_texts(
                        [{"id": "a", "text": "How do I sort a list in Python?",
                          "response": "Use sorted(xs) for a new list, or xs.sort() to sort in place; "
                                      "pass key= to sort by a field and reverse=True for descending."}]),
                        lambda r: ", ".join(f"row {row.id}: score {row.label} (p={row.confidence:.2f}, "
                                            f"{row.decided_by})" for row in r.rows)
                        + " | models: " + ", ".join(f"{m.name}{' (demo)' if m.demo else ''}" for m in r.models)),
                    _call("ScoreShard", lambda: list(client.score_shard(shard, out_dir)), _shard_summary),
                ])
        print(f"\nsuite stopped; demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
