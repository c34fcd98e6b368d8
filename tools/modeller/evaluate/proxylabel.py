"""``proxylabel``: the proxy-label models on a shard with known ``gpt_scores``: the kNN, the MLP and
their soft vote, and (``--sweep``) the research's ablation over K, tau, weighting and alpha with
k-fold cross-validation.

Offline, in process, on the models of a repository (``--repo``, the one the service serves: the
same files and the same code as ``services/proxylabel``), with the fusion rules file's kNN options
and alpha (``services.fusion.proxylabel``, what the gateway applies). Rows: the shard's labelled
rows (``gpt_scores`` 0-5); a row without an ``embedding`` is embedded by the repository's text
embedder; a row with an unusable embedding or no text is reported, not scored.

Figures per answer: accuracy, macro-F1 (over the scores present in the labels or the predictions,
as the shard jobs' summaries), MAE, per-class accuracy (the recall of each score), the confusion
matrix and the NLL. The kNN's label is its own (the vote's argmax, or the rounded weighted mean
under ``aggregation: regression``); the MLP's and the soft vote's are the argmax.

**The served index holds its labelled rows**: evaluated on them, each finds itself (similarity 1)
and the kNN looks far better than it is. The report counts such rows. ``--sweep`` does not have
the problem: each fold's rows are scored against an index built from the other folds only. The
MLP is not retrained per fold (its probabilities are the served MLP's): when it was trained on
these rows, its figures and the soft vote's are optimistic too.

Over 500 lines on purpose: the evaluation and the research's ablation sweep share the folds and the
scoring; the shared metrics and figures are already modules of their own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from services.fusion.proxylabel import final_labels, soft_vote
from services.fusion.rules import FusionRules, ProxyLabelRules, parse_rules
from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.features import Conversations
from services.proxylabel.knn import (
    NUM_CLASSES,
    KnnIndex,
    KnnOptions,
    KnnScores,
    class_priors,
    knn_labels,
    knn_probabilities,
    normalise,
)
from services.proxylabel.pipeline import embedding_problem, local_pipeline
from services.proxylabel.shards import EMBEDDING, ID, SCORES, conversations_of, open_shard, text_kind
from services.runtime.errors import ServingError
from tools.modeller.evaluate import figures
from tools.modeller.evaluate.common import (
    EvaluationError,
    ManifestError,
    Progress,
    Skipped,
    md_table,
    skipped_table,
    write_json,
    write_text,
)
from tools.modeller.evaluate.emotion import DEFAULT_RULES, load_rules
from tools.modeller.evaluate.metrics import LabelReport, label_report

SCORE_NAMES = tuple(str(s) for s in range(NUM_CLASSES))
SELF_MATCH = 0.9999
DEFAULT_KS = (10, 25, 50, 100)
DEFAULT_TAUS = (0.05, 0.1, 0.2)
DEFAULT_WEIGHTINGS = ("softmax", "power", "uniform")
DEFAULT_POWER_ALPHAS = (1.0, 2.0)
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
RANKS = ("accuracy", "macro_f1")


# Reading and scoring -------------------------------------------------------------------------------
@dataclass
class Labelled:
    """The shard's labelled, usable rows."""

    ids: list[str]
    lines: list[int]  # row number in the shard (0-based)
    labels: np.ndarray
    embeddings: np.ndarray  # L2-normalised
    conversations: Conversations
    skipped: list[Skipped]
    rows: int  # every row of the shard
    labelled: int  # rows with a score


