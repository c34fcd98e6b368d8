"""Face detection behind one small protocol; the detector is chosen by config (`detector.kind`).

Two detectors: BlazeFace (MediaPipe's, on ONNX Runtime; the default) and OpenCV's Haar cascade
(boxes as fer's models were trained on). Both detect on a bounded copy (`BoundedDetector`). Their
boxes sit differently on a face, so each has its own default crop margins (`Margins`).

Over 500 lines on purpose: the detector protocol, both detectors, their bounded-size wrapper and the
crop margins are one concept (a face box a classifier can use) read together.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import cv2
import cv2.data  # where OpenCV's bundled Haar cascades are
import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from services.runtime.config import StrictModel, describe_validation_error
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.vision.blazeface import BlazeFaceModel, faces_in_image, to_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Box:
    """A face in image pixels: top-left corner, size, a detector score (higher is surer), and the
    landmarks the detector gives ((x, y) in image pixels; BlazeFace: right eye, left eye, nose
    tip, mouth centre, right and left ear tragion; none from Haar or a caller)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    keypoints: tuple[tuple[float, float], ...] = field(default=(), compare=False)


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


@dataclass(frozen=True, slots=True)
class Margins:
    """How far each side of a face box grows before cropping: pixels + the side's ratio × the box's
    width (left, right) or height (top, bottom); a negative ratio moves that side inwards."""

    top: float
    bottom: float
    left: float
    right: float
    pixels: int = 0

    @classmethod
    def even(cls, ratio: float, pixels: int = 0) -> Margins:
        return cls(ratio, ratio, ratio, ratio, pixels)


# fer's models were trained on Haar boxes grown by 10 % on each side.
HAAR_MARGINS = Margins.even(0.1)
# BlazeFace's box is about as big as Haar's but sits lower on the face (median over 218 real faces
# both find: centre 12 % of the side lower, side 1.01×): grown 25 % upwards, 10 % sideways and not
# downwards it gives about the crop of a Haar box grown 10 % on each side, which fer's student was
# trained on (tests/vision/test_blazeface.py measures the student's agreement; docs/models.md).
BLAZEFACE_MARGINS = Margins(top=0.25, bottom=0.0, left=0.1, right=0.1)


class CropMargin(StrictModel):
    """Crop margins as configured. What is left unset comes from the detector (`Margins`): a side's
    own ratio wins over `ratio`, which wins over the detector's default for that side."""

    pixels: int = Field(0, ge=0, description="Pixels added on every side.")
    ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of the box's side added on every side; null: the detector's default margins.",
    )
    top: float | None = Field(None, ge=-0.45, le=1, description="Share of the box's height added above.")
    bottom: float | None = Field(None, ge=-0.45, le=1, description="Share of the box's height added below.")
    left: float | None = Field(
        None, ge=-0.45, le=1, description="Share of the box's width added on the left."
    )
    right: float | None = Field(
        None, ge=-0.45, le=1, description="Share of the box's width added on the right."
    )

    def resolve(self, default: Margins) -> Margins:
        def side(own: float | None, fallback: float) -> float:
            return own if own is not None else self.ratio if self.ratio is not None else fallback

        return Margins(
            side(self.top, default.top),
            side(self.bottom, default.bottom),
            side(self.left, default.left),
            side(self.right, default.right),
            self.pixels,
        )


class HaarConfig(DetectorSettings):
    kind: Literal["haar"] = "haar"
    cascade: str = Field(
        "haarcascade_frontalface_default.xml",
        description="A file name in OpenCV's bundled cascades, or a path to a cascade XML.",
    )
    scale_factor: float = Field(1.1, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=0)

    @property
    def margins(self) -> Margins:
        return HAAR_MARGINS


class BlazeFaceConfig(DetectorSettings):
    kind: Literal["blazeface"] = "blazeface"
    range: Literal["short", "full", "short_then_full"] = Field(
        "short_then_full",
        description="short: the 128² short-range model (faces within ~2 m of the camera: "
        "about a ninth of the image side or more); full: the 192² full-range model (~5 m: down to about a "
        "thirteenth, ~2.5× the cost); short_then_full: the full-range model only when the short-range one "
        "finds nothing.",
    )
    min_size: int = Field(20, ge=1, description="Smallest face side, in pixels of the original image.")
    score_threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Lowest detection score kept (MediaPipe: 0.5 short range, 0.6 full range).",
    )
    nms_iou: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Detections overlapping the best one by more than this "
        "IoU are merged into it (weighted NMS).",
    )
    short_model: str = Field(
        "face_detector_short", description="The short-range model, in the service's model repository."
    )
    full_model: str = Field(
        "face_detector_full", description="The full-range model, in the service's model repository."
    )

    @property
    def margins(self) -> Margins:
        return BLAZEFACE_MARGINS


