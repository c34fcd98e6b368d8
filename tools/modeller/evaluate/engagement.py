"""``engagement``: the served engagement answer on clips with known levels, per affect, for the
fused answer and each model, and the selective-fusion threshold swept.

The clip list is a CSV with a header: ``path`` (a video file, or a folder of frames: its
``.jpg``/``.jpeg``/``.png`` files in name order) and the four levels ``engagement, boredom,
confusion, frustration`` (0 very low … 3 very high), optionally ``fps`` (a folder's frame rate;
default ``--fps``, 30; a video's own rate otherwise), ``source`` and ``split``. Paths are relative to
the CSV's folder.

Each clip is one ``ScoreClip`` through the gateway with ``return_member_outputs``: the fused levels
(the rules' selective fusion, ``decided_by``) and both models' probabilities per affect (the
temporal network and the XGBoost boosters; each model's level is the argmax of its own
probabilities). Answers are cached like the emotion command's. A clip with too few frames with a
face is answered without levels: it is reported (``no_levels``), not scored.

``--sweep-threshold``: per affect, the rules ``[{use: temporal, confidence_above: c}, {use:
xgboost}]`` for every threshold c of the grid (0 is the temporal network alone, 1 XGBoost alone),
applied to the cached outputs with the gateway's own fusion function (``services.fusion.engagement
.decide``, prior correction included): macro-F1 and accuracy per threshold per affect, and the best
threshold of each affect as a rules-file snippet (ties: the one closest to the threshold the rules
have now).

Over 500 lines on purpose: the clip list, the calls, the per-affect metrics, the threshold sweep and
the report are one evaluation; the shared metrics and figures are already modules of their own.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from services.fusion.engagement import decide
from services.fusion.rules import (
    AFFECTS,
    AffectName,
    EngagementRule,
    EngagementRules,
    FusionRules,
    parse_rules,
)
from tessera.common.v1 import common_pb2
from tessera_client.client import TesseraClient, video_frames
from tools.modeller.evaluate import figures
from tools.modeller.evaluate.common import (
    AnswerCache,
    EvaluationError,
    ManifestError,
    Progress,
    Skipped,
    md_table,
    model_versions,
    sha256_file,
    sha256_folder,
    skip_entry,
    skipped_table,
    write_json,
    write_text,
)
from tools.modeller.evaluate.emotion import DEFAULT_RULES, load_rules
from tools.modeller.evaluate.metrics import LabelReport, label_report, macro_f1_of_labels

LEVELS = ("very low", "low", "high", "very high")
LEVEL_SHORT = ("0", "1", "2", "3")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))
# A clip's failure that says nothing about the gateway: that clip is reported, the run goes on.
CLIP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.OUT_OF_RANGE,
}
ANSWERS = ("fused", "temporal", "xgboost")


@dataclass(frozen=True)
class ClipRow:
    line: int
    path: str
    file: Path
    levels: tuple[int, int, int, int]
    fps: float | None = None
    source: str | None = None
    split: str | None = None

    @property
    def key(self) -> str:
        return f"{self.line}:{self.path}"


def read_clips(path: Path) -> list[ClipRow]:
    """Rows of the clip list; ManifestError names the bad line (nothing is sent)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ManifestError(f"{path}: empty file, expected a header with path, {', '.join(AFFECTS)}")
            columns = {n.strip().lower(): n for n in reader.fieldnames if n}
            missing = [c for c in ("path", *AFFECTS) if c not in columns]
            if missing:
                raise ManifestError(
                    f"{path}: missing column(s) {', '.join(repr(m) for m in missing)} "
                    f"(header: {', '.join(reader.fieldnames)})"
                )
            rows = []
            for cells in reader:
                where = f"{path} line {reader.line_num}"

                def cell(name: str, cells: dict[str, str] = cells) -> str:
                    return (cells.get(columns[name]) or "").strip() if name in columns else ""

                raw = cell("path")
                if not raw:
                    raise ManifestError(f"{where}: empty path")
                levels = []
                for affect in AFFECTS:
                    value = cell(affect)
                    if value not in LEVEL_SHORT:
                        raise ManifestError(
                            f"{where}: {affect} level {value!r} for {raw!r}: expected 0, 1, 2 or 3"
                        )
                    levels.append(int(value))
                fps = None
                if cell("fps"):
                    try:
                        fps = float(cell("fps"))
                    except ValueError:
                        fps = -1.0
                    if not (fps > 0 and np.isfinite(fps)):
                        raise ManifestError(f"{where}: fps {cell('fps')!r} is not a positive number")
                engagement, boredom, confusion, frustration = levels  # one per affect, in AFFECTS order
                rows.append(
                    ClipRow(
                        reader.line_num,
                        raw,
                        path.parent / raw,
                        (engagement, boredom, confusion, frustration),
                        fps,
                        cell("source") or None,
                        cell("split") or None,
                    )
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"cannot read clip list {path}: {exc}") from None
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


