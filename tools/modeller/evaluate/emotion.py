"""Evaluate the served emotion answer on a labelled manifest: the fused answer and each ensemble
member, overall and per source, with a fitted temperature, a markdown report and figures.

The manifest is a CSV with a header: ``path`` and ``label`` (a class name of the canonical seven,
any case, or an index 0-6), optionally ``x, y, w, h`` (the face box in the image: detection is
skipped; leave all four empty on a row for no box), ``split`` (see ``--split``) and ``source``
(FER2013, RAF-DB, AffectNet …: the report has a table per source). Paths are relative to the
manifest's directory.

**Rows without a box** are sent as ``faces`` says:

- ``detect`` (the default): the whole image, and the served face detector finds the face. A row
  whose image has no face, or several, is reported (``no_face``, ``several_faces``) and not scored;
- ``crop``: the image is already a face crop (``is_face_crop``), as the research's manifests are.

Everything goes through the gateway, so the figures are those of the served answer: its mode, its
ensemble, its fusion rules, its temperature. The members' raw logits come back with each face
(``return_member_logits``) and are cached (``common.AnswerCache``), so a refit costs no serving.
Each member's figures are of softmax(its raw logits) (T = 1); the temperature is fitted on their
fusion by the rules' weights, and the report prints the rules-file lines that serve it.

Over 500 lines on purpose (the largest evaluation): the manifest, the calls to the served models,
the per-member and per-source metrics, the temperature fit and the report are one evaluation that a
modeller reads in order; shared metrics, figures, weights and soft labels are modules of their own.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from services.fusion.emotion import (
    CLASS_NAMES,
    fuse_logits,
    fused_logits,
    fusion_space_for,
    members_for,
    resolve_temperature,
)
from services.fusion.numeric import softmax
from services.fusion.rules import (
    EmotionModeName,
    EmotionRules,
    FusionRules,
    RulesError,
    UnknownEnsemble,
    parse_rules,
)
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera_client.client import TesseraClient, status_code, to_image
from tools.modeller.evaluate import figures
from tools.modeller.evaluate.common import (
    AnswerCache,
    EvaluationError,
    ManifestError,
    Progress,
    Skipped,
    chunks,
    fmt,
    md_table,
    model_versions,
    sha256_file,
    skip_entry,
    skipped_table,
    write_json,
    write_text,
)
from tools.modeller.evaluate.metrics import (
    ECE_BINS,
    TEMPERATURE_BOUNDS,
    EvaluationReport,
    evaluate,
    fit_temperature,
    minimise_temperature,
    nll,
)

__all__ = [
    "Answers",
    "EmotionEvaluation",
    "EvaluationError",
    "ManifestError",
    "ManifestRow",
    "Skipped",
    "collect",
    "default_rules_path",
    "format_report",
    "load_rules",
    "parse_label",
    "read_manifest",
    "run",
    "summarise",
]

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RULES = ROOT / "config" / "fusion_rules.yaml"
BOX_COLUMNS = ("x", "y", "w", "h")
SKIPPED_SHOWN = 10
FACES = ("detect", "crop")


# Manifest ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestRow:
    line: int  # in the file, header = 1: what an editor shows
    path: str  # as written, for messages
    file: Path  # resolved against the manifest's directory
    label: int  # canonical class index
    box: tuple[int, int, int, int] | None
    source: str | None = None
    split: str | None = None

    @property
    def key(self) -> str:
        return f"{self.line}:{self.path}"


def parse_label(text: str) -> int | None:
    """Canonical class index of a name (any case) or an index 0-6; None when it is neither."""
    value = text.strip()
    names = [c.lower() for c in CLASS_NAMES]
    if value.lower() in names:
        return names.index(value.lower())
    if value.isdigit() and int(value) < len(CLASS_NAMES):
        return int(value)
    return None


def _box(cells: Sequence[str], where: str) -> tuple[int, int, int, int] | None:
    filled = [c.strip() for c in cells]
    if not any(filled):
        return None
    if not all(filled):
        raise ManifestError(f"{where}: a face box needs all of x, y, w, h (or none), got {cells}")
    try:
        values = [float(c) for c in filled]
    except ValueError:
        raise ManifestError(f"{where}: face box {cells} is not numeric") from None
    if not all(math.isfinite(v) for v in values):
        raise ManifestError(f"{where}: face box {cells} is not finite")
    x, y, w, h = (round(v) for v in values)
    if w <= 0 or h <= 0:
        raise ManifestError(f"{where}: face box {cells} has an empty size")
    return x, y, w, h


def _columns(fieldnames: Sequence[str] | None, source: Path) -> dict[str, str]:
    """Lower-cased column name → header cell; checks the needed ones are there."""
    if not fieldnames:
        raise ManifestError(f"{source}: empty file, expected a header with 'path' and 'label'")
    columns = {name.strip().lower(): name for name in fieldnames if name}
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise ManifestError(
            f"{source}: missing column(s) {', '.join(repr(m) for m in missing)} "
            f"(header: {', '.join(fieldnames)})"
        )
    boxes = [c for c in BOX_COLUMNS if c in columns]
    if boxes and len(boxes) != len(BOX_COLUMNS):
        raise ManifestError(
            f"{source}: face box columns need all of x, y, w, h, found only {', '.join(boxes)}"
        )
    return columns


def read_manifest(path: Path, split: str | None = None) -> list[ManifestRow]:
    """Rows of a manifest (only those of ``split`` when given); ManifestError names the bad line."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            columns = _columns(reader.fieldnames, path)
            if split is not None and "split" not in columns:
                raise ManifestError(f"{path}: --split needs a 'split' column")
            rows = list(_rows(reader, columns, path, split))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    if not rows:
        raise ManifestError(f"{path}: no rows" + (f" with split {split!r}" if split is not None else ""))
    return rows


