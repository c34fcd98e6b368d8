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
import numpy as np
from skimage import data as skdata

from launcher.suite import ROOT, Suite
from services.fusion.rules import AFFECTS
from tessera_client import TesseraClient
from tools.modeller.engagement.generate import encode_jpeg, make_clip

DEMO_LEVELS = {"engagement": 3, "boredom": 0, "confusion": 2, "frustration": 1}
AFFECT_NAMES = dict(enumerate(("unspecified", *AFFECTS)))

EXPECTED = (grpc.StatusCode.OK,)
# The research ensemble's timm teachers are not in the default repository: FAILED_PRECONDITION
# naming them is its documented answer.
EXPECTED_RESEARCH = (grpc.StatusCode.FAILED_PRECONDITION,)
# The LFW face shown when matplotlib (and its grace_hopper.jpg) is not installed: one whose three
# pretrained members agree (Neutral), upscaled from 25 px.
LFW_FALLBACK = 15


def _sample_shard(root: Path) -> Path:
    """64 generated tulu-like rows with known scores, embedded by the served text embedder."""
    path = root / "demo_shard.parquet"
    if not path.exists():
        from services.proxylabel.embedder import embed_offline
        from tools.modeller.proxylabel.generate import write_shard

        embedder = ROOT / "model_repository" / "text_embedder"
        write_shard(
            path,
            64,
            labelled_fraction=1.0,
            seed=7,
            row_group_rows=16,
            id_prefix="demo",
            embed=lambda texts: embed_offline(embedder, texts),
            embedder_name="sentence-transformers/all-MiniLM-L6-v2",
        )
    return path


def _shard_summary(events: list[Any]) -> str:
    summary = events[-1].summary
    e = summary.evaluation
    return (
        f"{summary.rows_done} rows in {summary.seconds:.2f} s → {summary.output_path}; vs known scores: "
        f"accuracy {e.accuracy:.2f}, macro-F1 {e.macro_f1:.2f}, MAE {e.mean_absolute_error:.2f}"
    )


def _levels(levels: Any) -> str:
    return ", ".join(
        f"{AFFECT_NAMES[a.affect]} {a.level} ({a.decided_by.removeprefix('engagement_')})" for a in levels
    )


def _clip_summary(reply: Any) -> str:
    return (
        f"{reply.frames_with_face}/{reply.frames_received} frames with a face; {_levels(reply.affects)} "
        f"| generated with {', '.join(f'{a} {v}' for a, v in DEMO_LEVELS.items())}"
    )


def _stream_summary(replies: list[Any]) -> str:
    hops = [r for r in replies if r.engagement]
    emotions = [r.faces[0].label for r in replies if r.faces]
    last = _levels(hops[-1].engagement) if hops else "no hop yet"
    return (
        f"{len(replies)} frames answered, {len(emotions)} with a face ({max(set(emotions), key=emotions.count) if emotions else '-'} "
        f"most often); {len(hops)} engagement updates, last: {last}"
    )


def second_face() -> tuple[str, bytes, bool]:
    """(name, encoded image, is a face crop): matplotlib's grace_hopper.jpg when matplotlib is
    installed, else a face of skimage's LFW subset."""
    try:
        from matplotlib import cbook

        return (
            "grace_hopper",
            Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes(),
            False,
        )
    except (ImportError, OSError, ValueError):
        gray = skdata.lfw_subset()[LFW_FALLBACK]
        gray = np.clip(np.round(gray * 255.0), 0, 255).astype(np.uint8)
        big = cv2.resize(gray, (96, 96), interpolation=cv2.INTER_CUBIC)
        return f"lfw_subset[{LFW_FALLBACK}]", cv2.imencode(".png", big)[1].tobytes(), True


def _ensemble_summary(name: str) -> Callable[[Any], str]:
    def show(reply: Any) -> str:
        faces = reply.images[0].faces
        parts = []
        for f in faces:
            votes = ", ".join(
                f"{m.model.removeprefix('emotion_')} {reply.class_names[int(np.argmax(m.logits))]}"
                for m in f.members
            )
            parts.append(f"{f.label} p={max(f.probabilities):.3f} (members: {votes})")
        models = "+".join(m.name.removeprefix("emotion_") for m in reply.models)
        return f"{name}, ensemble {models}: {len(faces)} face(s): " + "; ".join(parts)

    return show