# Fetching -----------------------------------------------------------------------------------------
def _frames_of_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())


class _Unreadable(Exception):
    """A clip with no frames to send: that clip is reported (the message says why), the run goes on."""


def _clip_frames(row: ClipRow, default_fps: float) -> tuple[str, float, Iterator[Any]]:
    """(sha256, fps, frames): frames are encoded files of a folder or BGR arrays of a video;
    _Unreadable (or OSError) when there are none."""
    f = row.file
    if f.is_dir():
        files = _frames_of_folder(f)
        if not files:
            raise _Unreadable(f"no {', '.join(FRAME_SUFFIXES)} frames in the folder")
        return sha256_folder(f, files), row.fps or default_fps, (p.read_bytes() for p in files)
    if not f.exists():
        raise _Unreadable("no such file or folder")
    try:
        video_fps, frames = video_frames(f)
    except FileNotFoundError:
        raise _Unreadable("not a video OpenCV can read") from None
    fps = row.fps or video_fps or default_fps
    return sha256_file(f), float(fps), frames


def _entry(row: ClipRow, sha: str, fps: float, reply: Any) -> dict[str, Any]:
    base = {
        "row": row.key,
        "sha": sha,
        "line": row.line,
        "path": row.path,
        "fps": fps,
        "frames_received": reply.frames_received,
        "frames_with_face": reply.frames_with_face,
        "rules_version": reply.rules_version,
        "models": {m.name: m.version for m in reply.models},
        "members": {
            o.model: {
                common_pb2.Affect.Name(a.affect).removeprefix("AFFECT_").lower(): list(a.probabilities)
                for a in o.affects
            }
            for o in reply.members
        },
    }
    if not reply.affects:
        return {
            **base,
            "status": "skip",
            "skip_reason": "no_levels",
            "message": f"{reply.frames_with_face} of {reply.frames_received} frames with a face: too few to score",
        }
    return {
        **base,
        "status": "ok",
        "affects": {
            common_pb2.Affect.Name(a.affect).removeprefix("AFFECT_").lower(): {
                "level": a.level,
                "probabilities": list(a.probabilities),
                "decided_by": a.decided_by,
                "confidence": a.confidence,
            }
            for a in reply.affects
        },
    }


@dataclass
class ClipAnswers:
    rows: list[ClipRow] = field(default_factory=list)  # the scored clips
    entries: list[dict[str, Any]] = field(default_factory=list)  # theirs, same order
    skipped: list[Skipped] = field(default_factory=list)
    rules_versions: set[str] = field(default_factory=set)
    models: dict[str, str] = field(default_factory=dict)
    from_cache: int = 0


def collect(
    client: TesseraClient,
    rows: Sequence[ClipRow],
    *,
    cache: AnswerCache,
    default_fps: float,
    rules_version: str | None,
    progress: Progress,
) -> ClipAnswers:
    out = ClipAnswers()
    entries: dict[str, dict[str, Any]] = {}
    for row in rows:
        try:
            sha, fps, frames = _clip_frames(row, default_fps)
        except (_Unreadable, OSError) as exc:
            problem = str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)
            entries[row.key] = skip_entry(row, "", "unreadable", problem)
            progress.update(1, failed=1)
            continue
        hit = cache.get(row.key, sha)
        if hit is not None and (
            hit["status"] == "skip" or rules_version is None or hit.get("rules_version") == rules_version
        ):
            entries[row.key] = hit
            progress.update(1, cached=1, failed=int(hit["status"] != "ok"))
            continue
        try:
            reply = client.score_clip(
                frames, fps=fps, clip_id=Path(row.path).name, return_member_outputs=True
            )
            e = _entry(row, sha, fps, reply)
        except grpc.RpcError as exc:
            if exc.code() not in CLIP_ERRORS:
                raise
            e = skip_entry(row, sha, exc.code().name, exc.details() or "")
        except (OSError, ValueError) as exc:  # a frame file vanished, a video that stops decoding
            e = skip_entry(row, sha, "unreadable", str(exc))
        cache.put([e])
        entries[row.key] = e
        progress.update(1, failed=int(e["status"] != "ok"))
    for row in rows:
        e = entries[row.key]
        if "rules_version" in e:
            out.rules_versions.add(e["rules_version"])
            out.models.update(e.get("models", {}))
        if e["status"] != "ok":
            out.skipped.append(Skipped(row.line, row.path, e["skip_reason"], e["message"]))
        else:
            out.rows.append(row)
            out.entries.append(e)
    out.from_cache = progress.cached
    return out


