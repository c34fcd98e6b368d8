"""Train the Fusion MLP (embedding ⊕ standardised v1 text features → six probabilities) and write
it to the repository as ONNX. Two trainers, one output:

- `--trainer torch` (the default, `train-mlp` of the modeller's tools): PyTorch, seeded, early
  stopping on a held-out split, exported with torch.onnx (tools/modeller/proxylabel/train_mlp_torch.py;
  needs `make install-export`);
- `--trainer sklearn`: scikit-learn, ONNX built with `onnx.helper` (no torch; what `make demo` uses).

    <repo>/proxylabel_mlp/config.pbtxt
    <repo>/proxylabel_mlp/1/model.onnx     input `features` [batch, dim + 35], output `probabilities` [batch, 6]
    <repo>/proxylabel_mlp/1/mlp.json       feature version and names, mean/std, embedder name/dimension

The graph is Gemm → Relu → … → Gemm → Softmax (the same arithmetic as `MLPClassifier.predict_proba`
or the torch network); the ONNX output is checked against the trainer's before anything is written.

    tessera-train-mlp --repo model_repository labelled-*.parquet [--trainer sklearn]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.features import FeatureStats, compute_features
from services.proxylabel.knn import NUM_CLASSES
from services.proxylabel.pipeline import MLP_META_FILE, MlpMeta
from services.runtime.model_files import (
    IR_VERSION,
    OPSET,
    Batching,
    ModelSpec,
    Tensor,
    write_atomic,
    write_config,
)
from tools.modeller.proxylabel.build_index import labelled_rows
from tools.modeller.proxylabel.fusion_mlp import (
    ABSENT_CLASS_BIAS,
    INPUT_NAME,
    OUTPUT_NAME,
    design_matrix,
    onnx_probabilities,
)

if TYPE_CHECKING:  # torch is optional: imported only when --trainer torch runs
    from tools.modeller.proxylabel.train_mlp_torch import TorchTrainConfig

MODEL_NAME = "proxylabel_mlp"
MAX_BATCH_SIZE = 256


def mlp_to_onnx(clf: object, input_dim: int) -> onnx.ModelProto:
    """The fitted MLPClassifier (relu hidden layers, softmax output) as an ONNX graph."""
    if getattr(clf, "activation", None) != "relu" or getattr(clf, "out_activation_", None) != "softmax":
        raise ValueError("only relu MLPs with a softmax output (3+ classes) are converted")
    classes = [int(c) for c in clf.classes_]  # type: ignore[attr-defined]
    inits, nodes = [], []
    x = INPUT_NAME
    layers = list(zip(clf.coefs_, clf.intercepts_, strict=True))  # type: ignore[attr-defined]
    for i, (w, b) in enumerate(layers):
        w, b = np.asarray(w, np.float32), np.asarray(b, np.float32)
        if i == len(layers) - 1:
            # Scatter the fitted classes into the six scores; absent scores get probability 0.
            full_w = np.zeros((w.shape[0], NUM_CLASSES), np.float32)
            full_b = np.full(NUM_CLASSES, ABSENT_CLASS_BIAS, np.float32)
            full_w[:, classes], full_b[classes] = w, b
            w, b = full_w, full_b
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        out = f"h{i}" if i < len(layers) - 1 else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], [out], name=f"gemm{i}"))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"], name=f"relu{i}"))
            out = f"{out}_relu"
        x = out
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1, name="softmax"))
    graph = helper.make_graph(
        nodes,
        "proxylabel_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", input_dim])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tessera")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def sklearn_probabilities(clf: object, x: np.ndarray) -> np.ndarray:
    """predict_proba spread over the six scores (absent scores 0)."""
    p = clf.predict_proba(x)  # type: ignore[attr-defined]
    out = np.zeros((len(x), NUM_CLASSES))
    out[:, [int(c) for c in clf.classes_]] = p  # type: ignore[attr-defined]
    return out


def train_mlp(
    embeddings: np.ndarray,
    raw_features: np.ndarray,
    labels: np.ndarray,
    embedder: EmbedderInfo,
    *,
    hidden: Sequence[int] = (128,),
    seed: int = 0,
    max_iter: int = 200,
    demo: bool = False,
    atol: float = 1e-5,
    patience: int = 15,
    validation_fraction: float = 0.15,
) -> tuple[onnx.ModelProto, MlpMeta]:
    """Fit, convert, and check the ONNX graph equals predict_proba on the training rows."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    stats = FeatureStats.fit(raw_features)
    x = design_matrix(embeddings, raw_features, stats)
    batch_size = min(256, int(len(x) * (1 - validation_fraction)))
    clf = MLPClassifier(
        hidden_layer_sizes=tuple(hidden),
        activation="relu",
        alpha=1e-3,
        batch_size=batch_size,
        learning_rate_init=1e-3,
        max_iter=max_iter,
        early_stopping=True,
        validation_fraction=validation_fraction,
        n_iter_no_change=patience,
        random_state=seed,
    )
    with warnings.catch_warnings():
        # Early stopping or max_iter ends the demo's short runs; that is the point, not a problem.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, np.asarray(labels, np.int64))
    model = mlp_to_onnx(clf, x.shape[1])
    got, want = onnx_probabilities(model, x), sklearn_probabilities(clf, x)
    if not np.allclose(got, want, atol=atol):
        raise RuntimeError(f"ONNX MLP differs from scikit-learn by {np.abs(got - want).max():.2e}")
    meta = MlpMeta(features=stats, embedder=embedder, hidden_layers=list(hidden), demo=demo)
    return model, meta