DetectorConfig = Annotated[HaarConfig | BlazeFaceConfig, Field(discriminator="kind")]
DETECTOR_KINDS = ("blazeface", "haar")


def validate_detector_section(section: Any) -> Any:
    """A raw `detector` section validated as the config of the kind it names (for a service
    config's field validator). Errors name the keys as the operator wrote them (`detector.kind`,
    `detector.colour`), where the discriminated union would put the kind in the path."""
    if not isinstance(section, Mapping):
        return section
    classes: dict[str, type[DetectorSettings]] = {"blazeface": BlazeFaceConfig, "haar": HaarConfig}
    kind = section.get("kind")
    if kind not in classes:
        raise ValueError(
            f"detector.kind {kind!r} is not a face detector; known kinds: {', '.join(DETECTOR_KINDS)}"
        )
    try:
        return classes[kind].model_validate(dict(section))
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, ["detector"])) from None


def detector_section_for_kind(
    data: Any, default: DetectorSettings, per_kind: Mapping[str, DetectorSettings]
) -> Any:
    """A service config's `detector` section (raw, before validation) with the defaults of the kind
    it names. `load_config` merges the file and the environment over the service's defaults, which
    hold every key of the default detector: `detector.kind: haar` alone would carry BlazeFace's
    keys along. When the section names another kind than the default, keys still at the default
    detector's value are replaced by the service's defaults for that kind (`per_kind`); the keys
    the operator set are kept (one the kind lacks stays an error naming it). An unknown kind is
    left for validation to name."""
    if not isinstance(data, dict) or not isinstance(data.get("detector"), dict):
        return data
    section = data["detector"]
    kind = section.get("kind", getattr(default, "kind", None))
    if "kind" not in section:
        data = {**data, "detector": {**section, "kind": kind}}
    if kind == getattr(default, "kind", None) or kind not in per_kind:
        return data
    leftovers = default.model_dump()
    out = per_kind[kind].model_dump()
    for key, value in section.items():
        if key != "kind" and key in leftovers and value == leftovers[key]:
            continue
        out[key] = value
    return {**data, "detector": out}


class ChoosesDetector(StrictModel):
    """Base of a service config with a `detector` section (the field is the service's own: its
    default detector and description). The section is validated as the kind it names, and a kind
    other than the default's takes the service's defaults for that kind (`detector_defaults`)."""

    detector_defaults: ClassVar[Mapping[str, DetectorSettings]]  # by kind; the field's default among them

    @model_validator(mode="before")
    @classmethod
    def _detector_defaults_follow_kind(cls, data: Any) -> Any:
        return detector_section_for_kind(data, cls.model_fields["detector"].default, cls.detector_defaults)

    @field_validator("detector", mode="before", check_fields=False)
    @classmethod
    def _as_its_kind(cls, section: Any) -> Any:
        return validate_detector_section(section)


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
        for x, y, w, h, score, *rest in self._find(small, min_side):
            box = _clip(round(x / scale), round(y / scale), round(w / scale), round(h / scale), width, height)
            if box is not None:
                keypoints = (
                    tuple((float(kx / scale), float(ky / scale)) for kx, ky in rest[0]) if rest else ()
                )
                boxes.append(Box(*box, score=score, keypoints=keypoints))
        boxes.sort(key=lambda b: (-b.score, b.y, b.x))
        return boxes

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    @abstractmethod
    def _find(self, image: np.ndarray, min_side: int) -> Iterable[tuple]:
        """(x, y, w, h, score) of each face in `image` (the copy), sides of at least min_side; a
        sixth item, when given, holds the face's keypoints (k, 2) as x, y in the copy."""


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
        found = zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).ravel(), strict=False)
        return [(x, y, w, h, _logistic(float(weight))) for (x, y, w, h), weight in found]