# Analysis -----------------------------------------------------------------------------------------
def outputs_by_role(entry: dict[str, Any], rules: EngagementRules) -> dict[str, dict[str, np.ndarray]]:
    """role ("temporal" | "xgboost") → affect → four probabilities, as the gateway maps them."""
    roles = {rules.temporal_model: "temporal", rules.xgboost_model: "xgboost"}
    return {
        roles[m]: {a: np.asarray(p, np.float64) for a, p in affects.items()}
        for m, affects in entry["members"].items()
        if m in roles
    }


def decided_levels(outputs: Sequence[dict[str, dict[str, np.ndarray]]], rules: EngagementRules) -> np.ndarray:
    """[clips, 4 affects] levels the rules decide (−1 where no rule held)."""
    out = np.full((len(outputs), len(AFFECTS)), -1, np.int64)
    for i, o in enumerate(outputs):
        for d in decide(o, rules):
            out[i, AFFECTS.index(d.affect)] = d.level
    return out


def with_threshold(rules: EngagementRules, affect: AffectName, threshold: float) -> EngagementRules:
    affects = dict(rules.affects)
    affects[affect] = [
        EngagementRule(use="temporal", confidence_above=threshold),
        EngagementRule(use="xgboost"),
    ]
    return rules.model_copy(update={"affects": affects})


@dataclass
class ThresholdSweep:
    thresholds: list[float]
    # affect → macro-F1 / accuracy per threshold
    macro_f1: dict[str, list[float]]
    accuracy: dict[str, list[float]]
    best: dict[str, float]
    current: dict[str, float | None]  # the rules' threshold now (None: no threshold rule)
    snippet: str

    def macro_f1_at(self, affect: str, threshold: float | None) -> float | None:
        """The affect's macro-F1 at a threshold of the grid; None off the grid (or no threshold)."""
        if threshold is None or threshold not in self.thresholds:
            return None
        return self.macro_f1[affect][self.thresholds.index(threshold)]


def _current_threshold(rules: EngagementRules, affect: AffectName) -> float | None:
    first = rules.affects[affect][0]
    if first.use == "temporal" and first.confidence_above is not None:
        return first.confidence_above
    return None