async def read_labelled(path: Path, pipeline: Any, *, progress: bool = False, batch: int = 64) -> Labelled:
    """The labelled rows with their embeddings (the shard's, else the repository's embedder's)."""
    try:
        pf = open_shard(path)
        kind, columns = text_kind(pf.schema_arrow)
    except ServingError as exc:
        raise ManifestError(f"{path}: {exc.message}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read shard {path}: {exc}") from None
    names = set(pf.schema_arrow.names)
    if SCORES not in names:
        raise ManifestError(f"{path}: no {SCORES!r} column: the evaluation needs known scores (0-5)")
    wanted = [*columns, SCORES] + [c for c in (ID, EMBEDDING) if c in names]
    table = pf.read(columns=wanted)
    scores = table.column(SCORES).to_numpy(zero_copy_only=False).astype(np.float64)
    known = np.flatnonzero(np.isfinite(scores) & (scores >= 0) & (scores < NUM_CLASSES))
    if not len(known):
        raise ManifestError(f"{path}: no row has a score 0-5 in {SCORES!r}")
    table = table.take(pa.array(known))
    ids = [
        str(v) if v is not None else str(i)
        for v, i in zip(
            table.column(ID).to_pylist() if ID in names else [None] * len(known), known, strict=True
        )
    ]
    conv = conversations_of(table, kind)
    reasons = ["" for _ in known]
    user, assistant = conv.user.to_pylist(), conv.assistant.to_pylist()
    for j, (u, a) in enumerate(zip(user, assistant, strict=True)):
        if not ((u or "").strip() or (a or "").strip()):
            reasons[j] = "empty text"
    dim = pipeline.expected_embedder(True, True).dimension
    emb = np.zeros((len(known), dim), np.float32)
    todo = list(range(len(known)))
    if EMBEDDING in names:
        values = table.column(EMBEDDING).to_pylist()
        todo = []
        for j, v in enumerate(values):
            if not v:
                todo.append(j)  # no embedding: the embedder makes one
            elif len(v) != dim:
                reasons[j] = reasons[j] or f"embedding has {len(v)} values, the models take {dim}"
            else:
                emb[j] = np.asarray(v, np.float32)
        given = [j for j in range(len(known)) if j not in set(todo) and not reasons[j]]
        for j, problem in zip(given, embedding_problem(emb[given], dim) if given else [], strict=True):
            reasons[j] = reasons[j] or problem
    todo = [j for j in todo if not reasons[j]]
    if todo:
        problem = pipeline.embedder_problem(pipeline.expected_embedder(True, True))
        if problem:
            for j in todo:
                reasons[j] = problem
        else:
            texts = conv.rendered()
            with Progress(len(todo), "embedding rows", enabled=progress) as bar:
                for start in range(0, len(todo), batch):
                    part = todo[start : start + batch]
                    vectors = await pipeline.embed([texts[j] for j in part])
                    emb[part] = vectors
                    for j, p in zip(
                        part, embedding_problem(np.asarray(vectors, np.float32), dim), strict=True
                    ):
                        reasons[j] = reasons[j] or (f"the text embedder's {p}" if p else "")
                    bar.update(len(part))
    ok = np.array([not r for r in reasons], bool)
    skipped = [Skipped(int(known[j]), ids[j], "bad_row", reasons[j]) for j in np.flatnonzero(~ok)]
    keep = np.flatnonzero(ok)
    return Labelled(
        [ids[j] for j in keep],
        [int(known[j]) for j in keep],
        np.rint(scores[known][keep]).astype(np.int64),
        normalise(emb[keep]),
        conversations_of(table.take(pa.array(keep)), kind),
        skipped,
        pf.metadata.num_rows,
        len(known),
    )


