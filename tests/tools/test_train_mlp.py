"""`train-mlp`: the PyTorch trainer (seeded, early stopping on a held-out split, ONNX equal to
torch) and the command line's two trainers writing an entry the proxylabel service loads.

Small generated shards (16-d synthetic embeddings, a few hundred rows) keep every test fast.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from onnx import numpy_helper

from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.features import Conversations, FeatureStats, compute_features
from services.proxylabel.knn import NUM_CLASSES, KnnOptions
from services.proxylabel.pipeline import MLP_META_FILE, MlpMeta, local_pipeline
from services.runtime.model_files import IR_VERSION
from services.runtime.repository import ModelRepository
from tools.modeller.proxylabel import train_mlp as cli
from tools.modeller.proxylabel.build_index import LabelledRows, labelled_rows
from tools.modeller.proxylabel.generate import write_shard
from tools.modeller.proxylabel.train_mlp import MODEL_NAME, design_matrix, onnx_probabilities, write_mlp

DIM = 16


@pytest.fixture(scope="module")
def tm() -> ModuleType:
    """The torch trainer module (the test is skipped without torch)."""
    pytest.importorskip("torch")
    from tools.modeller.proxylabel import train_mlp_torch

    return train_mlp_torch


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-mlp")
    train = write_shard(
        root / "train.parquet", 500, dimension=DIM, labelled_fraction=1.0, seed=3, row_group_rows=250
    )
    fresh = write_shard(
        root / "fresh.parquet", 300, dimension=DIM, labelled_fraction=1.0, seed=4, row_group_rows=300
    )
    return {"train": train, "fresh": fresh, "no5": without_score(train, 5, root / "no5.parquet")}


def without_score(source: Path, score: int, out: Path) -> Path:
    """The shard with `score`'s rows unlabelled, so the training labels lack that score."""
    table = pq.read_table(source)
    scores = table.column("gpt_scores")
    dropped = pc.if_else(pc.equal(scores, score), pa.scalar(None, scores.type), scores)
    pq.write_table(table.set_column(table.schema.get_field_index("gpt_scores"), "gpt_scores", dropped), out)
    return out


@pytest.fixture(scope="module")
def train_rows(shards: dict[str, Path]) -> tuple[LabelledRows, np.ndarray]:
    rows = labelled_rows([shards["train"]])
    return rows, compute_features(rows.conversations)


@pytest.fixture(scope="module")
def fresh_rows(shards: dict[str, Path]) -> tuple[LabelledRows, np.ndarray]:
    rows = labelled_rows([shards["fresh"]])
    return rows, compute_features(rows.conversations)


def cross_entropy(p: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


# ---------------------------------------------------------------------------------------------
# The torch trainer


@pytest.mark.torch
def test_written_onnx_equals_torch_on_fresh_rows(
    tm: ModuleType, train_rows, fresh_rows, tmp_path: Path
) -> None:
    rows, raw = train_rows
    config = tm.TorchTrainConfig(hidden=(32, 16), dropout=0.2, max_epochs=15, seed=5)
    train_idx, val_idx = tm.held_out_split(rows.labels, config.validation_fraction, config.seed)
    stats = FeatureStats.fit(raw[train_idx])
    net, _ = tm.fit_network(
        design_matrix(rows.embeddings, raw, stats), rows.labels, train_idx, val_idx, config
    )
    meta = MlpMeta(features=stats, embedder=rows.embedder, hidden_layers=list(config.hidden))
    model_dir = write_mlp(tmp_path, tm.export_onnx(net, meta.input_dimension), meta)

    written = onnx.load(str(model_dir / "1" / "model.onnx"))
    # The service's names and shapes; dropout is gone from the eval-mode graph.
    assert [i.name for i in written.graph.input] == ["features"]
    assert [o.name for o in written.graph.output] == ["probabilities"]
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (written.graph.input[0], written.graph.output[0])
    ]
    assert dims == [["batch", meta.input_dimension], ["batch", NUM_CLASSES]]
    assert {n.op_type for n in written.graph.node} <= {"Gemm", "Relu", "Softmax"}
    assert written.ir_version <= IR_VERSION

    fresh, fresh_raw = fresh_rows
    x = design_matrix(fresh.embeddings, fresh_raw, stats)
    np.testing.assert_allclose(
        onnx_probabilities(written, x), tm.torch_probabilities(net, x), atol=1e-5, rtol=0
    )