def sweep_thresholds(
    outputs: Sequence[dict[str, dict[str, np.ndarray]]],
    truth: np.ndarray,
    rules: EngagementRules,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> ThresholdSweep:
    """truth [clips, 4]. Per affect and threshold: the levels decide() gives with that affect's rules
    set to [{temporal, c}, {xgboost}], scored against the truth."""
    f1s: dict[str, list[float]] = {}
    accs: dict[str, list[float]] = {}
    best: dict[str, float] = {}
    current: dict[str, float | None] = {a: _current_threshold(rules, a) for a in AFFECTS}
    for j, affect in enumerate(AFFECTS):
        f1s[affect], accs[affect] = [], []
        for c in thresholds:
            pred = decided_levels(outputs, with_threshold(rules, affect, float(c)))[:, j]
            keep = pred >= 0
            if not keep.any():
                f1s[affect].append(float("nan"))
                accs[affect].append(float("nan"))
                continue
            f1s[affect].append(macro_f1_of_labels(pred[keep], truth[keep, j], len(LEVELS)))
            accs[affect].append(float(np.mean(pred[keep] == truth[keep, j])))
        values = np.nan_to_num(np.asarray(f1s[affect]), nan=-1.0)
        top = np.flatnonzero(values >= values.max() - 1e-12)
        now = current[affect]
        anchor = now if now is not None else 0.0
        best[affect] = float(min((thresholds[i] for i in top.tolist()), key=lambda c: (abs(c - anchor), c)))
    parts = [
        f"    {a}: [{{use: temporal, confidence_above: {best[a]:g}}}, {{use: xgboost}}]" for a in AFFECTS
    ]
    snippet = "engagement:\n  affects:\n" + "\n".join(parts)
    parse_rules(snippet, "the threshold snippet")  # valid rules, by the gateway's schema
    return ThresholdSweep([float(c) for c in thresholds], f1s, accs, best, current, snippet)


@dataclass
class EngagementEvaluation:
    clips_file: str
    gateway: str
    rows: int
    scored: int
    skipped: list[Skipped]
    rules_version: str
    rules_file: str
    rules_file_version: str
    rules_match: bool
    models: dict[str, str]
    # answer ("fused", "temporal", "xgboost") → affect → figures
    metrics: dict[str, dict[str, LabelReport]]
    decided_by: dict[str, dict[str, int]]  # affect → model → clips it decided
    # clips whose served levels differ from decide() on their member outputs with the rules file
    reproduced_mismatches: int
    by_source: dict[str, dict[str, dict[str, LabelReport]]] = field(default_factory=dict)
    sweep: ThresholdSweep | None = None
    from_cache: int = 0
    figures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reports(pred: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, LabelReport]]:
    out: dict[str, dict[str, LabelReport]] = {}
    for answer, levels in pred.items():
        out[answer] = {}
        for j, affect in enumerate(AFFECTS):
            keep = levels[:, j] >= 0
            if keep.any():
                out[answer][affect] = label_report(levels[keep, j], truth[keep, j], LEVELS, ordinal=True)
    return out


def summarise(
    answers: ClipAnswers,
    rows: int,
    rules: FusionRules,
    rules_version: str,
    *,
    clips_file: str,
    gateway: str,
    rules_file: str,
    sweep: Sequence[float] | None = None,
) -> EngagementEvaluation:
    if not answers.rows:
        raise EvaluationError(
            f"no clip of the {rows} could be scored ({dict(Counter(s.reason for s in answers.skipped))})"
        )
    er = rules.engagement
    truth = np.asarray([r.levels for r in answers.rows], np.int64)
    fused = np.asarray(
        [[e["affects"][a]["level"] if a in e["affects"] else -1 for a in AFFECTS] for e in answers.entries],
        np.int64,
    )
    outputs = [outputs_by_role(e, er) for e in answers.entries]
    members = {
        role: np.asarray(
            [
                [int(np.argmax(o[role][a])) if role in o and a in o[role] else -1 for a in AFFECTS]
                for o in outputs
            ],
            np.int64,
        )
        for role in ("temporal", "xgboost")
    }
    pred = {"fused": fused, **members}
    decided_by: dict[str, dict[str, int]] = {
        a: dict(Counter(e["affects"][a]["decided_by"] for e in answers.entries if a in e["affects"]))
        for a in AFFECTS
    }
    reproduced = decided_levels(outputs, er)
    by_source: dict[str, dict[str, dict[str, LabelReport]]] = {}
    sources = [r.source for r in answers.rows]
    if any(s is not None for s in sources):
        values = np.array([s or "(none)" for s in sources], dtype=object)
        for source in sorted(set(values)):
            idx = np.flatnonzero(values == source)
            by_source[str(source)] = _reports({k: v[idx] for k, v in pred.items()}, truth[idx])
    ev = EngagementEvaluation(
        clips_file=clips_file,
        gateway=gateway,
        rows=rows,
        scored=len(answers.rows),
        skipped=answers.skipped,
        rules_version=", ".join(sorted(answers.rules_versions)),
        rules_file=rules_file,
        rules_file_version=rules_version,
        rules_match=answers.rules_versions == {rules_version},
        models=answers.models,
        metrics=_reports(pred, truth),
        decided_by=decided_by,
        reproduced_mismatches=int(np.any(reproduced != fused, axis=1).sum()),
        by_source=by_source,
        sweep=sweep_thresholds(outputs, truth, er, sweep) if sweep is not None else None,
        from_cache=answers.from_cache,
    )
    if not ev.rules_match:
        ev.warnings.append(
            f"the gateway's rules ({ev.rules_version}) are not {rules_file} ({rules_version}): the "
            "threshold sweep starts from the file's rules"
        )
    elif ev.reproduced_mismatches:
        ev.warnings.append(
            f"{ev.reproduced_mismatches} clips' served levels differ from the rules' fusion of their "
            "model outputs"
        )
    if ev.skipped:
        ev.warnings.append(
            f"{len(ev.skipped)} of {rows} clips were not scored: "
            f"{dict(Counter(s.reason for s in ev.skipped))}"
        )
    return ev