# The sweep ---------------------------------------------------------------------------------------------
def kfold(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each fold: stratified by label, shuffled with the seed; every row in one fold."""
    if folds < 2:
        raise ValueError("k-fold cross-validation needs at least 2 folds")
    if folds > len(labels):
        raise ValueError(f"{folds} folds for {len(labels)} rows")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for i, row in enumerate(idx):
            parts[(offset + i) % folds].append(int(row))
        offset += len(idx)
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def knn_settings(
    ks: Sequence[int], taus: Sequence[float], weightings: Sequence[str], power_alphas: Sequence[float]
) -> list[KnnOptions]:
    out = []
    for w in weightings:
        if w == "softmax":
            out += [KnnOptions(k=k, tau=t, weighting="softmax") for k, t in itertools.product(ks, taus)]
        elif w == "power":
            out += [
                KnnOptions(k=k, power_alpha=a, weighting="power")
                for k, a in itertools.product(ks, power_alphas)
            ]
        elif w == "uniform":
            out += [KnnOptions(k=k, weighting="uniform") for k in ks]
        else:
            raise ValueError(f"unknown weighting {w!r}")
    return out


def describe(o: KnnOptions) -> str:
    extra = {"softmax": f", tau {o.tau:g}", "power": f", alpha {o.power_alpha:g}", "uniform": ""}[o.weighting]
    return f"K {o.k}, {o.weighting}{extra}"


def knn_rules_of(o: KnnOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"k": o.k, "weighting": o.weighting}
    if o.weighting == "softmax":
        out["tau"] = o.tau
    if o.weighting == "power":
        out["power_alpha"] = o.power_alpha
    return out


@dataclass
class Scored:
    accuracy: float
    macro_f1: float
    mae: float

    def key(self, rank: str) -> tuple[float, float]:
        return (-(self.accuracy if rank == "accuracy" else self.macro_f1), self.mae)


def _scored(pred: np.ndarray, y: np.ndarray) -> Scored:
    r = label_report(pred, y, SCORE_NAMES, ordinal=True)
    if r.mae is None:
        raise EvaluationError("an ordinal label report came without its MAE")
    return Scored(r.accuracy, r.macro_f1, r.mae)


@dataclass
class SettingResult:
    options: dict[str, Any]
    description: str
    knn: Scored
    best_alpha: float
    soft_vote: Scored
    by_alpha: list[Scored]


@dataclass
class Sweep:
    folds: int
    seed: int
    rank: str
    rows: int
    alphas: list[float]
    settings: list[SettingResult]  # best first (by the soft vote at its best alpha)
    best: SettingResult
    current: SettingResult  # the rules' kNN options and alpha, cross-validated the same way
    current_alpha: float
    mlp: Scored
    rules_snippet: str


FoldHook = Callable[[int, np.ndarray, np.ndarray, KnnIndex], None]


def out_of_fold_neighbours(
    embeddings: np.ndarray,
    labels: np.ndarray,
    embedder: EmbedderInfo,
    folds: list[np.ndarray],
    k_max: int,
    on_fold: FoldHook | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per row, the similarities [n, k_max] and labels [n, k_max] of its neighbours in an index of
    the other folds' rows only (label −1 where the index has fewer rows); and the priors of the
    index each row was scored against, per fold."""
    n = len(labels)
    sims = np.full((n, k_max), -np.inf, np.float32)
    neighbour_labels = np.full((n, k_max), -1, np.int64)
    priors = []
    everyone = np.arange(n)
    for f, test in enumerate(folds):
        train = np.setdiff1d(everyone, test)
        index = KnnIndex.build(embeddings[train], labels[train], embedder)
        if on_fold is not None:
            on_fold(f, train, test, index)
        s, idx = index.search(embeddings[test], k_max)
        k = s.shape[1]
        sims[test, :k] = s
        neighbour_labels[test, :k] = np.where(idx >= 0, labels[train][np.maximum(idx, 0)], -1)
        priors.append(class_priors(labels[train]))
    return sims, neighbour_labels, priors


def sweep(
    embeddings: np.ndarray,
    labels: np.ndarray,
    mlp: np.ndarray,
    embedder: EmbedderInfo,
    *,
    current: ProxyLabelRules,
    current_options: KnnOptions,
    folds: int = 5,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    taus: Sequence[float] = DEFAULT_TAUS,
    weightings: Sequence[str] = DEFAULT_WEIGHTINGS,
    power_alphas: Sequence[float] = DEFAULT_POWER_ALPHAS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    rank: str = "accuracy",
    on_fold: FoldHook | None = None,
) -> Sweep:
    """Cross-validated kNN (and soft vote with the served MLP's probabilities) for every setting."""
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}")
    fold_rows = kfold(labels, folds, seed)
    settings = knn_settings(ks, taus, weightings, power_alphas)
    now = current_options.model_copy(
        update={"aggregation": "vote", "similarity_threshold": None, "prior_calibration": False}
    )
    k_max = max([o.k for o in settings] + [now.k])
    sims, nl, priors = out_of_fold_neighbours(embeddings, labels, embedder, fold_rows, k_max, on_fold)
    alphas = [float(a) for a in alphas]

    def evaluate_setting(o: KnnOptions) -> SettingResult:
        probs = np.zeros((len(labels), NUM_CLASSES), np.float64)
        for test, prior in zip(fold_rows, priors, strict=True):
            probs[test] = knn_probabilities(sims[test, : o.k], nl[test, : o.k], o, prior).probabilities
        by_alpha = [_scored(np.argmax(a * mlp + (1 - a) * probs, axis=1), labels) for a in alphas]
        best = min(range(len(alphas)), key=lambda i: by_alpha[i].key(rank))
        return SettingResult(
            knn_rules_of(o),
            describe(o),
            _scored(np.argmax(probs, axis=1), labels),
            alphas[best],
            by_alpha[best],
            by_alpha,
        )

    results = sorted((evaluate_setting(o) for o in settings), key=lambda r: r.soft_vote.key(rank))
    best = results[0]
    mode = "knn" if best.best_alpha == 0 else "mlp" if best.best_alpha == 1 else "ensemble"
    knn = ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in best.options.items())
    snippet = f"proxylabel:\n  mode: {mode}\n  alpha: {best.best_alpha:g}\n  knn: {{{knn}}}"
    parse_rules(snippet, "the sweep's snippet")  # valid rules, by the gateway's schema
    cur = evaluate_setting(now)
    return Sweep(
        folds,
        seed,
        rank,
        len(labels),
        alphas,
        results,
        best,
        cur,
        current.alpha,
        _scored(np.argmax(mlp, axis=1), labels),
        snippet,
    )


