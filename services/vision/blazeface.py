"""BlazeFace (MediaPipe's face detector) on ONNX Runtime, decoded as MediaPipe decodes it.

The networks come from the model repository (`face_detector_short`, `face_detector_full`, built by
`tools/builders/blazeface.py` from MediaPipe's `.tflite` files), each with a `blazeface.json` that
says what MediaPipe's graph does around it. Around the network, in numpy:

1. letterbox: the image scaled to fit the input square (128² short range, 192² full range),
   centred, the rest black; RGB; x / 127.5 − 1;
2. anchors: MediaPipe's SsdAnchorsCalculator (896 anchors at strides 8, 16, 16, 16 short range;
   2304 at stride 4 full range), fixed anchor size;
3. decode (TensorsToDetectionsCalculator): box centre and size from the regressors, scaled by the
   input size, around each anchor; six keypoints alike; score = sigmoid of the clipped logit;
   detections under the score threshold dropped;
4. weighted non-maximum suppression (NonMaxSuppressionCalculator, WEIGHTED, IoU): each cluster of
   overlapping detections becomes one, its box and keypoints the score-weighted mean, its score
   the best one's;
5. the letterbox undone: boxes and keypoints in image pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from services.runtime.backends.onnx import OnnxConfig, session_options
from services.runtime.config import ConfigError, load_json_model
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.repository import load_entry

META_FILE = "blazeface.json"

log = logging.getLogger(__name__)


class AnchorOptions(BaseModel):
    """MediaPipe's SsdAnchorsCalculatorOptions, as far as BlazeFace uses them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: int
    strides: tuple[int, ...]
    min_scale: float
    max_scale: float
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    aspect_ratios: tuple[float, ...] = (1.0,)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = False
    fixed_anchor_size: bool = True