def run(
    clips_file: Path,
    target: str,
    *,
    token: str | None = None,
    rules_path: Path = DEFAULT_RULES,
    fps: float = 30.0,
    sweep: Sequence[float] | None = None,
    timeout: float = 120.0,
    progress: bool = False,
    cache_dir: Path | None = None,
    out: Path | None = None,
) -> EngagementEvaluation:
    rows = read_clips(clips_file)
    rules, rules_version = load_rules(rules_path)
    with TesseraClient(target, token=token, timeout=timeout) as client:
        status = client.status()
        key = {
            "clips_sha256": sha256_file(clips_file),
            "fps": fps,
            "models": model_versions(status, "engagement"),
        }
        cache = AnswerCache(cache_dir, "engagement", key)
        with Progress(len(rows), "engagement clips", enabled=progress, every=5.0) as bar:
            answers = collect(
                client, rows, cache=cache, default_fps=fps, rules_version=status.rules_version, progress=bar
            )
    ev = summarise(
        answers,
        len(rows),
        rules,
        rules_version,
        clips_file=str(clips_file),
        gateway=target,
        rules_file=str(rules_path),
        sweep=sweep,
    )
    if out is not None:
        write_outputs(ev, out)
    return ev


# Outputs --------------------------------------------------------------------------------------------
def write_outputs(ev: EngagementEvaluation, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fused = ev.metrics["fused"]
    ev.figures["confusion"] = figures.confusion_grid(
        out / "confusion-engagement.png",
        {a: np.asarray(fused[a].confusion_matrix) for a in fused},
        LEVEL_SHORT,
        f"Fused answer, {ev.scored} clips (rows: true level, columns: predicted)",
    ).name
    panels: dict[str, dict[str, list[int]]] = {}
    for affect in AFFECTS:
        series = {}
        if affect in fused:
            series["true"] = list(fused[affect].support.values())
        for answer in ANSWERS:
            if affect in ev.metrics.get(answer, {}):
                series[answer] = list(ev.metrics[answer][affect].predicted.values())
        panels[affect] = series
    ev.figures["levels"] = figures.distribution_bars(
        out / "levels-engagement.png", panels, LEVEL_SHORT, "True and predicted levels per affect"
    ).name
    if ev.sweep is not None:
        marks = {f"now: {c:g}": c for c in {c for c in ev.sweep.current.values() if c is not None}}
        ev.figures["threshold_sweep"] = figures.sweep_curves(
            out / "threshold-sweep.png",
            ev.sweep.thresholds,
            ev.sweep.macro_f1,
            xlabel="confidence_above (temporal)",
            ylabel="macro-F1",
            title="Selective fusion: temporal when its confidence is above c, else XGBoost",
            marks=marks,
        ).name
    write_json(out / "report.json", ev.to_dict())
    write_text(out / "report.md", format_markdown(ev))


def format_markdown(ev: EngagementEvaluation) -> str:
    lines = [
        f"# Engagement evaluation: `{ev.clips_file}`",
        "",
        f"- clips: {ev.rows}; scored {ev.scored}; not scored {len(ev.skipped)}",
        f"- gateway `{ev.gateway}`; models: " + ", ".join(f"{m} v{v}" for m, v in sorted(ev.models.items())),
        f"- rules: {ev.rules_version}"
        + (f" (= `{ev.rules_file}`)" if ev.rules_match else f" (not `{ev.rules_file}`)"),
        (
            "- each model's level is the argmax of its own probabilities; macro-F1 is over the levels present in "
            "the truth or the predictions; MAE in levels"
        ),
        "",
    ]
    if ev.from_cache:
        lines.insert(-1, f"- {ev.from_cache} answers from the cache")
    head = ("affect", "answer", "n", "accuracy", "macro-F1", "MAE")
    rows = []
    for affect in AFFECTS:
        for answer in ANSWERS:
            r = ev.metrics.get(answer, {}).get(affect)
            if r is not None:
                rows.append([affect, answer, r.n, r.accuracy, r.macro_f1, r.mae])
    lines += ["## Table 1. Per affect", "", md_table(head, rows, "llrrrr"), ""]
    lines += [
        "## Table 2. Which model decided (fused answer)",
        "",
        md_table(
            ("affect", "decided by"),
            [[a, ", ".join(f"{m} {n}" for m, n in sorted(d.items()))] for a, d in ev.decided_by.items()],
            "ll",
        ),
        "",
    ]
    dist = []
    for affect in AFFECTS:
        fused = ev.metrics["fused"].get(affect)
        if fused is None:
            continue
        dist.append([affect, "true", *fused.support.values()])
        for answer in ANSWERS:
            r = ev.metrics.get(answer, {}).get(affect)
            if r is not None:
                dist.append([affect, answer, *r.predicted.values()])
    lines += [
        "## Table 3. Level distribution: true and predicted (clips per level)",
        "",
        md_table(("affect", "", *LEVELS), dist, "llrrrr"),
        "",
    ]
    n = 4
    if ev.by_source:
        srows = []
        for source, table in ev.by_source.items():
            for affect in AFFECTS:
                for answer in ANSWERS:
                    r = table.get(answer, {}).get(affect)
                    if r is not None:
                        srows.append([source, affect, answer, r.n, r.accuracy, r.macro_f1, r.mae])
        lines += [f"## Table {n}. By source", "", md_table(("source", *head), srows, "lllrrrr"), ""]
        n += 1
    lines += [f"## Table {n}. Confusion matrices of the fused answer (rows: true, columns: predicted)", ""]
    for fused_affect, r in ev.metrics["fused"].items():
        lines += [
            f"**{fused_affect}**",
            "",
            md_table(
                ("true \\ predicted", *LEVEL_SHORT),
                [[LEVEL_SHORT[i], *row] for i, row in enumerate(r.confusion_matrix)],
                "lrrrr",
            ),
            "",
        ]
    if ev.sweep is not None:
        s = ev.sweep
        n += 1
        head2 = ("confidence_above", *[f"{a} macro-F1" for a in AFFECTS])
        rows2 = [[f"{c:g}", *[s.macro_f1[a][i] for a in AFFECTS]] for i, c in enumerate(s.thresholds)]
        lines += [
            f"## Table {n}. Selective-fusion threshold sweep",
            "",
            (
                "temporal when its confidence for the affect is above c, else XGBoost (c = 0: temporal alone, "
                "c = 1: XGBoost alone)"
            ),
            "",
            md_table(head2, rows2),
            "",
            md_table(
                ("affect", "threshold now", "best", "macro-F1 now", "macro-F1 best"),
                [
                    [
                        a,
                        f"{s.current[a]:g}" if s.current[a] is not None else None,
                        f"{s.best[a]:g}",
                        s.macro_f1_at(a, s.current[a]),
                        s.macro_f1[a][s.thresholds.index(s.best[a])],
                    ]
                    for a in AFFECTS
                ],
                "lrrrr",
            ),
            "",
            "The rules that serve the best thresholds:",
            "",
            "```yaml",
            s.snippet,
            "```",
            "",
        ]
    if ev.figures:
        lines += ["## Figures", ""]
        for kind, name in ev.figures.items():
            lines += [f"- {kind}: `{name}`", "", f"  ![{kind}]({name})", ""]
    if ev.skipped:
        lines += [f"## Not scored ({len(ev.skipped)})", "", skipped_table(ev.skipped), ""]
    if ev.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in ev.warnings]
    return "\n".join(lines) + "\n"


def parse_thresholds(text: str) -> list[float]:
    """``start:stop:step`` (stop included) or a comma-separated list, each in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(np.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 6) for i in range(n)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ManifestError(
            f"thresholds {text!r}: expected start:stop:step or a comma-separated list"
        ) from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ManifestError(f"thresholds {text!r}: every threshold must be in [0, 1]")
    return values


__all__ = [
    "ClipRow",
    "EngagementEvaluation",
    "ThresholdSweep",
    "collect",
    "decided_levels",
    "parse_thresholds",
    "read_clips",
    "run",
    "summarise",
    "sweep_thresholds",
    "with_threshold",
]
