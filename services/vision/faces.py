"""Face detection behind one small protocol, so a better detector can replace Haar by config alone."""

from __future__ import annotations

import math
import queue
from abc import ABC, abstractmethod
from collections.abc import Iterable
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


# A 6000² photo costs seconds of Haar at full size, all of it in one uninterruptible native call
# (measured on 2 cores: ~1.9 s CPU for a 1280 copy of a tiled-faces 6000² image, ~0.9 s for an
# upscaled photo, ~0.1 s for a 512² photo); a copy at most this big keeps one detection under
# about a second, and faces down to ~75 px stay findable in a 12 MP (4000×3000) photo.
DEFAULT_DETECT_MAX_SIDE = 1280


class DetectorSettings(StrictModel):
    """What every detector shares: the size it works at. A new detector's config extends this,
    so it is bounded by default too."""

    min_size: int = Field(50, ge=1, description="Smallest face side, in pixels of the original image.")
    detect_max_side: int | None = Field(
        DEFAULT_DETECT_MAX_SIDE,
        ge=32,
        description="Detect on a copy downscaled so its longest side is at most this; boxes are mapped "
        "back to the original image. Bounds the time of one detection (it cannot be interrupted once "
        "started); faces smaller than about 24 px in the copy are lost (at 1280, ~113 px in a 6000² "
        "image). null: full size, unbounded time on big images.",
    )


class HaarConfig(DetectorSettings):
    kind: Literal["haar"] = "haar"
    cascade: str = Field(
        "haarcascade_frontalface_default.xml",
        description="A file name in OpenCV's bundled cascades, or a path to a cascade XML.",
    )
    scale_factor: float = Field(1.1, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=0)


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
    if image.ndim == 2:
        return image
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    if image.shape[2] == 1:
        return image[:, :, 0]
    raise InvalidArgument(f"detector needs 1, 3 or 4 channels, got {image.shape[2]}")


def detection_copy(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """The image downscaled (INTER_AREA) so its longest side is at most max_side, and the scale
    (copy pixels per original pixel; 1.0 and the image itself when it already fits)."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image, 1.0
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


class BoundedDetector(ABC):
    """Base of every detector: it detects on a copy no bigger than `detect_max_side`, with the
    smallest face size converted to the copy, and answers boxes in the original image's pixels,
    clipped to it, best score first. A subclass says how to prepare an image (`_prepare`, on
    the original: e.g. to grey, which makes the downscale cheaper) and how to find faces in the
    copy (`_find`)."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings

    def detect(self, bgr: np.ndarray) -> list[Box]:
        if bgr.dtype != np.uint8 or bgr.ndim not in (2, 3) or bgr.size == 0:
            raise InvalidArgument(f"detector needs a non-empty uint8 image, got {bgr.dtype} {bgr.shape}")
        prepared = self._prepare(bgr)
        height, width = prepared.shape[:2]
        small, scale = detection_copy(prepared, self.settings.detect_max_side)
        min_side = max(1, round(self.settings.min_size * scale))
        boxes = []
        for x, y, w, h, score in self._find(small, min_side):
            box = _clip(round(x / scale), round(y / scale), round(w / scale), round(h / scale), width, height)
            if box is not None:
                boxes.append(Box(*box, score=score))
        boxes.sort(key=lambda b: (-b.score, b.y, b.x))
        return boxes

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    @abstractmethod
    def _find(self, image: np.ndarray, min_side: int) -> Iterable[tuple[float, float, float, float, float]]:
        """(x, y, w, h, score) of each face in `image` (the copy), sides of at least min_side."""


# Classifiers kept for reuse: as many as the cores that run detections at once (2 here).
_IDLE_CLASSIFIERS = 2
# A classifier that detected on a copy bigger than this (about 1280×780) is not reused.
_REUSE_MAX_PIXELS = 1_000_000


class HaarDetector(BoundedDetector):
    """OpenCV Haar cascade. Scores are the logistic of the last stage's sum (levelWeights): monotonic
    in the cascade's own confidence, stable across runs, but not a calibrated probability."""

    def __init__(self, config: HaarConfig | None = None) -> None:
        self.config = config or HaarConfig()
        super().__init__(self.config)
        self._path = _resolve_cascade(self.config.cascade)
        # CascadeClassifier keeps per-call scratch state, so one classifier serves one call at a
        # time. One per concurrent call (loading one takes ~20 ms) lets a small photo's detection
        # run beside a big one instead of queueing behind it; a few stay idle for reuse.
        self._idle: queue.SimpleQueue[cv2.CascadeClassifier] = queue.SimpleQueue()
        self._idle.put(self._load())

    def _load(self) -> cv2.CascadeClassifier:
        classifier = cv2.CascadeClassifier(str(self._path))
        if classifier.empty():
            raise FailedPrecondition(f"Haar cascade {self._path} could not be loaded")
        return classifier

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return _to_gray(image)

    def _find(self, image: np.ndarray, min_side: int) -> Iterable[tuple[float, float, float, float, float]]:
        cfg = self.config
        try:
            classifier = self._idle.get_nowait()
        except queue.Empty:
            classifier = self._load()
        try:
            rects, _levels, weights = classifier.detectMultiScale3(
                image,
                scaleFactor=cfg.scale_factor,
                minNeighbors=cfg.min_neighbors,
                minSize=(min_side, min_side),
                outputRejectLevels=True,
            )
        finally:
            # Its scratch buffers grow to the biggest image it has seen and never shrink (measured:
            # ~93 MB kept after a 1280² copy, ~1 MB after 512²): one that saw a big copy is dropped,
            # which frees them, rather than kept to hold that memory for good.
            small = image.shape[0] * image.shape[1] <= _REUSE_MAX_PIXELS
            if small and self._idle.qsize() < _IDLE_CLASSIFIERS:
                self._idle.put(classifier)
        found = zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).ravel())
        return [(x, y, w, h, _logistic(float(weight))) for (x, y, w, h), weight in found]


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