class BlazeFaceMeta(BaseModel):
    """`blazeface.json`: what runs around the network (written by the builder, beside the model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_name: str
    boxes_name: str
    scores_name: str
    input_size: tuple[int, int]  # height, width
    layout: Literal["NHWC"]
    color: Literal["rgb"]
    scale: float
    offset: float
    letterbox: bool
    anchors: AnchorOptions
    num_anchors: int
    num_coords: int
    box_coord_offset: int
    keypoint_coord_offset: int
    num_keypoints: int
    keypoint_names: tuple[str, ...] = ()
    reverse_output_order: bool
    x_scale: float
    y_scale: float
    w_scale: float
    h_scale: float
    sigmoid_score: bool
    score_clipping_thresh: float | None
    min_score_thresh: float
    min_suppression_threshold: float
    nms: Literal["weighted"]
    source: str = ""
    tflite_sha256: str = ""


# ---------------------------------------------------------------------------------------------
# Anchors, decoding, NMS: pure numpy


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1)


def ssd_anchors(options: AnchorOptions, input_size: tuple[int, int]) -> np.ndarray:
    """Anchors (x_center, y_center, w, h), relative to the input, in MediaPipe's order: per group of
    layers with the same stride, row by row, column by column, anchor by anchor."""
    height, width = input_size
    out: list[tuple[float, float, float, float]] = []
    layer = 0
    n = options.num_layers
    while layer < n:
        widths: list[float] = []
        heights: list[float] = []
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < n and options.strides[last] == options.strides[layer]:
            scale = _scale(options.min_scale, options.max_scale, last, n)
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for ratio in options.aspect_ratios:
                    ratios.append(ratio)
                    scales.append(scale)
                if options.interpolated_scale_aspect_ratio > 0.0:
                    following = (
                        1.0 if last == n - 1 else _scale(options.min_scale, options.max_scale, last + 1, n)
                    )
                    scales.append(math.sqrt(scale * following))
                    ratios.append(options.interpolated_scale_aspect_ratio)
            last += 1
        for ratio, scale in zip(ratios, scales, strict=True):
            heights.append(scale / math.sqrt(ratio))
            widths.append(scale * math.sqrt(ratio))
        stride = options.strides[layer]
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        for y in range(rows):
            for x in range(cols):
                for w, h in zip(widths, heights, strict=True):
                    cx = (x + options.anchor_offset_x) / cols
                    cy = (y + options.anchor_offset_y) / rows
                    out.append((cx, cy, 1.0, 1.0) if options.fixed_anchor_size else (cx, cy, w, h))
        layer = last
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Detections:
    """Detections in relative coordinates of the network's input: boxes (n, 4) as xmin, ymin,
    xmax, ymax; keypoints (n, k, 2) as x, y; scores (n,). Best score first after NMS."""

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def decode(
    raw_boxes: np.ndarray,
    raw_scores: np.ndarray,
    anchors: np.ndarray,
    meta: BlazeFaceMeta,
    score_threshold: float,
) -> Detections:
    """MediaPipe's TensorsToDetectionsCalculator for one image: raw_boxes (anchors, num_coords),
    raw_scores (anchors,) or (anchors, 1). Keeps detections scoring at least `score_threshold`
    whose box has a positive size."""
    raw_boxes = np.asarray(raw_boxes, dtype=np.float32).reshape(len(anchors), meta.num_coords)
    logits = np.asarray(raw_scores, dtype=np.float32).reshape(len(anchors))
    if meta.score_clipping_thresh is not None:
        logits = np.clip(logits, -meta.score_clipping_thresh, meta.score_clipping_thresh)
    # float64: exp of a clipped logit (±100) overflows float32.
    if meta.sigmoid_score:
        scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    else:
        scores = logits
    keep = np.flatnonzero(scores >= score_threshold)
    raw, anchor, scores = raw_boxes[keep], anchors[keep], scores[keep]
    o = meta.box_coord_offset
    xi, yi = (0, 1) if meta.reverse_output_order else (1, 0)
    wi, hi = (2, 3) if meta.reverse_output_order else (3, 2)
    ax, ay, aw, ah = anchor[:, 0], anchor[:, 1], anchor[:, 2], anchor[:, 3]
    cx = raw[:, o + xi] / meta.x_scale * aw + ax
    cy = raw[:, o + yi] / meta.y_scale * ah + ay
    w = raw[:, o + wi] / meta.w_scale * aw
    h = raw[:, o + hi] / meta.h_scale * ah
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    k = meta.num_keypoints
    kp = raw[:, meta.keypoint_coord_offset : meta.keypoint_coord_offset + 2 * k].reshape(-1, k, 2)
    if not meta.reverse_output_order:
        kp = kp[:, :, ::-1]
    keypoints = np.stack(
        [
            kp[:, :, 0] / meta.x_scale * aw[:, None] + ax[:, None],
            kp[:, :, 1] / meta.y_scale * ah[:, None] + ay[:, None],
        ],
        axis=2,
    )
    valid = (w > 0) & (h > 0)
    return Detections(boxes[valid], keypoints[valid], scores[valid])


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    union = (
        (box[2] - box[0]) * (box[3] - box[1])
        + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
        - inter
    )
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(detections: Detections, iou_threshold: float) -> Detections:
    """MediaPipe's weighted non-maximum suppression: the best remaining detection gathers every
    remaining one whose IoU with it is above the threshold (itself included); they become one
    detection with the best one's score and the score-weighted mean box and keypoints."""
    order = np.argsort(-detections.scores, kind="stable")
    boxes, keypoints, scores = detections.boxes[order], detections.keypoints[order], detections.scores[order]
    out_boxes, out_keypoints, out_scores = [], [], []
    remaining = np.arange(len(scores))
    while remaining.size:
        best = remaining[0]
        overlap = _iou(boxes[best], boxes[remaining]) > iou_threshold
        overlap[0] = True
        cluster = remaining[overlap]
        weights = scores[cluster]
        total = weights.sum()
        out_boxes.append((boxes[cluster] * weights[:, None]).sum(axis=0) / total)
        out_keypoints.append((keypoints[cluster] * weights[:, None, None]).sum(axis=0) / total)
        out_scores.append(scores[best])
        remaining = remaining[~overlap]
    k = keypoints.shape[1] if keypoints.ndim == 3 else 0
    return Detections(
        np.asarray(out_boxes, np.float32).reshape(-1, 4),
        np.asarray(out_keypoints, np.float32).reshape(-1, k, 2),
        np.asarray(out_scores, np.float32),
    )