# The command --------------------------------------------------------------------------------------------
@dataclass
class ProxyLabelEvaluation:
    shard: str
    repo: str
    rows: int
    labelled: int
    scored: int
    skipped: list[Skipped]
    models: dict[str, Any]
    rules_file: str
    rules_version: str
    mode: str
    alpha: float
    knn_options: dict[str, Any]
    metrics: dict[str, LabelReport]  # "knn", "mlp", "soft_vote"
    served_answer: str  # which of them the rules' mode serves
    self_matches: int  # rows whose nearest indexed neighbour is themselves (similarity ≥ 0.9999)
    sweep: Sweep | None = None
    figures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_rows(
    data: Labelled, knn_probs: np.ndarray, knn_own: np.ndarray, mlp: np.ndarray, rules: ProxyLabelRules
) -> dict[str, LabelReport]:
    fused = soft_vote(knn_probs, mlp, rules.model_copy(update={"mode": "ensemble"}))
    y = data.labels
    return {
        "knn": label_report(knn_own, y, SCORE_NAMES, ordinal=True, probs=knn_probs),
        "mlp": label_report(np.argmax(mlp, axis=1), y, SCORE_NAMES, ordinal=True, probs=mlp),
        "soft_vote": label_report(
            final_labels(fused, rules.model_copy(update={"mode": "ensemble"}))[0],
            y,
            SCORE_NAMES,
            ordinal=True,
            probs=fused,
        ),
    }


def run(
    shard: Path,
    *,
    repo: Path = Path("model_repository"),
    rules_path: Path = DEFAULT_RULES,
    do_sweep: bool = False,
    folds: int = 5,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    taus: Sequence[float] = DEFAULT_TAUS,
    weightings: Sequence[str] = DEFAULT_WEIGHTINGS,
    power_alphas: Sequence[float] = DEFAULT_POWER_ALPHAS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    rank: str = "accuracy",
    progress: bool = False,
    out: Path | None = None,
    on_fold: FoldHook | None = None,
) -> ProxyLabelEvaluation:
    rules, rules_version = load_rules(rules_path)
    if not shard.is_file():
        raise ManifestError(f"cannot read shard {shard}: no such file")
    if not repo.is_dir():
        raise ManifestError(f"--repo {repo}: no such folder")
    return asyncio.run(
        _run(
            shard,
            repo,
            rules,
            rules_version,
            rules_path,
            do_sweep=do_sweep,
            folds=folds,
            seed=seed,
            ks=ks,
            taus=taus,
            weightings=weightings,
            power_alphas=power_alphas,
            alphas=alphas,
            rank=rank,
            progress=progress,
            out=out,
            on_fold=on_fold,
        )
    )


