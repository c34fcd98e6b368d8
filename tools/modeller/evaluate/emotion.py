"""Evaluate the served emotion model on a labelled manifest, and fit its temperature.

The manifest is a CSV with a header: ``path`` and ``label`` (a class name of the canonical seven,
any case, or an index 0-6), optionally ``x, y, w, h`` (the face box in the image: detection is
skipped; leave all four empty on a row for a face crop) and ``split`` (see ``--split``). Paths are
relative to the manifest's directory. Rows without a box are sent flagged as face crops, as the
research's manifests are.

Everything goes through the gateway, so the figures are those of the served answer: its mode, its
fusion rules, its temperature. The members' raw logits come back with each face
(``return_member_logits``); the temperature is fitted on their fusion by the rules' weights, and the
report prints the rules-file line that serves it.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tqdm import tqdm

from tessera_client.client import TesseraClient, status_code, to_image
from services.fusion.emotion import CLASS_NAMES, fuse_logits, fused_logits, members_for, resolve_temperature
from services.fusion.rules import EmotionModeName, EmotionRules, FusionRules, RulesError, parse_rules
from tools.modeller.evaluate.metrics import (
    ECE_BINS,
    TEMPERATURE_BOUNDS,
    EvaluationReport,
    evaluate,
    fit_temperature,
    minimise_temperature,
    nll,
)

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RULES = ROOT / "config" / "fusion_rules.yaml"
BOX_COLUMNS = ("x", "y", "w", "h")
SKIPPED_SHOWN = 10


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file and the line."""


class EvaluationError(RuntimeError):
    """The gateway failed the evaluation (a whole request refused, nothing scored, ...)."""


# Manifest ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestRow:
    line: int  # in the file, header = 1: what an editor shows
    path: str  # as written, for messages
    file: Path  # resolved against the manifest's directory
    label: int  # canonical class index
    box: tuple[int, int, int, int] | None


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
        raise ManifestError(f"{source}: missing column(s) {', '.join(repr(m) for m in missing)} "
                            f"(header: {', '.join(fieldnames)})")
    boxes = [c for c in BOX_COLUMNS if c in columns]
    if boxes and len(boxes) != len(BOX_COLUMNS):
        raise ManifestError(f"{source}: face box columns need all of x, y, w, h, found only {', '.join(boxes)}")
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


def _rows(reader: csv.DictReader, columns: dict[str, str], source: Path,
          split: str | None) -> Iterator[ManifestRow]:
    base = source.parent
    has_box = "x" in columns
    for cells in reader:
        line = reader.line_num
        where = f"{source} line {line}"
        if split is not None and (cells.get(columns["split"]) or "").strip() != split:
            continue
        raw_path = (cells.get(columns["path"]) or "").strip()
        if not raw_path:
            raise ManifestError(f"{where}: empty path")
        raw_label = cells.get(columns["label"]) or ""
        label = parse_label(raw_label)
        if label is None:
            raise ManifestError(f"{where}: unknown label {raw_label!r} for {raw_path!r}; expected one of "
                                f"{', '.join(CLASS_NAMES)} (any case) or an index 0-{len(CLASS_NAMES) - 1}")
        box = _box([cells.get(columns[c]) or "" for c in BOX_COLUMNS], where) if has_box else None
        yield ManifestRow(line, raw_path, base / raw_path, label, box)


# Gateway -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Skipped:
    line: int
    path: str
    reason: str  # "unreadable", "no_face", "several_faces", or the gRPC code name of the image's status
    message: str


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


def _image(row: ManifestRow) -> common_pb2.Image:
    data = row.file.read_bytes()
    if row.box is None:
        return to_image(data, face_crop=True)
    return to_image(data, boxes=[row.box])


