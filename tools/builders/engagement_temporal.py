"""The engagement demo's temporal network: a per-frame CNN and a temporal head, built with
onnx.helper (no torch), and what trains, checks and writes it.

    frames [N, 30, 1, 64, 64]            30 grey face crops per clip, pixels / 255
    -> [N*30, 1, 64, 64] -> Conv         a fixed bank of 10 filters 7x7, stride 2: Gabor at 4
                                         orientations x 2 phases, an on- and an off-centre
                                         difference of Gaussians (designed, not learnt)
    -> Relu -> AveragePool 8x8           a 4x4 grid: per-frame vectors [N, 30, 160]
    -> / L2 norm per frame               exposure and contrast do not count
    -> mean, std over time, mean |frame-to-frame change|   (the last one carries motion)
    -> clip_features [N, 480]
    -> Gemm/Relu/Gemm                    the four affects' scikit-learn MLPs side by side, their
                                         standardisation folded into the first Gemm
    -> [N, 4, 4] -> Softmax over levels  probabilities (affect x level)

Only the head is trained, on features ONNX Runtime computes with this same feature graph, so
training and serving see the same numbers. `reference_features` is the graph in plain numpy.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from services.engagement.features import AFFECTS, CROP_SIZE
from services.runtime.model_files import IR_VERSION, OPSET
from services.vision.preprocess import PreprocessParams, preprocess_faces
from tools.modeller.export.temporal_export import export_temporal

MODEL_NAME = "engagement_temporal"
LEVEL_NAMES = ("very low", "low", "high", "very high")
FRAMES = 30
FEATURES_OUTPUT = "clip_features"

PREPROCESS = PreprocessParams(
    input_name="frames",
    output_name="probabilities",
    input_size=(CROP_SIZE, CROP_SIZE),
    color="gray",
    layout="NCHW",
    mean=(0.0,),
    std=(1.0,),
    class_names=LEVEL_NAMES,
)


def conv_bank() -> np.ndarray:
    """The fixed first layer [10, 1, 7, 7]: Gabor filters (wavelength 5 px, sigma 1.75 px) at 0, 45,
    90 and 135 degrees in even and odd phase, then an on- and an off-centre difference of Gaussians
    (sigma 1 and 2.5 px); each zero-mean (blind to exposure) and of unit L2 norm."""
    r = np.arange(7, dtype=np.float64) - 3
    yy, xx = np.meshgrid(r, r, indexing="ij")
    filters = []
    for theta in np.deg2rad([0, 45, 90, 135]):
        u = xx * math.cos(theta) + yy * math.sin(theta)
        envelope = np.exp(-(xx**2 + yy**2) / (2 * 1.75**2))
        for phase in (0.0, math.pi / 2):
            filters.append(envelope * np.cos(2 * math.pi * u / 5 + phase))
    rr = xx**2 + yy**2
    dog = np.exp(-rr / 2) / (2 * math.pi) - np.exp(-rr / (2 * 2.5**2)) / (2 * math.pi * 2.5**2)
    filters += [dog, -dog]
    bank = np.stack([f - f.mean() for f in filters])
    bank /= np.linalg.norm(bank.reshape(len(bank), -1), axis=1)[:, None, None]
    return bank[:, None].astype(np.float32)


N_FILTERS = 10
GRID = 4  # pooled grid side
FRAME_FEATURES = N_FILTERS * GRID * GRID
CLIP_FEATURES = 3 * FRAME_FEATURES
NORM_EPS = 1e-6


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _feature_graph(frames: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes from `frames` [N, T, 1, 64, 64] to `clip_features` [N, 3F]."""
    n = helper.make_node
    pool = CROP_SIZE // 2 // GRID
    nodes = [
        n("Reshape", ["frames", "frame_shape"], ["per_frame"]),
        n(
            "Conv",
            ["per_frame", "bank", "bank_bias"],
            ["responses"],
            kernel_shape=[7, 7],
            strides=[2, 2],
            pads=[3, 3, 3, 3],
        ),
        n("Relu", ["responses"], ["rectified"]),
        n("AveragePool", ["rectified"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        n("Reshape", ["pooled", "sequence_shape"], ["raw_sequence"]),
        # Unit length per frame: exposure and contrast scale every response alike.
        n("ReduceSumSquare", ["raw_sequence"], ["energy"], axes=[2], keepdims=1),
        n("Add", ["energy", "norm_eps"], ["energy_eps"]),
        n("Sqrt", ["energy_eps"], ["norm"]),
        n("Div", ["raw_sequence", "norm"], ["sequence"]),
        n("ReduceMean", ["sequence"], ["time_mean_k"], axes=[1], keepdims=1),
        n("Squeeze", ["time_mean_k", "axis_1"], ["time_mean"]),
        n("Sub", ["sequence", "time_mean_k"], ["centred"]),
        n("Mul", ["centred", "centred"], ["squared"]),
        n("ReduceMean", ["squared"], ["variance"], axes=[1], keepdims=0),
        n("Sqrt", ["variance"], ["time_std"]),
        n("Slice", ["sequence", "one", "t_end", "axis_1"], ["later"]),
        n("Slice", ["sequence", "zero", "t_last", "axis_1"], ["earlier"]),
        n("Sub", ["later", "earlier"], ["step"]),
        n("Abs", ["step"], ["step_size"]),
        n("ReduceMean", ["step_size"], ["motion"], axes=[1], keepdims=0),
        n("Concat", ["time_mean", "time_std", "motion"], [FEATURES_OUTPUT], axis=1),
    ]
    inits = [
        _const("frame_shape", np.array([-1, 1, CROP_SIZE, CROP_SIZE], np.int64)),
        _const("bank", conv_bank()),
        _const("bank_bias", np.zeros(N_FILTERS, np.float32)),
        _const("sequence_shape", np.array([-1, frames, FRAME_FEATURES], np.int64)),
        _const("norm_eps", np.array(NORM_EPS, np.float32)),
        _const("axis_1", np.array([1], np.int64)),
        _const("zero", np.array([0], np.int64)),
        _const("one", np.array([1], np.int64)),
        _const("t_end", np.array([frames], np.int64)),
        _const("t_last", np.array([frames - 1], np.int64)),
    ]
    return nodes, inits


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    output: onnx.ValueInfoProto,
    frames: int,
    props: dict[str, str],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "engagement_temporal_demo",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", frames, 1, CROP_SIZE, CROP_SIZE])],
        [output],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tessera.tools.engagement.temporal",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def feature_model(frames: int = FRAMES) -> onnx.ModelProto:
    """The untrained part alone: frames -> clip features [N, 480]."""
    nodes, inits = _feature_graph(frames)
    out = helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ["N", CLIP_FEATURES])
    return _model(nodes, inits, out, frames, {"demo": "true"})


@dataclass(frozen=True)
class Head:
    """The four affects' MLPs as one Gemm/Relu/Gemm: [N, 480] -> [N, 16] logits."""

    w1: np.ndarray  # [480, 4H]
    b1: np.ndarray
    w2: np.ndarray  # [4H, 16], block diagonal
    b2: np.ndarray


def temporal_model(head: Head, frames: int = FRAMES) -> onnx.ModelProto:
    """The whole served network: frames [N, T, 1, 64, 64] -> probabilities [N, 4, 4]."""
    nodes, inits = _feature_graph(frames)
    n = helper.make_node
    nodes += [
        n("Gemm", [FEATURES_OUTPUT, "head_w1", "head_b1"], ["hidden_in"]),
        n("Relu", ["hidden_in"], ["hidden"]),
        n("Gemm", ["hidden", "head_w2", "head_b2"], ["logits_flat"]),
        n("Reshape", ["logits_flat", "logits_shape"], ["logits"]),
        n("Softmax", ["logits"], [PREPROCESS.output_name], axis=-1),
    ]
    inits += [
        _const("head_w1", head.w1.astype(np.float32)),
        _const("head_b1", head.b1.astype(np.float32)),
        _const("head_w2", head.w2.astype(np.float32)),
        _const("head_b2", head.b2.astype(np.float32)),
        _const("logits_shape", np.array([-1, len(AFFECTS), len(LEVEL_NAMES)], np.int64)),
    ]
    out = helper.make_tensor_value_info(
        PREPROCESS.output_name, TensorProto.FLOAT, ["N", len(AFFECTS), len(LEVEL_NAMES)]
    )
    props = {"demo": "true", "affects": json.dumps(list(AFFECTS)), "levels": json.dumps(list(LEVEL_NAMES))}
    return _model(nodes, inits, out, frames, props)


def reference_features(frames: np.ndarray) -> np.ndarray:
    """The feature graph in plain numpy (float64), to check the ONNX one: [N, T, 1, 64, 64] -> [N, 480]."""
    n_clips, t = frames.shape[:2]
    x = np.pad(frames.reshape(n_clips * t, CROP_SIZE, CROP_SIZE).astype(np.float64), ((0, 0), (3, 3), (3, 3)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (7, 7), axis=(1, 2))[:, ::2, ::2]
    responses = np.einsum("nhwij,kij->nkhw", windows, conv_bank()[:, 0].astype(np.float64))
    pool = CROP_SIZE // 2 // GRID
    rect = np.maximum(responses, 0)
    pooled = rect.reshape(n_clips * t, N_FILTERS, GRID, pool, GRID, pool).mean(axis=(3, 5))
    seq = pooled.reshape(n_clips, t, FRAME_FEATURES)
    seq = seq / np.sqrt((seq**2).sum(axis=2, keepdims=True) + NORM_EPS)
    motion = np.abs(np.diff(seq, axis=1)).mean(axis=1)
    return np.concatenate([seq.mean(axis=1), seq.std(axis=1), motion], axis=1)


def model_input(crops: np.ndarray) -> np.ndarray:
    """Clips of grey crops [n, T, 64, 64] uint8 -> the network's input [n, T, 1, 64, 64] float32,
    through the same preprocessing the service runs (services.vision.preprocess)."""
    n_clips, t = crops.shape[:2]
    flat = preprocess_faces(list(crops.reshape(n_clips * t, CROP_SIZE, CROP_SIZE)), PREPROCESS)
    return flat.reshape(n_clips, t, 1, CROP_SIZE, CROP_SIZE)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU for building and checking (not the served one)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # two shared cores: never more than one build thread
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def clip_features(crops: np.ndarray, frames: int = FRAMES, batch: int = 16) -> np.ndarray:
    """Clip features [n, 480] of clips of crops [n, T, 64, 64], by ONNX Runtime on the feature graph."""
    features = session(feature_model(frames))
    out = [
        features.run([FEATURES_OUTPUT], {"frames": model_input(crops[i : i + batch])})[0]
        for i in range(0, len(crops), batch)
    ]
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# The trained head


def train_heads(
    features: np.ndarray, levels: np.ndarray, *, hidden: int, alpha: float, seed: int
) -> list[Any]:
    """Per affect a standardising scikit-learn MLP (one hidden Relu layer) on the clip features."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    heads = []
    for k in range(len(AFFECTS)):
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=1000, random_state=seed + k)
        heads.append(make_pipeline(StandardScaler(), mlp).fit(features, levels[:, k]))
    return heads


def head_probabilities(heads: list[Any], features: np.ndarray) -> np.ndarray:
    """[n, 4 affects, 4 levels] as scikit-learn computes them."""
    return np.stack([h.predict_proba(features) for h in heads], axis=1)


def fold_heads(heads: list[Any]) -> Head:
    """The MLPs as one Gemm/Relu/Gemm: scaler folded into the first layer, second block-diagonal."""
    w1s, b1s, w2s, b2s = [], [], [], []
    for pipe in heads:
        scaler, mlp = pipe[0], pipe[-1]
        if list(mlp.classes_) != list(range(len(LEVEL_NAMES))) or mlp.out_activation_ != "softmax":
            raise ValueError(f"an affect head must predict levels 0-3 with softmax, has {list(mlp.classes_)}")
        (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
        # ((x - mean) / scale) @ w1 + b1 == x @ (w1 / scale) + (b1 - (mean / scale) @ w1)
        w1s.append(w1 / scaler.scale_[:, None])
        b1s.append(b1 - (scaler.mean_ / scaler.scale_) @ w1)
        w2s.append(w2)
        b2s.append(b2)
    hidden = sum(w.shape[1] for w in w1s)
    w2 = np.zeros((hidden, len(heads) * len(LEVEL_NAMES)))
    row = 0
    for k, w in enumerate(w2s):
        w2[row : row + w.shape[0], k * len(LEVEL_NAMES) : (k + 1) * len(LEVEL_NAMES)] = w
        row += w.shape[0]
    return Head(np.concatenate(w1s, axis=1), np.concatenate(b1s), w2, np.concatenate(b2s))


# ---------------------------------------------------------------------------------------------
# Writing the repository entry


def write_temporal(repo: Path, model: onnx.ModelProto) -> Path:
    """`<repo>/engagement_temporal/1`, written (and checked) as the temporal exporter writes a
    modeller's network, marked demo."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        export_temporal(path, PREPROCESS, MODEL_NAME, repo, version=1, demo=True)
    return repo / MODEL_NAME
