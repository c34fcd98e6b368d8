"""`train-mlp` with PyTorch: the Fusion MLP (embedding ⊕ standardised v1 text features → six
probabilities), seeded, with early stopping on a held-out split, exported to ONNX.

The input is the scikit-learn trainer's (`fusion_mlp.design_matrix`) and the output the same
repository entry (`train_mlp.write_mlp`): input `features` [batch, dim + 35], output
`probabilities` [batch, 6]. The graph is Gemm → Relu → … → Gemm → Softmax; a score absent from
the labels gets a logit bias of -1e9, so its probability is 0. ONNX Runtime's output is checked
against torch's before anything is returned.

Torch is the modeller's extra (`make install-export`); the services never import this module.

    tessera-train-mlp --trainer torch --repo model_repository labelled-*.parquet
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from services.proxylabel.embedder import EmbedderInfo
from services.proxylabel.features import FeatureStats
from services.proxylabel.knn import NUM_CLASSES
from services.proxylabel.pipeline import MlpMeta
from services.runtime.model_files import IR_VERSION, OPSET
from tools.modeller.proxylabel.fusion_mlp import (
    ABSENT_CLASS_BIAS,
    INPUT_NAME,
    OUTPUT_NAME,
    design_matrix,
    onnx_probabilities,
)


@dataclass(frozen=True)
class TorchTrainConfig:
    hidden: tuple[int, ...] = (128,)
    seed: int = 0
    max_epochs: int = 200
    # Epochs without a lower held-out loss before training stops (the best epoch's weights are kept).
    patience: int = 15
    validation_fraction: float = 0.15
    lr: float = 1e-3
    # AdamW's decoupled decay; about what scikit-learn's alpha=1e-3 does to the same network.
    weight_decay: float = 1e-4
    batch_size: int = 256
    dropout: float = 0.0
    # One thread: a small MLP gains little from more, and the result then does not depend on the core count.
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))  # a list from argparse
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive, got {self.hidden}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("max_epochs, patience, batch_size and threads must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainReport:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    val_accuracy: float
    train_rows: int
    val_rows: int
    max_epochs: int
    seconds: float
    # Held-out loss after each epoch run (the learning curve; the best is best_epoch's).
    val_losses: tuple[float, ...] = ()

    @property
    def stopped_early(self) -> bool:
        return self.epochs_run < self.max_epochs

    def summary(self) -> str:
        ending = "stopped early" if self.stopped_early else "ran to max epochs"
        return (
            f"{self.epochs_run} epochs ({ending}), best epoch {self.best_epoch}: held-out loss "
            f"{self.best_val_loss:.4f}, accuracy {self.val_accuracy:.3f} on {self.val_rows} rows "
            f"(trained on {self.train_rows}) in {self.seconds:.1f}s"
        )


# ---------------------------------------------------------------------------------------------
# Data


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices, sorted. Stratified when every present score has 2+ rows,
    so each score is in both parts; otherwise a plain random split."""
    labels = np.asarray(labels)
    if len(labels) < 2:
        raise ValueError(f"need at least 2 labelled rows for a held-out split, got {len(labels)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() >= 2:
        parts = []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            parts.append(idx[: min(len(idx) - 1, max(1, round(len(idx) * fraction)))])
        val = np.sort(np.concatenate(parts))
    else:
        val = np.sort(
            rng.permutation(len(labels))[: min(len(labels) - 1, max(1, round(len(labels) * fraction)))]
        )
    return np.setdiff1d(np.arange(len(labels)), val), val


def absent_mask(labels: np.ndarray) -> torch.Tensor:
    """Added to the logits while training: scores with no labelled row can never win."""
    mask = torch.full((NUM_CLASSES,), ABSENT_CLASS_BIAS)
    mask[np.unique(labels).tolist()] = 0.0
    return mask


# ---------------------------------------------------------------------------------------------
# Training


@contextmanager
def torch_settings(config: TorchTrainConfig) -> Iterator[None]:
    """Seeded, deterministic, fixed thread count; the caller's torch state is restored after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def build_network(input_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear → ReLU (→ Dropout) … → Linear, six logits."""
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


def _evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    net.eval()
    with torch.no_grad():
        logits = net(x) + mask
        return F.cross_entropy(logits, y).item(), (logits.argmax(dim=1) == y).float().mean().item()


def _train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    net.train()
    order = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        batch = order[i : i + batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[batch]) + mask, y[batch]).backward()
        opt.step()


