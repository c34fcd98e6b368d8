"""Face detection behind one small protocol, so a better detector can replace Haar by config alone."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import cv2
import numpy as np
from pydantic import Field

from services.runtime.config import StrictModel
from services.runtime.errors import FailedPrecondition, InvalidArgument


@dataclass(frozen=True, slots=True)
class Box:
    """A face in image pixels: top-left corner, size, and a detector score (higher is surer)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


@runtime_checkable
class FaceDetector(Protocol):
    def detect(self, bgr: np.ndarray) -> list[Box]:
        """Faces in a BGR uint8 image (a 2-D grey image is accepted too), best score first."""
        ...


class HaarConfig(StrictModel):
    kind: Literal["haar"] = "haar"
    cascade: str = Field(
        "haarcascade_frontalface_default.xml",
        description="A file name in OpenCV's bundled cascades, or a path to a cascade XML.",
    )
    scale_factor: float = Field(1.1, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=0)
    min_size: int = Field(50, ge=1, description="Smallest face side, in pixels of the original image.")
    detect_max_side: int | None = Field(
        None,
        ge=32,
        description="Detect on a copy downscaled so its longest side is at most this (null: full size). "
        "The main latency lever on big images; faces smaller than ~24 px in the copy are lost.",
    )


# A union (with a `kind` discriminator) once a second detector exists, e.g. YuNet ONNX.
DetectorConfig = HaarConfig


def _resolve_cascade(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    bundled = Path(cv2.data.haarcascades) / name
    if bundled.is_file():
        return bundled
    raise FailedPrecondition(f"Haar cascade {name!r} is neither a file nor one of OpenCV's bundled cascades")


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise InvalidArgument(f"detector needs a non-empty uint8 image, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        return image
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    if image.shape[2] == 1:
        return image[:, :, 0]
    raise InvalidArgument(f"detector needs 1, 3 or 4 channels, got {image.shape[2]}")


class HaarDetector:
    """OpenCV Haar cascade. Scores are the logistic of the last stage's sum (levelWeights): monotonic
    in the cascade's own confidence, stable across runs, but not a calibrated probability."""

    def __init__(self, config: HaarConfig | None = None) -> None:
        self.config = config or HaarConfig()
        path = _resolve_cascade(self.config.cascade)
        self._classifier = cv2.CascadeClassifier(str(path))
        if self._classifier.empty():
            raise FailedPrecondition(f"Haar cascade {path} could not be loaded")
        # CascadeClassifier keeps per-call scratch state: concurrent detect calls would corrupt it.
        self._lock = threading.Lock()

    def detect(self, bgr: np.ndarray) -> list[Box]:
        cfg = self.config
        gray = _to_gray(bgr)
        height, width = gray.shape
        scale = 1.0
        if cfg.detect_max_side is not None and max(height, width) > cfg.detect_max_side:
            scale = cfg.detect_max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        min_side = max(1, round(cfg.min_size * scale))
        with self._lock:
            rects, _levels, weights = self._classifier.detectMultiScale3(
                gray,
                scaleFactor=cfg.scale_factor,
                minNeighbors=cfg.min_neighbors,
                minSize=(min_side, min_side),
                outputRejectLevels=True,
            )
        boxes = []
        for (x, y, w, h), weight in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).ravel()):
            box = _clip(round(x / scale), round(y / scale), round(w / scale), round(h / scale), width, height)
            if box is not None:
                boxes.append(Box(*box, score=_logistic(float(weight))))
        boxes.sort(key=lambda b: (-b.score, b.y, b.x))
        return boxes


def _logistic(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _clip(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def build_detector(config: DetectorConfig) -> FaceDetector:
    """The detector a config names."""
    if isinstance(config, HaarConfig):
        return HaarDetector(config)
    raise InvalidArgument(f"unknown face detector config {type(config).__name__}")


def crop_with_margin(
    bgr: np.ndarray, box: Box, *, margin_px: int = 0, margin_ratio: float = 0.0
) -> np.ndarray:
    """A copy of the box grown on each side, then clipped to the image.

    Each side grows by ``margin_px + margin_ratio * side`` pixels (side = the box's width for left
    and right, its height for top and bottom), rounded. The result is never empty: a box that does
    not overlap the image is InvalidArgument.
    """
    if margin_px < 0 or margin_ratio < 0:
        raise InvalidArgument(f"crop margins must be >= 0, got {margin_px} px and ratio {margin_ratio}")
    if box.w <= 0 or box.h <= 0:
        raise InvalidArgument(f"face box has an empty size {box.w}x{box.h}")
    height, width = bgr.shape[:2]
    dx = round(margin_px + margin_ratio * box.w)
    dy = round(margin_px + margin_ratio * box.h)
    clipped = _clip(box.x - dx, box.y - dy, box.w + 2 * dx, box.h + 2 * dy, width, height)
    if clipped is None:
        raise InvalidArgument(
            f"face box {box.x},{box.y} {box.w}x{box.h} lies outside the {width}x{height} image"
        )
    x, y, w, h = clipped
    return bgr[y : y + h, x : x + w].copy()  # a copy: contiguous, and the frame can be freed