async def _run(
    shard: Path,
    repo: Path,
    rules: FusionRules,
    rules_version: str,
    rules_path: Path,
    *,
    do_sweep: bool,
    folds: int,
    seed: int,
    ks: Sequence[int],
    taus: Sequence[float],
    weightings: Sequence[str],
    power_alphas: Sequence[float],
    alphas: Sequence[float],
    rank: str,
    progress: bool,
    out: Path | None,
    on_fold: FoldHook | None,
) -> ProxyLabelEvaluation:
    pr = rules.proxylabel
    async with local_pipeline(repo) as pipe:
        try:
            pipe.require(True, True, "the proxy-label evaluation")
        except ServingError as exc:
            raise EvaluationError(exc.message) from None
        index = pipe.knn
        if index is None:  # require() has refused a pipeline without one
            raise EvaluationError("the proxy-label evaluation needs the kNN index, which is not loaded")
        data = await read_labelled(shard, pipe, progress=progress)
        if not len(data.labels):
            raise EvaluationError(
                f"no labelled row of {shard} could be scored "
                f"({dict(Counter(s.message for s in data.skipped))})"
            )
        options = pipe.knn_options(pr.knn)
        knn_all: list[KnnScores] = []
        mlp_all: list[np.ndarray] = []
        with Progress(len(data.labels), "scoring rows", enabled=progress) as bar:
            for start in range(0, len(data.labels), 1024):
                sl = slice(start, start + 1024)
                conv = Conversations(
                    data.conversations.user[sl],
                    data.conversations.assistant[sl],
                    data.conversations.turns[sl],
                    data.conversations.user_turns[sl],
                )
                scores = await pipe.score(data.embeddings[sl], conv, options, True, True)
                if scores.knn is None or scores.mlp is None:
                    raise EvaluationError("the pipeline left out the kNN or MLP scores it was asked for")
                knn_all.append(scores.knn)
                mlp_all.append(scores.mlp)
                bar.update(len(conv))
        knn_probs = np.concatenate([k.probabilities for k in knn_all]).astype(np.float64)
        knn_own = np.concatenate([knn_labels(k, options) for k in knn_all])
        mlp = np.concatenate(mlp_all).astype(np.float64)
        top, _ = index.search(data.embeddings, 1)
        self_matches = int((top[:, 0] >= SELF_MATCH).sum())
        embedder = index.meta.embedder
        models = {m.name: {"version": m.version, "demo": m.demo} for m in pipe.models}
    metrics = evaluate_rows(data, knn_probs, knn_own, mlp, pr)
    ev = ProxyLabelEvaluation(
        shard=str(shard),
        repo=str(repo),
        rows=data.rows,
        labelled=data.labelled,
        scored=len(data.labels),
        skipped=data.skipped,
        models=models,
        rules_file=str(rules_path),
        rules_version=rules_version,
        mode=pr.mode,
        alpha=pr.alpha,
        knn_options=options.model_dump(),
        metrics=metrics,
        served_answer={"knn": "knn", "mlp": "mlp", "ensemble": "soft_vote"}[pr.mode],
        self_matches=self_matches,
    )
    if self_matches:
        ev.warnings.append(
            f"{self_matches} of {ev.scored} rows are in the served index (nearest neighbour "
            f"similarity ≥ {SELF_MATCH}): the kNN's and the soft vote's figures are optimistic; "
            "--sweep cross-validates without the problem"
        )
    if data.skipped:
        ev.warnings.append(f"{len(data.skipped)} labelled rows were not scored (listed under Not scored)")
    if do_sweep:
        ev.sweep = await asyncio.to_thread(
            sweep,
            data.embeddings,
            data.labels,
            mlp,
            embedder,
            current=pr,
            current_options=options,
            folds=folds,
            seed=seed,
            ks=ks,
            taus=taus,
            weightings=weightings,
            power_alphas=power_alphas,
            alphas=alphas,
            rank=rank,
            on_fold=on_fold,
        )
    if out is not None:
        write_outputs(ev, out)
    return ev