def model_spec(input_dim: int, demo: bool, name: str = MODEL_NAME) -> ModelSpec:
    """The MLP's config: the design-matrix row in, the six probabilities out, dynamic batching."""
    return ModelSpec(
        name=name,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[Tensor(INPUT_NAME, (input_dim,))],
        outputs=[Tensor(OUTPUT_NAME, (NUM_CLASSES,))],
        batching=Batching(max_queue_delay_us=1000),
        parameters={"demo": str(demo).lower(), "feature_version": "v1"},
    )


def write_mlp(
    repo: Path, model: onnx.ModelProto, meta: MlpMeta, version: int = 1, name: str = MODEL_NAME
) -> Path:
    model_dir = Path(repo) / name
    write_atomic(model_dir / str(version) / "model.onnx", model.SerializeToString())
    write_atomic(model_dir / str(version) / MLP_META_FILE, json.dumps(meta.model_dump(), indent=2) + "\n")
    write_config(model_dir, model_spec(meta.input_dimension, meta.demo, name))
    return model_dir


# TorchTrainConfig fields the command line sets only for the torch trainer (defaults: the dataclass's).
TORCH_ONLY = {"dropout": float, "lr": float, "weight_decay": float, "batch_size": int}
TORCH_MISSING = (
    "--trainer torch needs PyTorch, which is not installed: install the modeller's extra with "
    "`make install-export`, or train with scikit-learn: --trainer sklearn"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera-train-mlp", description=__doc__.splitlines()[0])
    p.add_argument("shards", nargs="+", type=Path, help="parquet shards; rows with gpt_scores are used")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--embedder", help="embedder name (default: the shards' tessera.embedder metadata)")
    p.add_argument(
        "--trainer",
        choices=("torch", "sklearn"),
        default="torch",
        help="torch: early stopping on a held-out split (needs `make install-export`); sklearn: no torch",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[128])
    p.add_argument("--seed", type=int, default=0)
    # Both trainers count passes over the training rows; --max-iter is scikit-learn's name for it.
    p.add_argument("--max-epochs", "--max-iter", dest="max_epochs", type=int, default=200)
    p.add_argument(
        "--patience", type=int, default=15, help="epochs without a lower held-out loss before stopping"
    )
    p.add_argument(
        "--validation-fraction", type=float, default=0.15, help="share of rows held out for stopping"
    )
    # No defaults here, so a scikit-learn run can refuse what it would otherwise ignore.
    torch_only = p.add_argument_group("torch trainer (defaults: TorchTrainConfig)")
    for name, kind in TORCH_ONLY.items():
        torch_only.add_argument(f"--{name.replace('_', '-')}", type=kind)
    p.add_argument("--demo", action="store_true")
    return p


def _torch_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> TorchTrainConfig:
    """The TorchTrainConfig of the command line; a usage error when torch is missing or a value is bad."""
    try:
        from tools.modeller.proxylabel.train_mlp_torch import TorchTrainConfig
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        p.error(TORCH_MISSING)
    knobs = {k: getattr(args, k) for k in TORCH_ONLY if getattr(args, k) is not None}
    try:
        return TorchTrainConfig(
            hidden=tuple(args.hidden),
            seed=args.seed,
            max_epochs=args.max_epochs,
            patience=args.patience,
            validation_fraction=args.validation_fraction,
            **knobs,
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in TORCH_ONLY if getattr(args, k) is not None]
    if args.trainer == "sklearn" and given:
        p.error(f"{', '.join(given)}: only for --trainer torch")
    # Before reading the shards: a missing torch or a bad value should not cost a pass over them.
    config = _torch_config(p, args) if args.trainer == "torch" else None
    rows = labelled_rows(args.shards, args.embedder)
    raw = compute_features(rows.conversations)
    if config is not None:
        from tools.modeller.proxylabel.train_mlp_torch import train_mlp_torch

        model, meta, report = train_mlp_torch(
            rows.embeddings, raw, rows.labels, rows.embedder, config, demo=args.demo
        )
        print(f"torch: {report.summary()}")
    else:
        model, meta = train_mlp(
            rows.embeddings,
            raw,
            rows.labels,
            rows.embedder,
            hidden=args.hidden,
            seed=args.seed,
            max_iter=args.max_epochs,
            demo=args.demo,
            patience=args.patience,
            validation_fraction=args.validation_fraction,
        )
    path = write_mlp(args.repo, model, meta)
    print(f"{path}: MLP ({args.trainer}) on {len(rows.labels)} labelled rows, input {meta.input_dimension}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