def _classify(client: TesseraClient, images: list[common_pb2.Image], mode: str | None,
              ) -> list[tuple[pb.ClassifyEmotionResponse, int] | grpc.RpcError]:
    """(reply, index in reply) per image. A batch over the gateway's limits (count or bytes) is
    halved until it fits; an image too large on its own is that image's failure, not the run's."""
    try:
        reply = client.classify(images, mode=mode, return_member_logits=True)
        return [(reply, i) for i in range(len(images))]
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        if len(images) == 1:
            return [exc]
    half = len(images) // 2
    return _classify(client, images[:half], mode) + _classify(client, images[half:], mode)


def _record(answers: Answers, row: ManifestRow, reply: pb.ClassifyEmotionResponse, index: int) -> None:
    image = reply.images[index]
    answers.modes.add(pb.EmotionMode.Name(reply.mode).removeprefix("EMOTION_MODE_").lower())
    answers.rules_versions.add(reply.rules_version)
    answers.models.update({m.name: m for m in reply.models})
    if not answers.class_names:
        answers.class_names = list(reply.class_names)
    elif list(reply.class_names) != answers.class_names:
        raise EvaluationError(f"the served class names changed during the run: {list(reply.class_names)}")
    if image.status.code != 0:
        code = status_code(image.status.code).name
        answers.skipped.append(Skipped(row.line, row.path, code, image.status.message))
    elif len(image.faces) != 1:
        # A crop or a given box is one face; anything else means the image was not what we sent.
        reason = "no_face" if not image.faces else "several_faces"
        answers.skipped.append(Skipped(row.line, row.path, reason, f"{len(image.faces)} faces, expected 1"))
    else:
        face = image.faces[0]
        answers.labels.append(row.label)
        answers.probabilities.append(list(face.probabilities))
        for member in face.members:
            answers.members.setdefault(member.model, []).append(list(member.logits))


def collect(client: TesseraClient, rows: Sequence[ManifestRow], mode: str | None, batch: int,
            progress: Callable[[int], None] = lambda n: None) -> Answers:
    """Ask the gateway about every row, batch by batch; grpc.RpcError when a whole request fails."""
    answers = Answers()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        readable: list[tuple[ManifestRow, common_pb2.Image]] = []
        for row in chunk:
            try:
                readable.append((row, _image(row)))
            except OSError as exc:
                answers.skipped.append(Skipped(row.line, row.path, "unreadable", f"{exc.strerror or exc}"))
        if readable:
            outcomes = _classify(client, [image for _, image in readable], mode)
            for (row, _), outcome in zip(readable, outcomes, strict=True):
                if isinstance(outcome, grpc.RpcError):
                    answers.skipped.append(Skipped(row.line, row.path, outcome.code().name, outcome.details()))
                else:
                    _record(answers, row, *outcome)
        progress(len(chunk))
    answers.skipped.sort(key=lambda s: s.line)  # unreadable files are found before the batch's answers
    return answers


# Fusion --------------------------------------------------------------------------------------
def temperature_source(rules: EmotionRules, mode: EmotionModeName, stored: float | None) -> str:
    """Which rule of resolve_temperature's precedence gave the served temperature, in words."""
    if mode in rules.temperature:
        return f"rules file: emotion.temperature.{mode}"
    if mode == "student" and stored and resolve_temperature(rules, mode, stored) == stored:
        return f"stored beside {rules.student} (preprocess.json)"
    return "default 1.0 (none in the rules file" + (", none stored beside the student)" if mode == "student"
                                                    else "; the ensemble's fused logits)")


def rules_snippet(rules: EmotionRules, mode: EmotionModeName, temperature: float) -> str:
    """The rules-file lines that serve ``temperature`` in ``mode`` (other modes' overrides kept)."""
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = self.metrics.to_dict()
        return out


def load_rules(path: Path) -> tuple[FusionRules, str]:
    try:
        return parse_rules(path.read_text(), str(path))
    except (OSError, RulesError) as exc:
        raise ManifestError(f"cannot use the rules file: {exc}") from None


