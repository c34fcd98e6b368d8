"""``search-weights``: the member weights of a named emotion ensemble, searched on a grid over the
simplex, in logit and probability space, on the cached member logits.

For every weight vector whose components are multiples of ``step`` and sum to 1 (66 vectors for
three members at step 0.1), and every fusion space asked for, the temperature is fitted on the
validation rows (minimum NLL, as ``--fit-temperature`` does) and the fused answer is scored there;
candidates are ranked by macro-F1 (ties: lower NLL) or by NLL (ties: higher macro-F1), and the
best is reported on the test rows beside the ensemble the rules serve now. ``--write-rules FILE``
writes the chosen weights, space and temperature into ``emotion.ensembles.<name>`` of a rules
file, validated by the gateway's own schema (``services/fusion/rules.py``) before it replaces the
file (atomically: a gateway reading it sees the old or the new file, never half of one).

Splits: ``--val-split`` / ``--test-split`` name values of the manifest's ``split`` column (by
default ``val`` or ``validation`` or ``dev``, and ``test``, when the manifest has them); otherwise
the rows are split at random, stratified by label, ``--val-fraction`` of them for validation
(seeded: the same manifest gives the same split).

Over 500 lines on purpose: the grid, the temperature fit per point and the rules file it writes are
one procedure; split, each part would be read only with the others.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.fusion.emotion import CLASS_NAMES, fuse_logits, fused_logits, members_for, resolve_temperature
from services.fusion.rules import (
    DEFAULT_ENSEMBLE,
    EmotionMember,
    EnsembleRules,
    FusionRules,
    RulesError,
    UnknownEnsemble,
    parse_rules,
)
from tools.modeller.evaluate import figures
from tools.modeller.evaluate.common import (
    EvaluationError,
    ManifestError,
    Skipped,
    md_table,
    skipped_table,
    write_json,
    write_text,
)
from tools.modeller.evaluate.emotion import (
    DEFAULT_RULES,
    fetch,
    load_rules,
    read_manifest,
    resolve_request,
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

SPACES = ("logit", "prob")
METRICS = ("macro_f1", "nll")
VAL_NAMES = ("val", "validation", "dev")
TEST_NAMES = ("test",)


def simplex_grid(members: int, step: float = 0.1) -> np.ndarray:
    """Every weight vector [n, members] with components in multiples of ``step`` summing to 1."""
    if members < 1:
        raise ValueError("need at least one member")
    parts = round(1.0 / step)
    if parts < 1 or abs(parts * step - 1.0) > 1e-9:
        raise ValueError(f"step {step} must divide 1 (0.1, 0.05, 0.25, …)")

    def compositions(total: int, n: int) -> list[list[int]]:
        if n == 1:
            return [[total]]
        return [
            [first, *rest] for first in range(total, -1, -1) for rest in compositions(total - first, n - 1)
        ]

    return np.asarray(compositions(parts, members), np.float64) / parts


@dataclass
class Candidate:
    weights: dict[str, float]
    space: str
    temperature: float
    accuracy: float
    macro_f1: float
    nll: float
    ece: float

    def key(self, metric: str) -> tuple[float, float]:
        return (-self.macro_f1, self.nll) if metric == "macro_f1" else (self.nll, -self.macro_f1)


def _fit(
    members: dict[str, np.ndarray],
    weights: dict[str, float],
    space: str,
    labels: np.ndarray,
    bounds: tuple[float, float],
) -> float:
    if space == "logit":
        return fit_temperature(fused_logits(members, weights), labels, bounds)
    return minimise_temperature(lambda t: nll(fuse_logits(members, weights, t, space), labels), bounds)


def search(
    members: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    step: float = 0.1,
    spaces: Sequence[str] = SPACES,
    metric: str = "macro_f1",
    bins: int = ECE_BINS,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> list[Candidate]:
    """Every grid candidate scored on (members, labels) with its own fitted temperature, best first
    (a stable sort: among exact ties the grid's order, which starts with the first member alone)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    names = list(members)
    out = []
    for space in spaces:
        for w in simplex_grid(len(names), step):
            weights = {m: round(float(v), 10) for m, v in zip(names, w, strict=True)}
            used = {m: v for m, v in weights.items() if v > 0}
            t = _fit(members, used, space, labels, bounds)
            p = fuse_logits(members, used, t, space)
            r = evaluate(p, labels, CLASS_NAMES, bins)
            out.append(Candidate(weights, space, t, r.accuracy, r.macro_f1, r.nll, r.ece))
    return sorted(out, key=lambda c: c.key(metric))


def split_rows(
    labels: np.ndarray,
    splits: Sequence[str | None],
    *,
    val_split: str | None,
    test_split: str | None,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(validation indices, test indices, how they were chosen)."""
    values = np.array([s or "" for s in splits], dtype=object)
    present = set(values)
    if val_split is None and test_split is None:
        val_split = next((v for v in VAL_NAMES if v in present), None)
        test_split = next((v for v in TEST_NAMES if v in present), None)
        if val_split is None or test_split is None:
            val_split = test_split = None
    if val_split is not None or test_split is not None:
        if val_split is None or test_split is None:
            raise ManifestError("give both --val-split and --test-split (or neither)")
        val = np.flatnonzero(values == val_split)
        test = np.flatnonzero(values == test_split)
        if not len(val) or not len(test):
            raise ManifestError(
                f"no scored rows with split {val_split!r} ({len(val)}) or {test_split!r} ({len(test)})"
            )
        return (
            val,
            test,
            f"the manifest's split column: {val_split!r} for validation, {test_split!r} for test",
        )
    if not 0 < val_fraction < 1:
        raise ManifestError("--val-fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    val_rows: list[np.int64] = []
    test_rows: list[np.int64] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = round(len(idx) * val_fraction)
        val_rows.extend(idx[:cut])
        test_rows.extend(idx[cut:])
    val_idx, test_idx = np.sort(np.asarray(val_rows, np.int64)), np.sort(np.asarray(test_rows, np.int64))
    if not len(val_idx) or not len(test_idx):
        raise ManifestError(f"{len(labels)} scored rows are too few to split into validation and test")
    return val_idx, test_idx, f"random, stratified by label: {val_fraction:g} for validation (seed {seed})"


# Rules file ---------------------------------------------------------------------------------------
def _header(text: str) -> list[str]:
    """The file's leading comment lines (kept when the file is rewritten)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            out.append(line)
        else:
            break
    return out


def updated_rules_text(
    base_text: str, ensemble: str, weights: dict[str, float], space: str, temperature: float, note: str
) -> str:
    """The rules text with ``emotion.ensembles.<ensemble>`` set to these weights, space and
    temperature, through the schema's own classes; RulesError if the result is not valid rules.
    The one-ensemble form (``emotion.members``) becomes the named form."""
    data = yaml.safe_load(base_text) or {}
    if not isinstance(data, dict):
        raise RulesError("the rules file must hold a mapping at the top level")
    emotion = dict(data.get("emotion") or {})
    if "ensembles" not in emotion and ({"members", "fusion_space"} & emotion.keys()):
        one = {k: emotion.pop(k) for k in ("members", "fusion_space") if k in emotion}
        emotion["ensembles"] = {emotion.get("ensemble", DEFAULT_ENSEMBLE): one}
    ensembles = dict(emotion.get("ensembles") or {})
    chosen = EnsembleRules(
        members=[EmotionMember(model=m, weight=w) for m, w in weights.items()],
        fusion_space=space,
        temperature=round(temperature, 4),
    )
    ensembles[ensemble] = chosen.model_dump(exclude_none=True)
    emotion["ensembles"] = ensembles
    data["emotion"] = emotion
    header = [*_header(base_text), f"# {note}"]
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    rules, _ = parse_rules(text, "the written rules")  # the gateway's own validation
    _, written = rules.emotion.ensemble_rules(ensemble)
    if {m.model: m.weight for m in written.members} != weights or written.fusion_space != space:
        raise RulesError(
            "the written rules do not hold the chosen weights"
        )  # pragma: no cover - a schema change
    return text


def write_rules(
    path: Path,
    base: Path,
    ensemble: str,
    weights: dict[str, float],
    space: str,
    temperature: float,
    note: str,
) -> str:
    """Write the rules into ``path`` (starting from ``path`` itself when it exists, else from
    ``base``): a temporary file in the same folder, then renamed over it."""
    source = path if path.exists() else base
    try:
        text = updated_rules_text(source.read_text(), ensemble, weights, space, temperature, note)
    except OSError as exc:
        raise ManifestError(f"cannot read the rules file {source}: {exc}") from None
    except (RulesError, ValueError) as exc:
        raise ManifestError(f"the rules written from {source} would not be valid: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


# Command ------------------------------------------------------------------------------------------
@dataclass
class WeightSearch:
    manifest: str
    ensemble: str
    members: list[str]
    metric: str
    step: float
    spaces: list[str]
    split: str
    validation_rows: int
    test_rows: int
    candidates: int
    top: list[Candidate]
    best: Candidate
    best_test: EvaluationReport
    # The ensemble as the rules serve it now: its weights, space and served temperature, on test.
    current: dict[str, Any]
    current_test: EvaluationReport
    current_refit_test: EvaluationReport
    skipped: list[Skipped] = field(default_factory=list)
    rows: int = 0
    from_cache: int = 0
    rules_written: str | None = None
    rules_snippet: str = ""
    figures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(
    manifest: Path,
    target: str,
    *,
    ensemble: str | None = None,
    step: float = 0.1,
    spaces: Sequence[str] = SPACES,
    metric: str = "macro_f1",
    val_split: str | None = None,
    test_split: str | None = None,
    val_fraction: float = 0.5,
    seed: int = 0,
    top: int = 10,
    write_rules_to: Path | None = None,
    rules_path: Path = DEFAULT_RULES,
    faces: str = "detect",
    batch: int = 16,
    token: str | None = None,
    timeout: float = 60.0,
    progress: bool = False,
    cache_dir: Path | None = None,
    bins: int = ECE_BINS,
    out: Path | None = None,
) -> WeightSearch:
    rows = read_manifest(manifest)
    rules, _ = load_rules(rules_path)
    try:
        name, current = rules.emotion.ensemble_rules(ensemble)
    except UnknownEnsemble:
        raise ManifestError(
            f"{rules_path} defines no ensemble {ensemble!r} (it defines "
            f"{', '.join(sorted(rules.emotion.ensembles))})"
        ) from None
    request = resolve_request(rules, "ensemble", name, faces)
    # Only the members' logits are needed: any cached answer of the same file counts, whatever
    # rules the gateway had when it gave it.
    answers, _ = fetch(
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
        need_served=False,
    )
    if not answers.labels:
        raise EvaluationError(f"no image of the {len(rows)} rows could be scored")
    names = [m.model for m in current.members]
    missing = [m for m in names if len(answers.members.get(m, ())) != len(answers.labels)]
    if missing:
        raise EvaluationError(f"the answers carry no logits for {', '.join(missing)}")
    labels = np.asarray(answers.labels, np.int64)
    members = {m: np.asarray(answers.members[m], np.float32) for m in names}
    val, test, how = split_rows(
        labels,
        [r.split for r in answers.rows],
        val_split=val_split,
        test_split=test_split,
        val_fraction=val_fraction,
        seed=seed,
    )
    ranked = search(
        {m: v[val] for m, v in members.items()},
        labels[val],
        step=step,
        spaces=spaces,
        metric=metric,
        bins=bins,
    )
    best = ranked[0]
    used = {m: w for m, w in best.weights.items() if w > 0}
    best_test = evaluate(
        fuse_logits({m: v[test] for m, v in members.items()}, used, best.temperature, best.space),
        labels[test],
        CLASS_NAMES,
        bins,
    )
    weights_now = members_for(rules.emotion, "ensemble", name)
    t_now = resolve_temperature(rules.emotion, "ensemble", None, name)
    test_members = {m: v[test] for m, v in members.items()}
    current_test = evaluate(
        fuse_logits(test_members, weights_now, t_now, current.fusion_space), labels[test], CLASS_NAMES, bins
    )
    t_refit = _fit(
        {m: v[val] for m, v in members.items()},
        weights_now,
        current.fusion_space,
        labels[val],
        TEMPERATURE_BOUNDS,
    )
    current_refit = evaluate(
        fuse_logits(test_members, weights_now, t_refit, current.fusion_space), labels[test], CLASS_NAMES, bins
    )
    total = sum(weights_now.values())
    note = (
        f"emotion.ensembles.{name}: weights searched by tessera-evaluate search-weights on {manifest.name} "
        f"({len(val)} validation faces, by {metric}), {dt.date.today().isoformat()}"
    )
    snippet = _snippet(name, best)
    result = WeightSearch(
        manifest=str(manifest),
        ensemble=name,
        members=names,
        metric=metric,
        step=step,
        spaces=list(spaces),
        split=how,
        validation_rows=len(val),
        test_rows=len(test),
        candidates=len(ranked),
        top=ranked[:top],
        best=best,
        best_test=best_test,
        current={
            "weights": {m: w / total for m, w in weights_now.items()},
            "fusion_space": current.fusion_space,
            "temperature": t_now,
            "refit_temperature": t_refit,
        },
        current_test=current_test,
        current_refit_test=current_refit,
        skipped=answers.skipped,
        rows=len(rows),
        from_cache=answers.from_cache,
        rules_snippet=snippet,
    )
    if best.temperature <= TEMPERATURE_BOUNDS[0] * 1.001 or best.temperature >= TEMPERATURE_BOUNDS[1] * 0.999:
        result.warnings.append(
            f"the best candidate's temperature {best.temperature:g} sits at the search bound: "
            "the validation rows are too few or too easy to calibrate on"
        )
    if len(val) < 50:
        result.warnings.append(f"only {len(val)} validation faces: the ranking is noisy")
    if write_rules_to is not None:
        write_rules(write_rules_to, rules_path, name, best.weights, best.space, best.temperature, note)
        result.rules_written = str(write_rules_to)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        shown = ranked[:top]
        result.figures["ranking"] = figures.ranked_bars(
            out / "weights-ranking.png",
            [_label(c) for c in shown],
            [c.macro_f1 if metric == "macro_f1" else c.nll for c in shown],
            xlabel=("macro-F1" if metric == "macro_f1" else "NLL") + " on validation",
            title=f"Ensemble {name}: the best {len(shown)} of {len(ranked)} candidates",
        ).name
        write_json(out / "report.json", result.to_dict())
        write_text(out / "report.md", format_markdown(result))
    return result


def _label(c: Candidate) -> str:
    return f"{c.space} " + " / ".join(f"{w:.2g}" for w in c.weights.values()) + f" T={c.temperature:.3g}"


def _snippet(name: str, best: Candidate) -> str:
    members = ", ".join(f"{{model: {m}, weight: {w:g}}}" for m, w in best.weights.items())
    return (
        f"emotion:\n  ensembles:\n    {name}:\n      members: [{members}]\n      fusion_space: {best.space}\n"
        f"      temperature: {round(best.temperature, 4):g}"
    )


def format_markdown(r: WeightSearch) -> str:
    head = ("rank", "space", *[f"w `{m}`" for m in r.members], "T", "accuracy", "macro-F1", "NLL", "ECE")
    rows = [
        [
            i + 1,
            c.space,
            *[f"{c.weights[m]:g}" for m in r.members],
            c.temperature,
            c.accuracy,
            c.macro_f1,
            c.nll,
            c.ece,
        ]
        for i, c in enumerate(r.top)
    ]
    metric = "macro-F1 (ties: lower NLL)" if r.metric == "macro_f1" else "NLL (ties: higher macro-F1)"
    test_head = ("ensemble", "T", "n", "accuracy", "macro-F1", "NLL", "ECE", "Brier")
    cur_w = " / ".join(f"{w:.3g}" for w in r.current["weights"].values())
    best_w = " / ".join(f"{r.best.weights[m]:.3g}" for m in r.members)

    def row(name: str, t: float, m: EvaluationReport) -> list[Any]:
        return [name, t, m.n, m.accuracy, m.macro_f1, m.nll, m.ece, m.brier]

    lines = [
        f"# Weight search: ensemble `{r.ensemble}` on `{r.manifest}`",
        "",
        f"- members: {', '.join(f'`{m}`' for m in r.members)}",
        (
            f"- grid: weights in steps of {r.step:g} on the simplex, spaces {', '.join(r.spaces)}: {r.candidates} "
            "candidates, each with its temperature fitted on the validation rows"
        ),
        f"- ranked by {metric} on {r.validation_rows} validation faces; reported on {r.test_rows} test faces",
        f"- split: {r.split}",
        f"- rows: {r.rows}; not scored {len(r.skipped)}; answers from the cache: {r.from_cache}",
        "",
        f"## Table 1. The best {len(r.top)} candidates on validation",
        "",
        md_table(head, rows, "rl" + "r" * (len(head) - 2)),
        "",
        "## Table 2. On the test rows",
        "",
        md_table(
            test_head,
            [
                row(
                    f"served now ({r.current['fusion_space']} {cur_w})",
                    r.current["temperature"],
                    r.current_test,
                ),
                row(
                    "served now, T refitted on validation",
                    r.current["refit_temperature"],
                    r.current_refit_test,
                ),
                row(f"best ({r.best.space} {best_w})", r.best.temperature, r.best_test),
            ],
            "lrrrrrrr",
        ),
        "",
        "## The rules that serve the best candidate",
        "",
        "```yaml",
        r.rules_snippet,
        "```",
    ]
    if r.rules_written:
        lines += [
            "",
            (
                f"Written into `{r.rules_written}` (validated by the gateway's schema; the gateway reloads "
                "it without a restart)."
            ),
        ]
    if r.figures:
        lines += ["", "## Figures", ""]
        for kind, name in r.figures.items():
            lines += [f"- {kind}: `{name}`", "", f"  ![{kind}]({name})", ""]
    if r.skipped:
        lines += ["", f"## Not scored ({len(r.skipped)})", "", skipped_table(r.skipped)]
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    return "\n".join(lines) + "\n"


__all__ = [
    "Candidate",
    "FusionRules",
    "WeightSearch",
    "run",
    "search",
    "simplex_grid",
    "split_rows",
    "updated_rules_text",
    "write_rules",
]