@pytest.mark.torch
def test_same_seed_same_model_other_seed_other_model(tm: ModuleType, train_rows, fresh_rows) -> None:
    import torch

    rows, raw = train_rows
    args = (rows.embeddings, raw, rows.labels, rows.embedder)
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.random.get_rng_state(),
    )
    runs = [tm.train_mlp_torch(*args, hidden=(16,), max_epochs=8, seed=seed) for seed in (0, 0, 1)]
    # The caller's torch state is left as it was.
    after = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.random.get_rng_state(),
    )
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])

    weights = [[numpy_helper.to_array(t).tobytes() for t in model.graph.initializer] for model, _, _ in runs]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    fresh, fresh_raw = fresh_rows
    probs = [
        onnx_probabilities(model, design_matrix(fresh.embeddings, fresh_raw, meta.features))
        for model, meta, _ in runs
    ]
    np.testing.assert_array_equal(probs[0], probs[1])
    assert np.abs(probs[0] - probs[2]).max() > 1e-3
    assert runs[0][2].val_losses == runs[1][2].val_losses


@pytest.mark.torch
def test_early_stopping_keeps_the_best_epoch(tm: ModuleType) -> None:
    rng = np.random.default_rng(0)
    n = 300
    # Pure noise: the held-out loss can only get worse once the network starts memorising.
    embeddings, raw, labels = (
        rng.standard_normal((n, DIM)),
        rng.standard_normal((n, 35)),
        rng.integers(0, 5, n),
    )
    config = tm.TorchTrainConfig(hidden=(64,), lr=1e-2, batch_size=64, patience=3, max_epochs=200, seed=2)
    model, meta, report = tm.train_mlp_torch(
        embeddings, raw, labels, EmbedderInfo(name="noise", dimension=DIM), config
    )

    assert report.stopped_early and report.epochs_run < config.max_epochs
    assert report.epochs_run == report.best_epoch + config.patience == len(report.val_losses)
    assert min(report.val_losses) == pytest.approx(report.best_val_loss, rel=1e-5)
    assert report.val_losses[report.best_epoch - 1] == pytest.approx(report.best_val_loss, rel=1e-5)
    assert report.val_losses[-1] > report.best_val_loss + 1e-3
    # The returned graph is the best epoch's: its loss on the same held-out rows is the best loss.
    _, val_idx = tm.held_out_split(labels, config.validation_fraction, config.seed)
    p = onnx_probabilities(model, design_matrix(embeddings, raw, meta.features))
    assert cross_entropy(p[val_idx], labels[val_idx]) == pytest.approx(report.best_val_loss, rel=1e-4)
    assert report.val_accuracy == pytest.approx(np.mean(p[val_idx].argmax(axis=1) == labels[val_idx]))
    # Score 5 never occurs in the labels: probability 0.
    assert p[:, 5].max() < 1e-12


@pytest.mark.torch
def test_held_out_split_is_stratified_when_it_can_be(tm: ModuleType) -> None:
    labels = np.repeat(np.arange(5), [40, 30, 20, 8, 2])
    train, val = tm.held_out_split(labels, 0.25, seed=0)
    assert sorted(np.concatenate([train, val])) == list(range(len(labels)))
    assert set(labels[val]) == set(labels[train]) == set(range(5))
    np.testing.assert_array_equal(val, tm.held_out_split(labels, 0.25, seed=0)[1])
    # A score with one row cannot be in both parts: a plain random split of the requested size.
    single = np.append(labels, 5)
    train, val = tm.held_out_split(single, 0.25, seed=0)
    assert len(val) == round(len(single) * 0.25) and len(np.intersect1d(train, val)) == 0