def _logistic(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _clip(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


class BlazeFaceDetector(BoundedDetector):
    """MediaPipe's BlazeFace on ONNX Runtime (`services/vision/blazeface.py`), one session per
    network. Scores are MediaPipe's (a sigmoid). With `range: short_then_full` the full-range
    network runs only when the short-range one finds no face of at least `min_size`.

    The networks are loaded at once. A repository without them (one a test or a modeller made
    for other models) does not stop the service: the error is logged, each detection reports it
    (FAILED_PRECONDITION naming the model), and the networks load once they are there."""

    def __init__(self, config: BlazeFaceConfig, repository: Path | str) -> None:
        self.config = config
        super().__init__(config)
        self.repository = Path(repository)
        self._names = ([config.short_model] if config.range in ("short", "short_then_full") else []) + (
            [config.full_model] if config.range in ("full", "short_then_full") else []
        )
        self._models: list[BlazeFaceModel] | None = None
        self._lock = threading.Lock()
        try:
            self._load()
        except FailedPrecondition as exc:
            log.error("face detector: %s; detections fail until it is there", exc)

    @property
    def models(self) -> list[BlazeFaceModel]:
        return self._load()

    def _load(self) -> list[BlazeFaceModel]:
        models = self._models
        if models is None:
            with self._lock:
                if self._models is None:
                    self._models = [BlazeFaceModel(self.repository, name) for name in self._names]
                models = self._models
        return models

    def _find(self, image: np.ndarray, min_side: int) -> Iterable[tuple]:
        models = self._load()
        rgb = to_rgb(image)
        found: list = []
        for model in models:
            found = list(
                faces_in_image(model, rgb, self.config.score_threshold, self.config.nms_iou, min_side)
            )
            if found:
                break
        return found


def build_detector(
    config: HaarConfig | BlazeFaceConfig, repository: Path | str = Path("model_repository")
) -> FaceDetector:
    """The detector a config names; BlazeFace loads its networks from `repository` (the service's
    model repository)."""
    if isinstance(config, HaarConfig):
        return HaarDetector(config)
    if isinstance(config, BlazeFaceConfig):
        return BlazeFaceDetector(config, repository)
    raise InvalidArgument(f"unknown face detector config {type(config).__name__}")


def crop_region(
    width: int,
    height: int,
    box: Box,
    *,
    margin_px: int = 0,
    margin_ratio: float = 0.0,
    margins: Margins | None = None,
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the box grown on each side, then clipped to a width×height image.

    Each side grows by ``margin_px + margin_ratio * side`` pixels (side = the box's width for left
    and right, its height for top and bottom), rounded; or, with `margins`, by its pixels plus that
    side's own ratio (which may be negative). The result is never empty: a box that does not
    overlap the image is InvalidArgument. Needs only the image's size, so a request's crop pixels
    can be counted from the image headers, before anything is decoded.
    """
    if margins is None:
        if margin_px < 0 or margin_ratio < 0:
            raise InvalidArgument(f"crop margins must be >= 0, got {margin_px} px and ratio {margin_ratio}")
        margins = Margins.even(margin_ratio, margin_px)
    if box.w <= 0 or box.h <= 0:
        raise InvalidArgument(f"face box has an empty size {box.w}x{box.h}")
    m = margins
    top, bottom = round(m.pixels + m.top * box.h), round(m.pixels + m.bottom * box.h)
    left, right = round(m.pixels + m.left * box.w), round(m.pixels + m.right * box.w)
    grown_w, grown_h = box.w + left + right, box.h + top + bottom
    if grown_w <= 0 or grown_h <= 0:
        raise InvalidArgument(f"face box {box.w}x{box.h} shrinks to nothing with margins {margins}")
    clipped = _clip(box.x - left, box.y - top, grown_w, grown_h, width, height)
    if clipped is None:
        raise InvalidArgument(
            f"face box {box.x},{box.y} {box.w}x{box.h} lies outside the {width}x{height} image"
        )
    return clipped


def crop_view(
    bgr: np.ndarray,
    box: Box,
    *,
    margin_px: int = 0,
    margin_ratio: float = 0.0,
    margins: Margins | None = None,
) -> np.ndarray:
    """The grown, clipped box as a view into the image (no pixel copied: OpenCV reads views as
    they are, so preprocessing resizes straight from it). The view keeps the whole image alive."""
    height, width = bgr.shape[:2]
    x, y, w, h = crop_region(
        width, height, box, margin_px=margin_px, margin_ratio=margin_ratio, margins=margins
    )
    return bgr[y : y + h, x : x + w]


def crop_with_margin(
    bgr: np.ndarray,
    box: Box,
    *,
    margin_px: int = 0,
    margin_ratio: float = 0.0,
    margins: Margins | None = None,
) -> np.ndarray:
    """A copy of `crop_view`: contiguous, and the frame can be freed while the crop is kept."""
    return crop_view(bgr, box, margin_px=margin_px, margin_ratio=margin_ratio, margins=margins).copy()
