"""tools.modeller.evaluate's searches on synthetic data with a known answer: the ensemble weight search, the
selective-fusion threshold sweep, the proxy-label k-fold sweep (never scoring a row against an index that holds
it); the rules they write; the answer cache; the commands' refusals of bad input (nothing sent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.suite import ROOT
from services.fusion.emotion import fuse_logits
from services.fusion.rules import AFFECTS, parse_rules
from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.knn import KnnIndex, KnnOptions
from tools.modeller.evaluate.__main__ import main
from tools.modeller.evaluate.common import AnswerCache
from tools.modeller.evaluate.engagement import sweep_thresholds
from tools.modeller.evaluate.proxylabel import kfold, sweep
from tools.modeller.evaluate.weights import search, simplex_grid, split_rows, updated_rules_text, write_rules

K = 7


# The weight search ----------------------------------------------------------------------------------
def test_simplex_grid() -> None:
    grid = simplex_grid(3, 0.1)
    assert grid.shape == (66, 3)  # C(10 + 2, 2)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert len({tuple(np.round(r, 6)) for r in grid}) == 66 and (grid >= 0).all()
    assert simplex_grid(2, 0.25).tolist() == [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]]
    assert simplex_grid(1, 0.1).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="divide 1"):
        simplex_grid(3, 0.3)


def _members_with_a_known_best(n: int = 700, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """0.6·a + 0.4·b is the clean signal (their noises cancel exactly); c is noise alone. Any other
    grid point keeps some noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    signal = 2.0 * np.eye(K)[y]
    noise = rng.normal(0, 3, (n, K))
    return {
        "a": (signal + noise).astype(np.float32),
        "b": (signal - 1.5 * noise).astype(np.float32),
        "c": rng.normal(0, 3, (n, K)).astype(np.float32),
    }, y


@pytest.mark.parametrize("metric", ["macro_f1", "nll"])
def test_weight_search_finds_the_known_best_weights(metric: str) -> None:
    members, y = _members_with_a_known_best()
    ranked = search(members, y, step=0.1, metric=metric)
    assert len(ranked) == 2 * 66
    best = ranked[0]
    assert best.space == "logit" and best.weights == {"a": 0.6, "b": 0.4, "c": 0.0}
    assert best.accuracy == 1.0 and best.macro_f1 == 1.0
    # The noisy members alone are far behind.
    alone = {tuple(c.weights.values()): c for c in ranked if c.space == "logit"}
    assert alone[(1.0, 0.0, 0.0)].accuracy < 0.9 and alone[(0.0, 0.0, 1.0)].accuracy < 0.3
    # Each candidate's temperature minimises its own NLL (a nudge either way is no better).
    for c in ranked[:5]:
        used = {m: w for m, w in c.weights.items() if w > 0}

        def nll(t: float, used: dict[str, float] = used, space: str = c.space) -> float:
            p = fuse_logits(members, used, t, space).astype(np.float64)
            return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))

        assert nll(c.temperature) <= min(nll(c.temperature * 1.05), nll(c.temperature / 1.05)) + 1e-9


def test_splits_from_the_split_column_or_stratified_at_random() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    val, test, how = split_rows(
        y, ["val", "test"] * 4, val_split=None, test_split=None, val_fraction=0.5, seed=0
    )
    assert val.tolist() == [0, 2, 4, 6] and test.tolist() == [1, 3, 5, 7] and "split column" in how
    val, test, how = split_rows(y, [None] * 8, val_split=None, test_split=None, val_fraction=0.5, seed=1)
    assert sorted([*val, *test]) == list(range(8)) and not set(val) & set(test) and "random" in how
    assert sorted(y[val]) == [0, 1, 2, 3]  # stratified: one of each pair
    again = split_rows(y, [None] * 8, val_split=None, test_split=None, val_fraction=0.5, seed=1)
    assert again[0].tolist() == val.tolist()  # seeded