@dataclass(frozen=True)
class Letterbox:
    """Where the scaled image sits in the network's input square: offset and size in input pixels,
    and the image's own size."""

    input_size: tuple[int, int]  # height, width
    x: int
    y: int
    width: int
    height: int
    image_width: int
    image_height: int

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Relative input coordinates (..., 2) as x, y → image pixels."""
        ih, iw = self.input_size
        out = np.empty_like(points, dtype=np.float32)
        out[..., 0] = (points[..., 0] * iw - self.x) * (self.image_width / self.width)
        out[..., 1] = (points[..., 1] * ih - self.y) * (self.image_height / self.height)
        return out


def letterbox(
    rgb: np.ndarray, input_size: tuple[int, int], scale: float, offset: float
) -> tuple[np.ndarray, Letterbox]:
    """The network's input (1, H, W, 3) float32: the image scaled to fit (aspect kept), centred,
    the rest black (offset), and where it went."""
    ih, iw = input_size
    h, w = rgb.shape[:2]
    factor = min(iw / w, ih / h)
    nw, nh = max(1, min(iw, round(w * factor))), max(1, min(ih, round(h * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (nw, nh), interpolation=interpolation) if (nw, nh) != (w, h) else rgb
    x, y = (iw - nw) // 2, (ih - nh) // 2
    tensor = np.full((1, ih, iw, 3), offset, dtype=np.float32)
    np.multiply(resized, np.float32(scale), out=tensor[0, y : y + nh, x : x + nw], casting="unsafe")
    tensor[0, y : y + nh, x : x + nw] += np.float32(offset)
    return tensor, Letterbox(input_size, x, y, nw, nh, w, h)


def to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    raise InvalidArgument(f"detector needs 1, 3 or 4 channels, got {channels}")


# ---------------------------------------------------------------------------------------------
# One network


# One intra-op thread per session: a detection is a few ms of small convolutions, and detections
# of concurrent requests run side by side in worker threads rather than splitting one.
DETECTOR_ONNX = OnnxConfig(intra_op_threads=1, inter_op_threads=1)


class BlazeFaceModel:
    """One BlazeFace network from the repository, with its own ONNX Runtime session (CPU, one
    intra-op thread). `InferenceSession.run` is thread-safe: concurrent detections need no lock."""

    def __init__(self, repository: Path, name: str) -> None:
        # Messages reach callers: names only, no server path (the log has the details).
        model_dir = Path(repository) / name
        if not model_dir.is_dir():
            raise FailedPrecondition(
                f"face detector model '{name}' is not in the model repository "
                "(`make models` builds it; or set detector.kind: haar)"
            )
        entry = load_entry(model_dir)
        if entry.error:
            log.error("face detector model %s cannot be loaded: %s", name, entry.error)
            raise FailedPrecondition(f"face detector model '{name}' cannot be loaded (see the service's log)")
        meta_path = entry.file(META_FILE)
        try:
            self.meta = load_json_model(BlazeFaceMeta, meta_path, "BlazeFace metadata")
        except ConfigError as exc:
            log.error("face detector model %s: %s", name, exc)
            raise FailedPrecondition(
                f"face detector model '{name}': its {META_FILE} is missing or invalid"
            ) from None
        self.name = name
        self.version = entry.version
        self.anchors = ssd_anchors(self.meta.anchors, self.meta.input_size)
        if len(self.anchors) != self.meta.num_anchors:
            raise FailedPrecondition(
                f"face detector model '{name}': {len(self.anchors)} anchors from "
                f"{META_FILE}, {self.meta.num_anchors} expected"
            )
        self.session = ort.InferenceSession(
            str(entry.model_path()), session_options(DETECTOR_ONNX), providers=["CPUExecutionProvider"]
        )

    def detect(self, rgb: np.ndarray, score_threshold: float, nms_iou: float) -> tuple[Detections, Letterbox]:
        """Detections of an RGB uint8 image, relative to the network's input, and the letterbox
        that maps them back to the image."""
        m = self.meta
        tensor, box = letterbox(rgb, m.input_size, m.scale, m.offset)
        raw_boxes, raw_scores = self.session.run([m.boxes_name, m.scores_name], {m.input_name: tensor})
        found = decode(raw_boxes[0], raw_scores[0], self.anchors, m, score_threshold)
        return weighted_nms(found, nms_iou), box


def faces_in_image(
    model: BlazeFaceModel, rgb: np.ndarray, score_threshold: float, nms_iou: float, min_side: float = 0
) -> Iterable[tuple[float, float, float, float, float, np.ndarray]]:
    """(x, y, w, h, score, keypoints (k, 2)) in the image's pixels, sides of at least min_side."""
    found, box = model.detect(rgb, score_threshold, nms_iou)
    corners = box.to_image(found.boxes.reshape(-1, 2, 2)).reshape(-1, 4)
    keypoints = box.to_image(found.keypoints)
    out = []
    for (x0, y0, x1, y1), score, kp in zip(corners, found.scores, keypoints, strict=True):
        w, h = x1 - x0, y1 - y0
        if min(w, h) >= min_side:
            out.append((float(x0), float(y0), float(w), float(h), float(score), kp))
    return out