def crop_region(
    width: int, height: int, box: Box, *, margin_px: int = 0, margin_ratio: float = 0.0
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the box grown on each side, then clipped to a width×height image.

    Each side grows by ``margin_px + margin_ratio * side`` pixels (side = the box's width for left
    and right, its height for top and bottom), rounded. The result is never empty: a box that does
    not overlap the image is InvalidArgument. Needs only the image's size, so a request's crop
    pixels can be counted from the image headers, before anything is decoded.
    """
    if margin_px < 0 or margin_ratio < 0:
        raise InvalidArgument(f"crop margins must be >= 0, got {margin_px} px and ratio {margin_ratio}")
    if box.w <= 0 or box.h <= 0:
        raise InvalidArgument(f"face box has an empty size {box.w}x{box.h}")
    dx = round(margin_px + margin_ratio * box.w)
    dy = round(margin_px + margin_ratio * box.h)
    clipped = _clip(box.x - dx, box.y - dy, box.w + 2 * dx, box.h + 2 * dy, width, height)
    if clipped is None:
        raise InvalidArgument(
            f"face box {box.x},{box.y} {box.w}x{box.h} lies outside the {width}x{height} image"
        )
    return clipped


def crop_view(bgr: np.ndarray, box: Box, *, margin_px: int = 0, margin_ratio: float = 0.0) -> np.ndarray:
    """The grown, clipped box as a view into the image (no pixel copied: OpenCV reads views as
    they are, so preprocessing resizes straight from it). The view keeps the whole image alive."""
    height, width = bgr.shape[:2]
    x, y, w, h = crop_region(width, height, box, margin_px=margin_px, margin_ratio=margin_ratio)
    return bgr[y : y + h, x : x + w]


def crop_with_margin(
    bgr: np.ndarray, box: Box, *, margin_px: int = 0, margin_ratio: float = 0.0
) -> np.ndarray:
    """A copy of `crop_view`: contiguous, and the frame can be freed while the crop is kept."""
    return crop_view(bgr, box, margin_px=margin_px, margin_ratio=margin_ratio).copy()