def test_written_rules_are_valid_and_hold_the_weights(tmp_path: Path) -> None:
    text = updated_rules_text(
        (ROOT / "config" / "fusion_rules.yaml").read_text(),
        "pretrained",
        {"emotion_student": 0.2, "emotion_facex": 0.8, "emotion_pyemotion": 0.0},
        "prob",
        1.7345678,
        "a note",
    )
    rules, _ = parse_rules(text)
    _, ens = rules.emotion.ensemble_rules("pretrained")
    assert {m.model: m.weight for m in ens.members} == {
        "emotion_student": 0.2,
        "emotion_facex": 0.8,
        "emotion_pyemotion": 0.0,
    }
    assert ens.fusion_space == "prob" and ens.temperature == 1.7346
    assert (
        "research" in rules.emotion.ensembles
        and rules.engagement.affects["boredom"][0].confidence_above == 0.35
    )
    assert text.startswith("# Fusion rules") and "# a note" in text
    # The one-ensemble form becomes the named form.
    flat = "emotion:\n  default_mode: ensemble\n  members: [{model: a, weight: 1}, {model: b, weight: 1}]\n"
    rules, _ = parse_rules(updated_rules_text(flat, "research", {"a": 0.3, "b": 0.7}, "logit", 1.0, "n"))
    assert rules.emotion.ensemble == "research"
    assert {m.model: m.weight for m in rules.emotion.members} == {"a": 0.3, "b": 0.7}
    # write_rules replaces the file whole (from the file itself when it exists).
    target = tmp_path / "rules.yaml"
    target.write_text(flat)
    write_rules(
        target, ROOT / "config" / "fusion_rules.yaml", "research", {"a": 1.0, "b": 0.0}, "logit", 2.0, "n"
    )
    assert parse_rules(target.read_text())[0].emotion.ensembles["research"].temperature == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["rules.yaml"]