def _rows(
    reader: csv.DictReader, columns: dict[str, str], source: Path, split: str | None
) -> Iterator[ManifestRow]:
    base = source.parent
    has_box = "x" in columns

    def cell(cells: dict[str, str], name: str) -> str | None:
        value = (cells.get(columns[name]) or "").strip() if name in columns else ""
        return value or None

    for cells in reader:
        line = reader.line_num
        where = f"{source} line {line}"
        row_split = cell(cells, "split")
        if split is not None and row_split != split:
            continue
        raw_path = (cells.get(columns["path"]) or "").strip()
        if not raw_path:
            raise ManifestError(f"{where}: empty path")
        raw_label = cells.get(columns["label"]) or ""
        label = parse_label(raw_label)
        if label is None:
            raise ManifestError(
                f"{where}: unknown label {raw_label!r} for {raw_path!r}; expected one of "
                f"{', '.join(CLASS_NAMES)} (any case) or an index 0-{len(CLASS_NAMES) - 1}"
            )
        box = _box([cells.get(columns[c]) or "" for c in BOX_COLUMNS], where) if has_box else None
        yield ManifestRow(line, raw_path, base / raw_path, label, box, cell(cells, "source"), row_split)


# Gateway -------------------------------------------------------------------------------------
@dataclass
class Answers:
    """What the gateway said about the scored images, in manifest order."""

    labels: list[int] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    members: dict[str, list[list[float]]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    modes: set[str] = field(default_factory=set)
    rules_versions: set[str] = field(default_factory=set)
    models: dict[str, common_pb2.ModelInfo] = field(default_factory=dict)
    # Per scored image (same order as labels); empty when unknown.
    rows: list[ManifestRow] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    # Every row of the manifest, scored or not: its cache entry (what export-softlabels writes).
    records: list[dict[str, Any]] = field(default_factory=list)
    ensemble: str | None = None  # the ensemble of ensemble mode, by name
    faces: str = "crop"
    from_cache: int = 0

    @property
    def sources(self) -> list[str | None]:
        return [r.source for r in self.rows]


def _image(row: ManifestRow, data: bytes, faces: str) -> common_pb2.Image:
    if row.box is not None:
        return to_image(data, boxes=[row.box])
    return to_image(data, face_crop=faces == "crop")


def _classify(
    client: TesseraClient,
    images: list[common_pb2.Image],
    mode: str | None,
    ensemble: str | None,
) -> list[tuple[pb.ClassifyEmotionResponse, int] | grpc.RpcError]:
    """(reply, index in reply) per image. A batch over the gateway's limits (count or bytes) is
    halved until it fits; an image too large on its own is that image's failure, not the run's."""
    try:
        reply = client.classify(images, mode=mode, return_member_logits=True, ensemble=ensemble)
        return [(reply, i) for i in range(len(images))]
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        if len(images) == 1:
            return [exc]
    half = len(images) // 2
    return _classify(client, images[:half], mode, ensemble) + _classify(client, images[half:], mode, ensemble)


def _entry(
    row: ManifestRow, sha: str, reply: pb.ClassifyEmotionResponse, index: int, faces: str
) -> dict[str, Any]:
    image = reply.images[index]
    mode = pb.EmotionMode.Name(reply.mode).removeprefix("EMOTION_MODE_").lower()
    base = {
        "mode": mode,
        "rules_version": reply.rules_version,
        "class_names": list(reply.class_names),
        "models": {m.name: m.version for m in reply.models},
    }
    if image.status.code != 0:
        return {**skip_entry(row, sha, status_code(image.status.code).name, image.status.message), **base}
    if len(image.faces) != 1:
        boxes = [(f.box.x, f.box.y, f.box.width, f.box.height) for f in image.faces]
        reason = "no_face" if not image.faces else "several_faces"
        if row.box is None and faces == "detect":
            message = "no face detected" if not boxes else f"{len(boxes)} faces detected at {boxes}"
        else:  # a crop or a given box is one face: anything else means the image was not what we sent
            message = f"{len(image.faces)} faces, expected 1"
        return {**skip_entry(row, sha, reason, message), **base}
    face = image.faces[0]
    return {
        "row": row.key,
        "sha": sha,
        "line": row.line,
        "path": row.path,
        "status": "ok",
        **base,
        "probabilities": list(face.probabilities),
        "label": face.label,
        "box": [face.box.x, face.box.y, face.box.width, face.box.height],
        "members": {m.model: list(m.logits) for m in face.members},
    }


def collect(
    client: TesseraClient,
    rows: Sequence[ManifestRow],
    mode: str | None,
    batch: int,
    progress: Callable[..., None] = lambda n, **kw: None,
    *,
    ensemble: str | None = None,
    faces: str = "crop",
    cache: AnswerCache | None = None,
    rules_version: str | None = None,
    need_served: bool = True,
) -> Answers:
    """Ask the gateway about every row not in the cache, batch by batch; grpc.RpcError when a whole
    request fails. A cached answer counts when it was made from the same file, and (need_served)
    under the gateway's current rules version, since its fused probabilities depend on them."""
    cache = cache or AnswerCache(None, "emotion", {})
    entries: dict[str, dict[str, Any]] = {}
    for chunk in chunks(rows, batch):
        asked: list[tuple[ManifestRow, str, common_pb2.Image]] = []
        cached = failed = 0
        for row in chunk:
            try:
                data = row.file.read_bytes()
            except OSError as exc:
                entries[row.key] = skip_entry(row, "", "unreadable", f"{exc.strerror or exc}")
                failed += 1
                continue
            sha = hashlib.sha256(data).hexdigest()
            hit = cache.get(row.key, sha)
            if hit is not None and (
                not need_served
                or hit["status"] == "skip"
                or rules_version is None
                or hit.get("rules_version") == rules_version
            ):
                entries[row.key] = hit
                cached += 1
                failed += hit["status"] != "ok"
                continue
            asked.append((row, sha, _image(row, data, faces)))
        if asked:
            outcomes = _classify(client, [image for _, _, image in asked], mode, ensemble)
            fresh = []
            for (row, sha, _), outcome in zip(asked, outcomes, strict=True):
                if isinstance(outcome, grpc.RpcError):
                    e = skip_entry(row, sha, outcome.code().name, outcome.details() or "")
                else:
                    e = _entry(row, sha, *outcome, faces)
                failed += e["status"] != "ok"
                entries[row.key] = e
                fresh.append(e)
            cache.put(fresh)
        progress(len(chunk), cached=cached, failed=failed)
    return assemble(rows, entries, ensemble=ensemble, faces=faces)


def assemble(
    rows: Sequence[ManifestRow],
    entries: dict[str, dict[str, Any]],
    *,
    ensemble: str | None = None,
    faces: str = "crop",
    from_cache: int = 0,
) -> Answers:
    answers = Answers(ensemble=ensemble, faces=faces, from_cache=from_cache)
    for row in rows:
        e = entries[row.key]
        answers.records.append(
            {
                **e,
                "label_index": row.label,
                "source": row.source,
                "split": row.split,
                "given_box": list(row.box) if row.box else None,
            }
        )
        if "mode" in e:
            answers.modes.add(e["mode"])
            answers.rules_versions.add(e["rules_version"])
            if not answers.class_names:
                answers.class_names = list(e["class_names"])
            elif list(e["class_names"]) != answers.class_names:
                raise EvaluationError(f"the served class names changed during the run: {e['class_names']}")
        if e["status"] != "ok":
            answers.skipped.append(Skipped(row.line, row.path, e["skip_reason"], e["message"]))
            continue
        answers.labels.append(row.label)
        answers.probabilities.append(list(e["probabilities"]))
        answers.rows.append(row)
        answers.boxes.append(tuple(e["box"]) if e.get("box") else None)
        for model, logits in e["members"].items():
            answers.members.setdefault(model, []).append(list(logits))
    return answers


# Fusion --------------------------------------------------------------------------------------
def temperature_source(
    rules: EmotionRules, mode: EmotionModeName, stored: float | None, ensemble: str | None = None
) -> str:
    """Which rule of resolve_temperature's precedence gave the served temperature, in words."""
    if mode == "ensemble":
        name, ens = rules.ensemble_rules(ensemble)
        if ens.temperature is not None:
            return f"rules file: emotion.ensembles.{name}.temperature"
    if mode in rules.temperature:
        return f"rules file: emotion.temperature.{mode}"
    if mode == "student" and stored and resolve_temperature(rules, mode, stored) == stored:
        return f"stored beside {rules.student} (preprocess.json)"
    return "default 1.0 (none in the rules file" + (
        ", none stored beside the student)" if mode == "student" else "; the ensemble's fused logits)"
    )


def rules_snippet(
    rules: EmotionRules, mode: EmotionModeName, temperature: float, ensemble: str | None = None
) -> str:
    """The rules-file lines that serve ``temperature`` in ``mode`` (other modes' overrides kept). An
    ensemble that sets its own temperature (which wins over ``emotion.temperature.ensemble``) gets
    it there, with its members."""
    if mode == "ensemble":
        name, ens = rules.ensemble_rules(ensemble)
        if ens.temperature is not None:
            members = ", ".join(f"{{model: {m.model}, weight: {m.weight:g}}}" for m in ens.members)
            return (
                f"emotion:\n  ensembles:\n    {name}:\n      members: [{members}]\n"
                f"      fusion_space: {ens.fusion_space}\n      temperature: {round(temperature, 4):g}"
            )
    overrides = {**rules.temperature, mode: round(temperature, 4)}
    inner = ", ".join(f"{m}: {t:g}" for m, t in sorted(overrides.items()))
    return f"emotion:\n  temperature: {{{inner}}}"


# Report --------------------------------------------------------------------------------------
@dataclass
class EmotionEvaluation:
    manifest: str
    gateway: str
    mode: str
    rows: int
    scored: int
    skipped: int
    skipped_by_reason: dict[str, int]
    skipped_first: list[dict[str, Any]]
    models: list[dict[str, Any]]
    weights: dict[str, float]
    fusion_space: str
    rules_version: str  # the gateway's, from its answers
    rules_file: str  # read here for weights, space and temperature precedence
    rules_file_version: str
    rules_match: bool
    served_temperature: float
    temperature_source: str
    # max |fuse_logits(members, rules) − served|: 0 when the local rules are the gateway's.
    served_reproduced_max_abs_diff: float
    metrics: EvaluationReport
    rules_snippet: str | None = None
    warnings: list[str] = field(default_factory=list)
    ensemble: str | None = None
    faces: str = "crop"
    # Each member alone: softmax of its raw logits (T = 1).
    member_metrics: dict[str, EvaluationReport] = field(default_factory=dict)
    # source → answer ("fused", "fused_fitted", a member) → metrics.
    by_source: dict[str, dict[str, EvaluationReport]] = field(default_factory=dict)
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)
    from_cache: int = 0
    cache_file: str | None = None
    figures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = self.metrics.to_dict()
        return out