def _call(
    name: str,
    fn: Callable[[], Any],
    show: Callable[[Any], str],
    expected: tuple[grpc.StatusCode, ...] = EXPECTED,
) -> bool:
    start = time.perf_counter()
    try:
        result = fn()
        code, text = grpc.StatusCode.OK, show(result)
    except grpc.RpcError as exc:
        code, text = exc.code(), exc.details() or ""
    ms = (time.perf_counter() - start) * 1000
    print(f"{name:<16} {code.name:<20} {ms:8.1f} ms  {text}")
    return code in expected


def main() -> int:
    astronaut = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    other_name, other, other_crop = second_face()
    shard = _sample_shard(ROOT / "data" / "demo")
    # Two seconds of a generated webcam clip whose levels are known (the demo models were trained
    # on such clips): engagement very high, boredom very low, confusion high, frustration low.
    clip = [encode_jpeg(f) for f in make_clip(DEMO_LEVELS, n_frames=60, seed=1)]
    out_dir = ROOT / "data" / "demo" / f"labels-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        t0 = time.perf_counter()
        with Suite(Path(tmp)) as suite:
            print(f"suite SERVING in {time.perf_counter() - t0:.1f} s; gateway at {suite.gateway.target}\n")
            with TesseraClient(suite.gateway.target) as client:
                ok = all(
                    [
                        _call(
                            "GetStatus",
                            client.status,
                            lambda r: (
                                "; ".join(
                                    f"{s.name}: {', '.join(f'{m.name} v{m.version}' for m in s.models) or 'no models'}"
                                    for s in r.services
                                )
                                + f" | rules {r.rules_version}"
                            ),
                        ),
                        _call(
                            "ClassifyEmotion",
                            lambda: client.classify_image(astronaut),
                            lambda faces: (
                                f"{len(faces)} face(s): "
                                + ", ".join(
                                    f"{f.label} p={f.probabilities[f.label]:.3f} at {f.box}" for f in faces
                                )
                            ),
                        ),
                        _call(
                            "ClassifyEmotion",
                            lambda: client.classify([astronaut], mode="ensemble", return_member_logits=True),
                            _ensemble_summary("astronaut"),
                        ),
                        _call(
                            "ClassifyEmotion",
                            lambda: client.classify(
                                [other], mode="ensemble", face_crop=other_crop, return_member_logits=True
                            ),
                            _ensemble_summary(other_name),
                        ),
                        _call(
                            "ClassifyEmotion",
                            lambda: client.classify([astronaut], ensemble="research"),
                            lambda r: "research ensemble answered",
                            EXPECTED_RESEARCH,
                        ),
                        _call(
                            "ScoreClip",
                            lambda: client.score_clip(clip, fps=30, clip_id="demo"),
                            _clip_summary,
                        ),
                        _call(
                            "StreamVideo", lambda: list(client.stream_video(clip, fps=30)), _stream_summary
                        ),
                        _call(
                            "ScoreTexts",
                            lambda: client.score_texts(
                                [
                                    {
                                        "id": "a",
                                        "text": "How do I sort a list in Python?",
                                        "response": "Use sorted(xs) for a new list, or xs.sort() to sort in place; "
                                        "pass key= to sort by a field and reverse=True for descending.",
                                    }
                                ]
                            ),
                            lambda r: (
                                ", ".join(
                                    f"row {row.id}: score {row.label} (p={row.confidence:.2f}, "
                                    f"{row.decided_by})"
                                    for row in r.rows
                                )
                                + " | models: "
                                + ", ".join(f"{m.name}{' (demo)' if m.demo else ''}" for m in r.models)
                            ),
                        ),
                        _call("ScoreShard", lambda: list(client.score_shard(shard, out_dir)), _shard_summary),
                    ]
                )
        print(f"\nsuite stopped; demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