# The threshold sweep -------------------------------------------------------------------------------------
def _outputs_with_a_known_threshold(
    n: int = 400, seed: int = 1, best: float = 0.6
) -> tuple[list[dict], np.ndarray]:
    """The temporal network is right exactly when its confidence is above `best`, XGBoost exactly
    when it is not: selective fusion at `best` is right everywhere, any other threshold is not."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, (n, 4))
    outputs = []
    for i in range(n):
        out: dict[str, dict[str, np.ndarray]] = {"temporal": {}, "xgboost": {}}
        for j, affect in enumerate(AFFECTS):
            conf = rng.uniform(0.3, 1.0)
            right = conf > best
            t_level = truth[i, j] if right else (truth[i, j] + 1) % 4
            x_level = (truth[i, j] + 2) % 4 if right else truth[i, j]
            p = np.full(4, (1 - conf) / 3)
            p[t_level] = conf
            q = np.full(4, 0.1 / 3)
            q[x_level] = 0.9
            out["temporal"][affect], out["xgboost"][affect] = p, q
        outputs.append(out)
    return outputs, truth


def test_threshold_sweep_finds_the_known_best_threshold() -> None:
    outputs, truth = _outputs_with_a_known_threshold()
    rules = parse_rules("")[0].engagement
    s = sweep_thresholds(outputs, truth, rules)
    assert s.best == {a: 0.6 for a in AFFECTS}
    for a in AFFECTS:
        i = s.thresholds.index(0.6)
        assert s.macro_f1[a][i] == 1.0 and s.accuracy[a][i] == 1.0
        assert max(s.macro_f1[a][:i] + s.macro_f1[a][i + 1 :]) < 1.0
    assert s.current == {"engagement": None, "boredom": 0.35, "confusion": 0.35, "frustration": 0.35}
    snippet = parse_rules(s.snippet)[0].engagement
    assert all(
        snippet.affects[a][0].confidence_above == 0.6 and snippet.affects[a][1].use == "xgboost"
        for a in AFFECTS
    )


# The proxy-label sweep --------------------------------------------------------------------------------------
def test_kfold_partitions_every_row_once_stratified() -> None:
    y = np.repeat(np.arange(6), [30, 20, 10, 7, 5, 3])
    folds = kfold(y, 5, seed=3)
    rows = np.concatenate(folds)
    assert sorted(rows.tolist()) == list(range(len(y)))
    for c in range(6):  # each class spread over the folds as evenly as it can be
        counts = [int((y[f] == c).sum()) for f in folds]
        assert max(counts) - min(counts) <= 1
    assert [f.tolist() for f in kfold(y, 5, seed=3)] == [f.tolist() for f in folds]


def test_kfold_sweep_never_scores_a_row_against_an_index_that_holds_it() -> None:
    rng = np.random.default_rng(9)
    n, dim = 120, 16
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 6, n)  # labels with no relation to the embeddings
    mlp = np.full((n, 6), 1 / 6)
    embedder = EmbedderInfo(name="synthetic", dimension=dim)
    seen: list[int] = []

    def hook(fold: int, train: np.ndarray, test: np.ndarray, index: KnnIndex) -> None:
        assert not set(train) & set(test)
        held = index.index.reconstruct_n(0, index.index.ntotal)
        # No scored row's vector is in the index it is scored against.
        for row in test:
            assert not np.any(np.all(np.isclose(held, x[row], atol=1e-6), axis=1)), (
                f"row {row} is in fold {fold}'s index"
            )
        assert index.size == len(train)
        seen.extend(test.tolist())

    result = sweep(
        x,
        y,
        mlp,
        embedder,
        current=parse_rules("")[0].proxylabel,
        current_options=KnnOptions(k=1),
        folds=4,
        ks=(1,),
        weightings=("uniform",),
        alphas=(0.0,),
        on_fold=hook,
    )
    assert sorted(seen) == list(range(n))
    # With K = 1 a row that found itself would be right every time; out of fold it is chance.
    assert result.best.knn.accuracy < 0.4
    whole = KnnIndex.build(x, y, embedder)
    _, idx = whole.search(x, 1)
    assert np.mean(y[idx[:, 0]] == y) == 1.0  # what the served index, holding every row, would say


def test_sweep_snippet_is_valid_rules() -> None:
    rng = np.random.default_rng(10)
    n, dim = 90, 8
    quality = rng.integers(0, 6, n)
    centres = rng.normal(size=(6, dim))
    x = (centres[quality] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mlp = np.eye(6)[quality] * 0.5 + 0.5 / 6
    result = sweep(
        x,
        quality,
        mlp,
        EmbedderInfo(name="s", dimension=dim),
        current=parse_rules("")[0].proxylabel,
        current_options=KnnOptions(),
        folds=3,
        ks=(5, 10),
        taus=(0.1,),
        weightings=("softmax", "uniform"),
    )
    rules = parse_rules(result.rules_snippet)[0].proxylabel
    assert rules.alpha == result.best.best_alpha and rules.knn.k == result.best.options["k"]
    assert result.best.soft_vote.accuracy >= max(r.soft_vote.accuracy for r in result.settings)


# The cache -----------------------------------------------------------------------------------------------
def test_cache_resumes_and_never_keeps_transient_failures(tmp_path: Path) -> None:
    key = {"manifest_sha256": "m", "models": {"x": "1"}}
    cache = AnswerCache(tmp_path, "emotion", key)
    cache.put(
        [
            {"row": "2:a.png", "sha": "s1", "status": "ok", "probabilities": [1.0]},
            {
                "row": "3:b.png",
                "sha": "s2",
                "status": "skip",
                "skip_reason": "UNAVAILABLE",
                "message": "down",
            },
            {"row": "4:c.png", "sha": "s3", "status": "skip", "skip_reason": "no_face", "message": "none"},
        ]
    )
    with cache.path.open("a") as f:  # type: ignore[union-attr]
        f.write('{"row": "5:d.png", "sha": "s4", "sta')  # a line cut by a crash
    again = AnswerCache(tmp_path, "emotion", key)
    assert again.get("2:a.png", "s1")["probabilities"] == [1.0]
    assert again.get("2:a.png", "changed") is None  # the file changed on disk: asked again
    assert again.get("3:b.png", "s2") is None and again.get("4:c.png", "s3")["skip_reason"] == "no_face"
    assert again.get("5:d.png", "s4") is None
    other = AnswerCache(tmp_path, "emotion", {**key, "models": {"x": "2"}})  # another model version
    assert other.path != cache.path and other.get("2:a.png", "s1") is None
    header = json.loads(cache.path.read_text().splitlines()[0])  # type: ignore[union-attr]
    assert header["header"]["models"] == {"x": "1"}


# Bad input: exit 2, the message names the problem, nothing is sent (no gateway here) ------------------------
@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        ("engagement", "path,engagement,boredom,confusion\nc,1,2,3\n", "missing column(s) 'frustration'"),
        (
            "engagement",
            "path,engagement,boredom,confusion,frustration\nc,1,2,3,0\nd,1,4,0,0\n",
            "line 3: boredom level '4'",
        ),
        (
            "engagement",
            "path,engagement,boredom,confusion,frustration,fps\nc,1,2,3,0,-5\n",
            "line 2: fps '-5'",
        ),
        ("search-weights", "path,label\na.png,Happy\n", "defines no ensemble 'nope'"),
        ("export-softlabels", "path,label\na.png,Joy\n", "line 2: unknown label 'Joy'"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(
    tmp_path: Path, command: str, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(text)
    extra = {"search-weights": ["--ensemble", "nope"], "export-softlabels": ["--out", str(tmp_path / "o")]}
    args = [command, str(listing), "--gateway", "127.0.0.1:1", "--quiet", *extra.get(command, [])]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bad_thresholds_and_shards_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "clips.csv"
    listing.write_text("path,engagement,boredom,confusion,frustration\nc,1,2,3,0\n")
    assert main(["engagement", str(listing), "--sweep-threshold", "--thresholds", "0:2:0.5", "--quiet"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    shard = tmp_path / "s.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "response": ["b"]}), shard)
    assert main(["proxylabel", str(shard), "--quiet"]) == 2
    assert "no 'gpt_scores' column" in capsys.readouterr().err
    assert main(["proxylabel", str(tmp_path / "absent.parquet"), "--quiet"]) == 2
    assert "cannot read shard" in capsys.readouterr().err
    assert main(["search-weights", str(listing), "--step", "0.3"]) == 2