# Outputs ---------------------------------------------------------------------------------------------
ANSWER_NAMES = {"knn": "kNN", "mlp": "MLP", "soft_vote": "soft vote"}


def write_outputs(ev: ProxyLabelEvaluation, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ev.figures["confusion"] = figures.confusion_grid(
        out / "confusion-proxylabel.png",
        {ANSWER_NAMES[a]: np.asarray(r.confusion_matrix) for a, r in ev.metrics.items()},
        SCORE_NAMES,
        f"{ev.scored} labelled rows (rows: known score, columns: proxy label)",
    ).name
    first = next(iter(ev.metrics.values()))
    series = {
        "known": list(first.support.values()),
        **{ANSWER_NAMES[a]: list(r.predicted.values()) for a, r in ev.metrics.items()},
    }
    ev.figures["scores"] = figures.distribution_bars(
        out / "scores-proxylabel.png", {"scores": series}, SCORE_NAMES, "Known and predicted scores"
    ).name
    if ev.sweep is not None:
        s = ev.sweep
        ev.figures["alpha_sweep"] = figures.sweep_curves(
            out / "alpha-sweep.png",
            s.alphas,
            {
                f"best kNN ({s.best.description}) accuracy": [x.accuracy for x in s.best.by_alpha],
                "best kNN macro-F1": [x.macro_f1 for x in s.best.by_alpha],
                "rules now: accuracy": [x.accuracy for x in s.current.by_alpha],
                "rules now: macro-F1": [x.macro_f1 for x in s.current.by_alpha],
            },
            xlabel="alpha (the MLP's weight)",
            ylabel="cross-validated figure",
            title=f"Soft vote, {s.folds}-fold cross-validation",
            marks={"now": s.current_alpha},
        ).name
    write_json(out / "report.json", ev.to_dict())
    write_text(out / "report.md", format_markdown(ev))


def format_markdown(ev: ProxyLabelEvaluation) -> str:
    knn = ", ".join(f"{k} {v}" for k, v in ev.knn_options.items() if v is not None)
    models = ", ".join(
        f"{m} v{i['version']}" + (" (demo)" if i["demo"] else "") for m, i in ev.models.items()
    )
    lines = [
        f"# Proxy-label evaluation: `{ev.shard}`",
        "",
        f"- rows: {ev.rows}; labelled {ev.labelled}; scored {ev.scored}; not scored {len(ev.skipped)}",
        f"- models (offline, from `{ev.repo}`): {models}",
        (
            f"- rules `{ev.rules_file}` ({ev.rules_version}): mode **{ev.mode}** (the served answer is the "
            f"{ANSWER_NAMES[ev.served_answer]}), alpha {ev.alpha:g}; kNN: {knn}"
        ),
        f"- rows found in the served index (similarity ≥ {SELF_MATCH}): {ev.self_matches}",
        (
            "- macro-F1 over the scores present in the labels or the predictions; per-class accuracy is the "
            "recall of each score"
        ),
        "",
        "## Table 1. Overall",
        "",
        md_table(
            ("answer", "n", "accuracy", "macro-F1", "MAE", "NLL"),
            [
                [
                    ANSWER_NAMES[a] + (" (served)" if a == ev.served_answer else ""),
                    r.n,
                    r.accuracy,
                    r.macro_f1,
                    r.mae,
                    r.nll,
                ]
                for a, r in ev.metrics.items()
            ],
            "lrrrrr",
        ),
        "",
        "## Table 2. Accuracy per known score (recall)",
        "",
        md_table(
            ("answer", *SCORE_NAMES),
            [["support", *next(iter(ev.metrics.values())).support.values()]]
            + [[ANSWER_NAMES[a], *r.per_class_accuracy.values()] for a, r in ev.metrics.items()],
        ),
        "",
        "## Table 3. Confusion matrices (rows: known score, columns: proxy label)",
        "",
    ]
    for a, r in ev.metrics.items():
        lines += [
            f"**{ANSWER_NAMES[a]}**",
            "",
            md_table(
                ("known \\ label", *SCORE_NAMES),
                [[SCORE_NAMES[i], *row] for i, row in enumerate(r.confusion_matrix)],
            ),
            "",
        ]
    if ev.sweep is not None:
        s = ev.sweep
        top = s.settings[:15]
        lines += [
            (
                f"## Table 4. {s.folds}-fold cross-validation over the kNN options (best {len(top)} of "
                f"{len(s.settings)}, by the soft vote's {s.rank} at its best alpha)"
            ),
            "",
            (
                f"Each fold's {s.rows // s.folds}-odd rows are scored against an index of the other folds' rows "
                "only; the MLP's probabilities are the served MLP's (not retrained per fold)."
            ),
            "",
            md_table(
                (
                    "kNN",
                    "kNN accuracy",
                    "kNN macro-F1",
                    "kNN MAE",
                    "best alpha",
                    "soft vote accuracy",
                    "soft vote macro-F1",
                    "soft vote MAE",
                ),
                [
                    [
                        r.description,
                        r.knn.accuracy,
                        r.knn.macro_f1,
                        r.knn.mae,
                        f"{r.best_alpha:g}",
                        r.soft_vote.accuracy,
                        r.soft_vote.macro_f1,
                        r.soft_vote.mae,
                    ]
                    for r in top
                ]
                + [
                    [
                        f"rules now ({s.current.description}, alpha {s.current_alpha:g})",
                        s.current.knn.accuracy,
                        s.current.knn.macro_f1,
                        s.current.knn.mae,
                        f"{s.current_alpha:g}",
                        s.current.by_alpha[s.alphas.index(s.current_alpha)].accuracy
                        if s.current_alpha in s.alphas
                        else None,
                        s.current.by_alpha[s.alphas.index(s.current_alpha)].macro_f1
                        if s.current_alpha in s.alphas
                        else None,
                        s.current.by_alpha[s.alphas.index(s.current_alpha)].mae
                        if s.current_alpha in s.alphas
                        else None,
                    ]
                ],
            ),
            "",
            f"MLP alone: accuracy {s.mlp.accuracy:.4f}, macro-F1 {s.mlp.macro_f1:.4f}, MAE {s.mlp.mae:.4f}.",
            "",
            f"## Table 5. Soft vote by alpha, best kNN ({s.best.description})",
            "",
            md_table(
                ("alpha", "accuracy", "macro-F1", "MAE"),
                [
                    [f"{a:g}", x.accuracy, x.macro_f1, x.mae]
                    for a, x in zip(s.alphas, s.best.by_alpha, strict=True)
                ],
            ),
            "",
            "The rules that serve the best settings:",
            "",
            "```yaml",
            s.rules_snippet,
            "```",
            "",
        ]
    if ev.figures:
        lines += ["## Figures", ""]
        for kind, name in ev.figures.items():
            lines += [f"- {kind}: `{name}`", "", f"  ![{kind}]({name})", ""]
    if ev.skipped:
        lines += [
            f"## Not scored ({len(ev.skipped)})",
            "",
            "line = the row's number in the shard (from 0), path = its id",
            "",
            skipped_table(ev.skipped),
            "",
        ]
    if ev.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in ev.warnings]
    return "\n".join(lines) + "\n"


__all__ = [
    "Labelled",
    "ProxyLabelEvaluation",
    "Sweep",
    "kfold",
    "knn_settings",
    "out_of_fold_neighbours",
    "run",
    "sweep",
]