def _mode(answers: Answers) -> EmotionModeName:
    if len(answers.modes) != 1:
        raise EvaluationError(f"answers came in several modes {sorted(answers.modes)}: the rules' default "
                              "mode changed during the run; pass --mode")
    return next(iter(answers.modes))  # type: ignore[return-value]


def summarise(answers: Answers, rows: int, rules: FusionRules, rules_version: str, *, fit: bool,
              manifest: str, gateway: str, rules_file: str, bins: int = ECE_BINS,
              bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> EmotionEvaluation:
    """Metrics of the served answers, the temperature in force and (fit) the best one."""
    if not answers.labels:
        raise EvaluationError(f"no image of the {rows} rows could be scored "
                              f"({dict(Counter(s.reason for s in answers.skipped))})")
    if answers.class_names != list(CLASS_NAMES):
        raise EvaluationError(f"the served classes {answers.class_names} are not the canonical {list(CLASS_NAMES)}")
    mode = _mode(answers)
    er = rules.emotion
    weights = members_for(er, mode)
    missing = [m for m in weights if len(answers.members.get(m, ())) != len(answers.labels)]
    if missing:
        raise EvaluationError(f"the answers carry no logits for {', '.join(missing)} (mode {mode})")
    labels = np.asarray(answers.labels, dtype=np.int64)
    served = np.asarray(answers.probabilities, dtype=np.float64)
    # float32, as the gateway holds them before fusing, so the reproduction check is exact.
    members = {m: np.asarray(answers.members[m], dtype=np.float32) for m in weights}
    stored = answers.models[er.student].temperature if er.student in answers.models else None
    temperature = resolve_temperature(er, mode, stored)
    reproduced = fuse_logits(members, weights, temperature, er.fusion_space)
    report = evaluate(served, labels, CLASS_NAMES, bins)
    snippet = None
    if fit:
        best = _fit(members, weights, er.fusion_space, labels, bounds)
        report.temperature = best
        report.scaled = evaluate(fuse_logits(members, weights, best, er.fusion_space), labels, CLASS_NAMES, bins)
        snippet = rules_snippet(er, mode, best)
    ev = EmotionEvaluation(
        manifest=manifest, gateway=gateway, mode=mode, rows=rows, scored=len(labels),
        skipped=len(answers.skipped), skipped_by_reason=dict(Counter(s.reason for s in answers.skipped)),
        skipped_first=[asdict(s) for s in answers.skipped[:SKIPPED_SHOWN]],
        models=[{"name": m.name, "version": m.version, "backend": m.backend, "demo": m.demo,
                 "stored_temperature": m.temperature or None} for m in answers.models.values()],
        weights={m: w / sum(weights.values()) for m, w in weights.items()}, fusion_space=er.fusion_space,
        rules_version=", ".join(sorted(answers.rules_versions)), rules_file=rules_file,
        rules_file_version=rules_version, rules_match=answers.rules_versions == {rules_version},
        served_temperature=temperature, temperature_source=temperature_source(er, mode, stored),
        served_reproduced_max_abs_diff=float(np.max(np.abs(reproduced - served))), metrics=report,
        rules_snippet=snippet)
    ev.warnings = _warnings(ev, bounds)
    return ev


def _fit(members: dict[str, np.ndarray], weights: dict[str, float], space: str, labels: np.ndarray,
         bounds: tuple[float, float]) -> float:
    if space == "logit":
        return fit_temperature(fused_logits(members, weights), labels, bounds)
    # prob space: T scales each member before the average, so there are no fused logits to fit on.
    return minimise_temperature(lambda t: nll(fuse_logits(members, weights, t, space), labels), bounds)


def _warnings(ev: EmotionEvaluation, bounds: tuple[float, float]) -> list[str]:
    out = []
    if not ev.rules_match:
        out.append(f"the gateway's rules (version {ev.rules_version}) are not {ev.rules_file} (version "
                   f"{ev.rules_file_version}); weights, fusion space and temperature were taken from the file: "
                   f"served answers reproduced to within {ev.served_reproduced_max_abs_diff:.2g}")
    elif ev.served_reproduced_max_abs_diff > 1e-5:
        out.append(f"the served probabilities differ from the rules' fusion by up to "
                   f"{ev.served_reproduced_max_abs_diff:.2g}")
    t = ev.metrics.temperature
    if t is not None and (t <= bounds[0] * 1.001 or t >= bounds[1] * 0.999):
        out.append(f"the fitted temperature {t:g} sits at the search bound {bounds}: the manifest is too "
                   "small or too easy/hard to calibrate on")
    if ev.skipped:
        out.append(f"{ev.skipped} of {ev.rows} images were not scored: {ev.skipped_by_reason}")
    return out


def run(manifest: Path, target: str, *, mode: str | None = None, batch: int = 16, fit: bool = False,
        token: str | None = None, rules_path: Path = DEFAULT_RULES, split: str | None = None,
        bins: int = ECE_BINS, timeout: float = 60.0, progress: bool = False) -> EmotionEvaluation:
    """ManifestError for bad input (nothing sent), grpc.RpcError / EvaluationError from the gateway."""
    rows = read_manifest(manifest, split)
    rules, rules_version = load_rules(rules_path)
    with (TesseraClient(target, token=token, timeout=timeout) as client,
          tqdm(total=len(rows), unit="img", disable=not progress, dynamic_ncols=True) as bar):
        answers = collect(client, rows, mode, batch, bar.update)
    return summarise(answers, len(rows), rules, rules_version, fit=fit, manifest=str(manifest), gateway=target,
                     rules_file=str(rules_path), bins=bins)


def default_rules_path() -> Path:
    """The gateway's own setting when this shell has it, else the repository's rules file."""
    env = os.environ.get("TESSERA_GATEWAY__RULES_PATH")
    return Path(env) if env else DEFAULT_RULES


# Table ---------------------------------------------------------------------------------------
def format_report(ev: EmotionEvaluation) -> str:
    m = ev.metrics
    scaled = m.scaled
    head = f"{'':<14}{'served':>10}" + (f"{f'T={m.temperature:.4g}':>12}" if scaled else "")
    lines = [
        f"manifest   {ev.manifest}: {ev.rows} rows, {ev.scored} scored, {ev.skipped} skipped",
        f"gateway    {ev.gateway}, mode {ev.mode}, models "
        + ", ".join(f"{x['name']} v{x['version']}" + (" (demo)" if x["demo"] else "") for x in ev.models),
        f"rules      {ev.rules_version}" + (f" (= {ev.rules_file})" if ev.rules_match else f" (not {ev.rules_file})"),
        f"served T   {ev.served_temperature:g} ({ev.temperature_source})",
        "", head]
    for name, key, fmt in (("accuracy", "accuracy", ".4f"), ("macro-F1", "macro_f1", ".4f"), ("NLL", "nll", ".4f"),
                           ("ECE", "ece", ".4f"), ("Brier", "brier", ".4f")):
        row = f"{name:<14}{getattr(m, key):>10{fmt}}"
        lines.append(row + (f"{getattr(scaled, key):>12{fmt}}" if scaled else ""))
    lines.append("F1 per class (support)")
    for c in CLASS_NAMES:
        row = f"  {c:<12}{m.per_class_f1[c]:>10.4f}"
        lines.append(row + (f"{scaled.per_class_f1[c]:>12.4f}" if scaled else "") + f"   ({m.support[c]})")
    if ev.skipped_first:
        lines += ["", f"not scored ({ev.skipped}; first {len(ev.skipped_first)}):"]
        lines += [f"  line {s['line']} {s['path']}: {s['reason']}: {s['message']}" for s in ev.skipped_first]
    if ev.rules_snippet:
        advice = f"to serve T={m.temperature:.4g} in {ev.mode} mode, put in the rules file (reloaded without restart):"
        lines += ["", advice, ev.rules_snippet]
    lines += [f"warning: {w}" for w in ev.warnings]
    return "\n".join(lines)