def _fold_mask(net: nn.Sequential, labels: np.ndarray) -> None:
    """Put the absent scores' -1e9 into the last layer, so the exported graph needs no mask."""
    absent = [c for c in range(NUM_CLASSES) if c not in set(np.unique(labels).tolist())]
    last = net[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight[absent] = 0.0
        last.bias[absent] = ABSENT_CLASS_BIAS


def fit_network(
    x: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, config: TorchTrainConfig
) -> tuple[nn.Sequential, TrainReport]:
    """Train on the `train_idx` rows of the design matrix, stop when the `val_idx` rows' loss has
    not improved for `patience` epochs, and return the best epoch's network (eval mode)."""
    start = time.perf_counter()
    labels = np.asarray(labels, np.int64)
    with torch_settings(config):
        net = build_network(x.shape[1], config.hidden, config.dropout)
        mask = absent_mask(labels)
        xt, yt = (
            torch.from_numpy(np.ascontiguousarray(x[train_idx], np.float32)),
            torch.from_numpy(labels[train_idx]),
        )
        xv, yv = (
            torch.from_numpy(np.ascontiguousarray(x[val_idx], np.float32)),
            torch.from_numpy(labels[val_idx]),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # Shuffling has its own generator: dropout draws from the global one and must not shift it.
        generator = torch.Generator().manual_seed(config.seed)
        best_loss, best_epoch, best_state, losses = float("inf"), 0, None, []
        for epoch in range(1, config.max_epochs + 1):
            _train_epoch(net, opt, xt, yt, mask, min(config.batch_size, len(xt)), generator)
            loss, _ = _evaluate(net, xv, yv, mask)
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_epoch = loss, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            elif epoch - best_epoch >= config.patience:
                break
        if best_state is None:
            raise RuntimeError("the held-out loss was never finite: check the features for NaN or inf")
        net.load_state_dict(best_state)
        _fold_mask(net, labels)
        loss, accuracy = _evaluate(net, xv, yv, mask)
    report = TrainReport(
        epochs_run=len(losses),
        best_epoch=best_epoch,
        best_val_loss=loss,
        val_accuracy=accuracy,
        train_rows=len(train_idx),
        val_rows=len(val_idx),
        max_epochs=config.max_epochs,
        seconds=time.perf_counter() - start,
        val_losses=tuple(losses),
    )
    return net, report


# ---------------------------------------------------------------------------------------------
# Export


def torch_probabilities(net: nn.Module, x: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.softmax(net(torch.from_numpy(np.ascontiguousarray(x, np.float32))), dim=1).numpy()


def export_onnx(net: nn.Module, input_dim: int) -> onnx.ModelProto:
    """The eval-mode network with a Softmax, input `features` [batch, D], output `probabilities` [batch, 6]."""
    model = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript (not in the export extra);
        # it turns this graph into plain Gemm/Relu/Softmax nodes, dropout removed in eval mode.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # torch types f as a path; the TorchScript exporter (dynamo=False) also writes to a file object.
        torch.onnx.export(
            model,
            (torch.zeros(1, input_dim),),
            buffer,  # type: ignore[arg-type, unused-ignore]
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    # No newer IR than the sklearn path (and tools/modeller/export) write, so the same runtimes can read it.
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    proto.producer_name = "tessera"
    onnx.checker.check_model(proto)
    return proto


def check_parity(model: onnx.ModelProto, net: nn.Module, x: np.ndarray, atol: float = 1e-5) -> None:
    got, want = onnx_probabilities(model, x), torch_probabilities(net, x)
    if got.shape != want.shape or not np.allclose(got, want, atol=atol):
        diff = np.abs(got - want).max() if got.shape == want.shape else float("nan")
        raise RuntimeError(f"ONNX MLP differs from torch by {diff:.2e} (shapes {got.shape}, {want.shape})")


def train_mlp_torch(
    embeddings: np.ndarray,
    raw_features: np.ndarray,
    labels: np.ndarray,
    embedder: EmbedderInfo,
    config: TorchTrainConfig | None = None,
    *,
    demo: bool = False,
    atol: float = 1e-5,
    **overrides: Any,
) -> tuple[onnx.ModelProto, MlpMeta, TrainReport]:
    """Fit with early stopping, export, and check ONNX Runtime equals torch on the training rows.

    `overrides` replace fields of `config` (e.g. `hidden=(32,), seed=1, patience=5`).
    """
    config = replace(config or TorchTrainConfig(), **overrides)
    labels = np.asarray(labels, np.int64)
    train_idx, val_idx = held_out_split(labels, config.validation_fraction, config.seed)
    # Standardise with the training part's statistics only: the held-out rows stay unseen.
    stats = FeatureStats.fit(np.asarray(raw_features)[train_idx])
    x = design_matrix(embeddings, raw_features, stats)
    net, report = fit_network(x, labels, train_idx, val_idx, config)
    with torch_settings(config):
        model = export_onnx(net, x.shape[1])
        check_parity(model, net, x, atol)
    meta = MlpMeta(features=stats, embedder=embedder, hidden_layers=list(config.hidden), demo=demo)
    return model, meta, report