def load_rules(path: Path) -> tuple[FusionRules, str]:
    try:
        return parse_rules(path.read_text(), str(path))
    except (OSError, RulesError) as exc:
        raise ManifestError(f"cannot use the rules file: {exc}") from None


def _mode_name(mode: str) -> EmotionModeName | None:
    """The rules' name for a mode given as text; None when the rules have no such mode."""
    if mode == "ensemble":
        return "ensemble"
    if mode == "student":
        return "student"
    return None


def _mode(answers: Answers) -> EmotionModeName:
    if len(answers.modes) != 1:
        raise EvaluationError(
            f"answers came in several modes {sorted(answers.modes)}: the rules' default "
            "mode changed during the run; pass --mode"
        )
    answered = next(iter(answers.modes))
    mode = _mode_name(answered)
    if mode is None:
        raise EvaluationError(f"the gateway answered in mode {answered!r}, which the rules do not define")
    return mode


def member_probabilities(logits: np.ndarray) -> np.ndarray:
    """A member alone: softmax of its raw logits (T = 1)."""
    return softmax(np.asarray(logits, np.float64))


def summarise(
    answers: Answers,
    rows: int,
    rules: FusionRules,
    rules_version: str,
    *,
    fit: bool,
    manifest: str,
    gateway: str,
    rules_file: str,
    bins: int = ECE_BINS,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> EmotionEvaluation:
    """Metrics of the served answers and of each member, overall and per source; the temperature
    in force and (fit) the best one."""
    if not answers.labels:
        raise EvaluationError(
            f"no image of the {rows} rows could be scored "
            f"({dict(Counter(s.reason for s in answers.skipped))})"
        )
    if answers.class_names != list(CLASS_NAMES):
        raise EvaluationError(
            f"the served classes {answers.class_names} are not the canonical {list(CLASS_NAMES)}"
        )
    mode = _mode(answers)
    er = rules.emotion
    try:
        ensemble = er.ensemble_rules(answers.ensemble)[0] if mode == "ensemble" else None
    except UnknownEnsemble:
        raise EvaluationError(
            f"the rules file {rules_file} defines no ensemble {answers.ensemble!r}"
        ) from None
    weights = members_for(er, mode, ensemble)
    space = fusion_space_for(er, mode, ensemble)
    missing = [m for m in weights if len(answers.members.get(m, ())) != len(answers.labels)]
    if missing:
        raise EvaluationError(f"the answers carry no logits for {', '.join(missing)} (mode {mode})")
    labels = np.asarray(answers.labels, dtype=np.int64)
    served = np.asarray(answers.probabilities, dtype=np.float64)
    # float32, as the gateway holds them before fusing, so the reproduction check is exact.
    members = {m: np.asarray(answers.members[m], dtype=np.float32) for m in weights}
    stored = answers.models[er.student].temperature if er.student in answers.models else None
    temperature = resolve_temperature(er, mode, stored, ensemble)
    reproduced = fuse_logits(members, weights, temperature, space)
    report = evaluate(served, labels, CLASS_NAMES, bins)
    snippet = None
    scaled_probs = None
    if fit:
        best = _fit(members, weights, space, labels, bounds)
        report.temperature = best
        scaled_probs = fuse_logits(members, weights, best, space)
        report.scaled = evaluate(scaled_probs, labels, CLASS_NAMES, bins)
        snippet = rules_snippet(er, mode, best, ensemble)
    member_probs = {m: member_probabilities(v) for m, v in members.items()}
    by_source: dict[str, dict[str, EvaluationReport]] = {}
    sources = answers.sources if len(answers.rows) == len(labels) else []
    if any(s is not None for s in sources):
        values = np.array([s or "(none)" for s in sources], dtype=object)
        for source in sorted(set(values)):
            idx = np.flatnonzero(values == source)
            table = {"fused": evaluate(served[idx], labels[idx], CLASS_NAMES, bins)}
            if scaled_probs is not None:
                table["fused_fitted"] = evaluate(scaled_probs[idx], labels[idx], CLASS_NAMES, bins)
            for m, p in member_probs.items():
                table[m] = evaluate(p[idx], labels[idx], CLASS_NAMES, bins)
            by_source[str(source)] = table
    ev = EmotionEvaluation(
        manifest=manifest,
        gateway=gateway,
        mode=mode,
        rows=rows,
        scored=len(labels),
        skipped=len(answers.skipped),
        skipped_by_reason=dict(Counter(s.reason for s in answers.skipped)),
        skipped_first=[asdict(s) for s in answers.skipped[:SKIPPED_SHOWN]],
        models=[
            {
                "name": m.name,
                "version": m.version,
                "backend": m.backend,
                "demo": m.demo,
                "stored_temperature": m.temperature or None,
            }
            for m in answers.models.values()
        ],
        weights={m: w / sum(weights.values()) for m, w in weights.items()},
        fusion_space=space,
        rules_version=", ".join(sorted(answers.rules_versions)),
        rules_file=rules_file,
        rules_file_version=rules_version,
        rules_match=answers.rules_versions == {rules_version},
        served_temperature=temperature,
        temperature_source=temperature_source(er, mode, stored, ensemble),
        served_reproduced_max_abs_diff=float(np.max(np.abs(reproduced - served))),
        metrics=report,
        rules_snippet=snippet,
        ensemble=ensemble,
        faces=answers.faces,
        member_metrics={m: evaluate(p, labels, CLASS_NAMES, bins) for m, p in member_probs.items()},
        by_source=by_source,
        skipped_rows=[asdict(s) for s in answers.skipped],
        from_cache=answers.from_cache,
    )
    ev.warnings = _warnings(ev, bounds)
    return ev


def _fit(
    members: dict[str, np.ndarray],
    weights: dict[str, float],
    space: str,
    labels: np.ndarray,
    bounds: tuple[float, float],
) -> float:
    if space == "logit":
        return fit_temperature(fused_logits(members, weights), labels, bounds)
    # prob space: T scales each member before the average, so there are no fused logits to fit on.
    return minimise_temperature(lambda t: nll(fuse_logits(members, weights, t, space), labels), bounds)


def _warnings(ev: EmotionEvaluation, bounds: tuple[float, float]) -> list[str]:
    out = []
    if not ev.rules_match:
        out.append(
            f"the gateway's rules (version {ev.rules_version}) are not {ev.rules_file} (version "
            f"{ev.rules_file_version}); weights, fusion space and temperature were taken from the file: "
            f"served answers reproduced to within {ev.served_reproduced_max_abs_diff:.2g}"
        )
    elif ev.served_reproduced_max_abs_diff > 1e-5:
        out.append(
            f"the served probabilities differ from the rules' fusion by up to "
            f"{ev.served_reproduced_max_abs_diff:.2g}"
        )
    t = ev.metrics.temperature
    if t is not None and (t <= bounds[0] * 1.001 or t >= bounds[1] * 0.999):
        out.append(
            f"the fitted temperature {t:g} sits at the search bound {bounds}: the manifest is too "
            "small or too easy/hard to calibrate on"
        )
    if ev.skipped:
        out.append(f"{ev.skipped} of {ev.rows} images were not scored: {ev.skipped_by_reason}")
    return out


# Running -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What is asked of the gateway: the mode and ensemble (resolved with the local rules file, so
    the cache knows them before asking) and how rows without a box are sent."""

    mode: EmotionModeName
    ensemble: str | None  # the resolved name (ensemble mode), for the cache and the report
    send_ensemble: str | None  # what the request names (None: the gateway's default ensemble)
    faces: str
    members: tuple[str, ...]


def resolve_request(rules: FusionRules, mode: str | None, ensemble: str | None, faces: str) -> Request:
    if faces not in FACES:
        raise ManifestError(f"--faces must be one of {', '.join(FACES)}, got {faces!r}")
    if ensemble and mode == "student":
        raise ManifestError("--ensemble names an ensemble of ensemble mode: it cannot go with --mode student")
    resolved: EmotionModeName = rules.emotion.default_mode
    if ensemble:
        resolved = "ensemble"
    elif mode:
        named = _mode_name(mode)
        if named is None:
            raise ManifestError(f"--mode must be student or ensemble, got {mode!r}")
        resolved = named
    name = None
    if resolved == "ensemble":
        try:
            name = rules.emotion.ensemble_rules(ensemble)[0]
        except UnknownEnsemble:
            raise ManifestError(
                f"the rules file defines no ensemble {ensemble!r} (it defines "
                f"{', '.join(sorted(rules.emotion.ensembles))})"
            ) from None
    return Request(resolved, name, ensemble, faces, tuple(members_for(rules.emotion, resolved, name)))


def fetch(
    manifest: Path,
    target: str,
    *,
    rows: Sequence[ManifestRow],
    rules: FusionRules,
    request: Request,
    batch: int = 16,
    token: str | None = None,
    timeout: float = 60.0,
    progress: bool = False,
    cache_dir: Path | None = None,
    need_served: bool = True,
) -> tuple[Answers, AnswerCache]:
    """Every row's answer, from the cache or the gateway (GetStatus first: the model versions and
    rules version the cache is keyed on)."""
    with TesseraClient(target, token=token, timeout=timeout) as client:
        status = client.status()
        versions = model_versions(status, "emotion")
        key = {
            "manifest_sha256": sha256_file(manifest),
            "mode": request.mode,
            "ensemble": request.ensemble,
            "faces": request.faces,
            "models": versions,
        }
        cache = AnswerCache(cache_dir, "emotion", key)
        with Progress(len(rows), "emotion images", enabled=progress) as bar:
            answers = collect(
                client,
                rows,
                request.mode,
                batch,
                bar.update,
                ensemble=request.send_ensemble,
                faces=request.faces,
                cache=cache,
                rules_version=status.rules_version,
                need_served=need_served,
            )
            answers.from_cache = bar.cached
        # The models as the emotion service reports them (their stored temperatures too): the
        # answers' own model lists are not in the cache.
        for service in status.services:
            if service.name == "emotion":
                answers.models.update({m.name: m for m in service.models})
    answers.ensemble = request.ensemble
    return answers, cache


def run(
    manifest: Path,
    target: str,
    *,
    mode: str | None = None,
    batch: int = 16,
    fit: bool = False,
    token: str | None = None,
    rules_path: Path = DEFAULT_RULES,
    split: str | None = None,
    bins: int = ECE_BINS,
    timeout: float = 60.0,
    progress: bool = False,
    ensemble: str | None = None,
    faces: str = "detect",
    cache_dir: Path | None = None,
    out: Path | None = None,
) -> EmotionEvaluation:
    """ManifestError for bad input (nothing sent), grpc.RpcError / EvaluationError from the gateway."""
    rows = read_manifest(manifest, split)
    rules, rules_version = load_rules(rules_path)
    request = resolve_request(rules, mode, ensemble, faces)
    answers, cache = fetch(
        manifest,
        target,
        rows=rows,
        rules=rules,
        request=request,
        batch=batch,
        token=token,
        timeout=timeout,
        progress=progress,
        cache_dir=cache_dir,
    )
    ev = summarise(
        answers,
        len(rows),
        rules,
        rules_version,
        fit=fit,
        manifest=str(manifest),
        gateway=target,
        rules_file=str(rules_path),
        bins=bins,
    )
    ev.cache_file = str(cache.path) if cache.path else None
    if out is not None:
        write_outputs(ev, answers, out, bins)
    return ev


def default_rules_path() -> Path:
    """The gateway's own setting when this shell has it, else the repository's rules file."""
    env = os.environ.get("TESSERA_GATEWAY__RULES_PATH")
    return Path(env) if env else DEFAULT_RULES


# Outputs -------------------------------------------------------------------------------------
def _answer_name(ev: EmotionEvaluation) -> str:
    return (
        f"fused: ensemble `{ev.ensemble}`"
        if ev.mode == "ensemble"
        else f"fused: student `{ev.weights and next(iter(ev.weights))}`"
    )


def write_outputs(ev: EmotionEvaluation, answers: Answers, out: Path, bins: int = ECE_BINS) -> None:
    """report.json, report.md and the figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(answers.labels, np.int64)
    served = np.asarray(answers.probabilities, np.float64)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {
        f"served (T={ev.served_temperature:.3g})": (served, labels)
    }
    if ev.metrics.scaled is not None and ev.metrics.temperature is not None:
        weights = ev.weights
        members = {m: np.asarray(answers.members[m], np.float32) for m in weights}
        curves[f"fitted (T={ev.metrics.temperature:.3g})"] = (
            fuse_logits(members, weights, ev.metrics.temperature, ev.fusion_space),
            labels,
        )
    if len(ev.member_metrics) > 1:
        for m in ev.member_metrics:
            curves[f"{m} alone"] = (member_probabilities(np.asarray(answers.members[m])), labels)
    title = f"{ev.mode} mode" + (f" (ensemble {ev.ensemble})" if ev.ensemble else "") + f", {ev.scored} faces"
    ev.figures = {
        "reliability": figures.reliability_diagram(
            out / f"reliability-{ev.mode}.png", curves, f"Reliability: {title}", bins
        ).name,
        "confusion": figures.confusion_heatmap(
            out / f"confusion-{ev.mode}.png",
            np.asarray(ev.metrics.confusion_matrix),
            CLASS_NAMES,
            f"Confusion matrix: {title}",
        ).name,
    }
    write_json(out / "report.json", ev.to_dict())
    write_text(out / "report.md", format_markdown(ev))