@pytest.mark.torch
def test_the_mlp_learns_the_signal(tm: ModuleType, train_rows, fresh_rows) -> None:
    rows, raw = train_rows
    model, meta, report = tm.train_mlp_torch(
        rows.embeddings,
        raw,
        rows.labels,
        rows.embedder,
        hidden=(32,),
        lr=1e-2,
        max_epochs=60,
        patience=10,
        seed=0,
    )
    fresh, fresh_raw = fresh_rows
    p = onnx_probabilities(model, design_matrix(fresh.embeddings, fresh_raw, meta.features))
    accuracy = float(np.mean(p.argmax(axis=1) == fresh.labels))
    majority = np.bincount(fresh.labels).max() / len(fresh.labels)
    assert accuracy > majority + 0.15, (accuracy, majority, report.summary())
    assert report.val_accuracy > majority + 0.15


# ---------------------------------------------------------------------------------------------
# The command line, through the service's loader


async def served_probabilities(
    repo: Path, embeddings: np.ndarray, conversations: Conversations
) -> np.ndarray:
    """The MLP's probabilities as the proxylabel service computes them (repository → ONNX backend)."""
    async with local_pipeline(repo) as pipeline:
        assert pipeline.mlp is not None, "the service did not load the MLP"
        assert [m.demo for m in pipeline.models if m.name == MODEL_NAME] == [True]
        scores = await pipeline.score(embeddings, conversations, KnnOptions(), run_knn=False, run_mlp=True)
        assert scores.mlp is not None
        return scores.mlp


@pytest.mark.parametrize("trainer", [pytest.param("torch", marks=pytest.mark.torch), "sklearn"])
def test_cli_writes_an_entry_the_service_serves(
    trainer: str, shards, fresh_rows, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if trainer == "torch":
        pytest.importorskip("torch")
    repo = tmp_path / "repo"
    # --max-iter is the scikit-learn spelling of --max-epochs; both must keep working.
    epochs = ["--max-epochs", "30"] if trainer == "torch" else ["--max-iter", "30"]
    assert (
        cli.main(
            [
                str(shards["no5"]),
                "--repo",
                str(repo),
                "--trainer",
                trainer,
                "--hidden",
                "16",
                *epochs,
                "--patience",
                "5",
                "--validation-fraction",
                "0.2",
                "--demo",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"MLP ({trainer})" in out
    if trainer == "torch":
        assert "held-out loss" in out and "best epoch" in out

    entry = repo / MODEL_NAME
    meta = MlpMeta.model_validate_json((entry / "1" / MLP_META_FILE).read_text())
    assert meta.demo and meta.embedder.dimension == DIM and meta.hidden_layers == [16]
    config = ModelRepository(repo).get(MODEL_NAME).config
    assert config is not None and list(config.input[0].dims) == [meta.input_dimension]

    fresh, fresh_raw = fresh_rows
    served = asyncio.run(served_probabilities(repo, fresh.embeddings, fresh.conversations))
    assert served.shape == (len(fresh.labels), NUM_CLASSES)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    assert served[:, 5].max() < 1e-6  # score 5 was not in the training labels
    # The service standardises with the written statistics, as training did.
    direct = onnx_probabilities(
        onnx.load(str(entry / "1" / "model.onnx")), design_matrix(fresh.embeddings, fresh_raw, meta.features)
    )
    np.testing.assert_allclose(served, direct, atol=1e-5, rtol=0)


def test_cli_without_torch_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As if torch were not installed (None in sys.modules makes its import fail).
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "tools.modeller.proxylabel.train_mlp_torch", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(tmp_path / "unread.parquet"), "--repo", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "make install-export" in err and "--trainer sklearn" in err


def test_cli_refuses_torch_options_for_sklearn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path / "unread.parquet"), "--trainer", "sklearn", "--dropout", "0.1"])
    assert "--dropout: only for --trainer torch" in capsys.readouterr().err