def _metric_row(name: str, m: EvaluationReport) -> list[Any]:
    return [name, m.n, m.accuracy, m.macro_f1, m.nll, m.ece, m.brier]


METRIC_HEADER = ("answer", "n", "accuracy", "macro-F1", "NLL", "ECE", "Brier")


def format_markdown(ev: EmotionEvaluation) -> str:
    """The report, laid out like a paper's tables."""
    m = ev.metrics
    fused = _answer_name(ev)
    models = ", ".join(f"{x['name']} v{x['version']}" + (" (demo)" if x["demo"] else "") for x in ev.models)
    weights = ", ".join(f"{k} {v:.3g}" for k, v in ev.weights.items())
    faces = (
        "rows without a box were sent whole and the **served face detector** found the face "
        "(`--faces detect`); a row with no face or several faces is listed under *Not scored*"
        if ev.faces == "detect"
        else "rows without a box were sent as **face crops** (`--faces crop`)"
    )
    lines = [
        f"# Emotion evaluation: `{ev.manifest}`",
        "",
        f"- rows: {ev.rows}; scored {ev.scored}; not scored {ev.skipped}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(ev.skipped_by_reason.items()))})"
            if ev.skipped
            else ""
        ),
        f"- faces: {faces}",
        f"- gateway `{ev.gateway}`, mode **{ev.mode}**"
        + (f", ensemble **{ev.ensemble}**" if ev.ensemble else ""),
        f"- members and weights: {weights} ({ev.fusion_space} space)",
        f"- models: {models}",
        f"- rules: {ev.rules_version}"
        + (f" (= `{ev.rules_file}`)" if ev.rules_match else f" (not `{ev.rules_file}`)"),
        f"- served temperature: {ev.served_temperature:g} ({ev.temperature_source})",
    ]
    if ev.from_cache:
        lines.append(f"- {ev.from_cache} answers from the cache `{ev.cache_file}`")
    lines += ["", "## Table 1. Overall", "", "Each member alone is softmax of its raw logits (T = 1).", ""]
    rows = [_metric_row(f"{fused} (served, T={ev.served_temperature:.4g})", m)]
    if m.scaled is not None:
        rows.append(_metric_row(f"{fused} (fitted T={m.temperature:.4g})", m.scaled))
    rows += [_metric_row(f"member `{name}`", r) for name, r in ev.member_metrics.items()]
    lines.append(md_table(METRIC_HEADER, rows, "lrrrrrr"))
    if ev.by_source:
        lines += ["", "## Table 2. By source", ""]
        srows = []
        for source, table in ev.by_source.items():
            for name, r in table.items():
                label = {"fused": "fused (served)", "fused_fitted": "fused (fitted T)"}.get(
                    name, f"member `{name}`"
                )
                srows.append([source, *_metric_row(label, r)])
        lines.append(md_table(("source", *METRIC_HEADER), srows, "llrrrrrr"))
    n = 3 if ev.by_source else 2
    lines += ["", f"## Table {n}. F1 per class", ""]
    frows = [
        ["support", *[m.support[c] for c in CLASS_NAMES]],
        [f"{fused} (served)", *m.per_class_f1.values()],
    ]
    if m.scaled is not None:
        frows.append([f"{fused} (fitted T)", *m.scaled.per_class_f1.values()])
    frows += [[f"member `{name}`", *r.per_class_f1.values()] for name, r in ev.member_metrics.items()]
    lines.append(md_table(("answer", *CLASS_NAMES), frows, "l" + "r" * len(CLASS_NAMES)))
    lines += [
        "",
        f"## Table {n + 1}. Confusion matrix of the served answer (rows: true, columns: predicted)",
        "",
    ]
    crows = [[c, *row] for c, row in zip(CLASS_NAMES, m.confusion_matrix, strict=True)]
    lines.append(md_table(("true \\ predicted", *CLASS_NAMES), crows, "l" + "r" * len(CLASS_NAMES)))
    if ev.figures:
        lines += ["", "## Figures", ""]
        for kind, name in ev.figures.items():
            lines += [f"- {kind}: `{name}`", "", f"  ![{kind}]({name})", ""]
    if ev.rules_snippet:
        lines += [
            "",
            "## Temperature",
            "",
            f"To serve T={m.temperature:.4g} in {ev.mode} mode, put in the rules file (reloaded without restart):",
            "",
            "```yaml",
            ev.rules_snippet,
            "```",
        ]
    if ev.skipped:
        lines += [
            "",
            f"## Not scored ({ev.skipped})",
            "",
            skipped_table([Skipped(**s) for s in ev.skipped_rows]),
        ]
    if ev.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in ev.warnings]
    return "\n".join(lines) + "\n"


format_report = format_markdown


def summary_line(ev: EmotionEvaluation) -> str:
    m = ev.metrics
    return (
        f"{ev.scored}/{ev.rows} scored: accuracy {fmt(m.accuracy)}, macro-F1 {fmt(m.macro_f1)}, "
        f"NLL {fmt(m.nll)}, ECE {fmt(m.ece)}"
    )
