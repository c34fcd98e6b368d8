"""Engagement pipeline, plain Python: frames → a tracked face → crops → both models' per-affect
probabilities.

Per frame (in a worker thread): decode, locate the face (the detector every few frames, the
last box in between), crop it gray 64×64, and compute its HOG. Per clip or per stream hop: the
XGBoost boosters (one per affect) take the mean HOG of the frames with a face; the temporal
network takes a fixed number of those crops, evenly spaced. The decision between the two is
the fusion rules' (`services.fusion.engagement`, called by the gateway): this returns both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.engagement.config import EngagementConfig, TrackingConfig
from services.engagement.features import HOG_FILENAME, HogParams, face_crop, hog_features
from services.fusion.rules import AFFECTS
from services.runtime.errors import FailedPrecondition
from services.runtime.metrics import Metrics
from services.runtime.servicing import ServedModel, is_demo
from services.vision.face_pipeline import FacePipeline
from services.vision.faces import Box, FaceDetector
from services.vision.inputs import ImageInput, decode_input
from services.vision.preprocess import PreprocessParams, load_params, preprocess_faces

PREPROCESS_FILE = "preprocess.json"

# model name → affect → four level probabilities
ModelOutputs = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class FrameFace:
    """One frame's face: its box, gray crop and HOG; box None when no face was found."""

    box: Box | None
    crop: np.ndarray | None = None
    hog: np.ndarray | None = None


@dataclass(frozen=True)
class ModelSettings:
    """What the served versions need: the temporal network's input and the boosters' features."""

    temporal: PreprocessParams
    frames: int  # crops per temporal run (the network's time axis)
    hog: HogParams


class FaceTracker:
    """The face of a frame sequence: detected every `detect_every` frames (and at once when
    there is none), the last box carried in between. One per clip or stream."""

    def __init__(self, detector: FaceDetector, config: TrackingConfig) -> None:
        self.detector = detector
        self.config = config
        self.box: Box | None = None
        self._since_detection = 0

    def locate(self, bgr: np.ndarray, image: ImageInput, metrics: Metrics | None = None) -> Box | None:
        if image.is_face_crop:
            h, w = bgr.shape[:2]
            return Box(0, 0, w, h)
        if image.boxes:  # the caller located it
            self.box, self._since_detection = image.boxes[0], 0
            return self.box
        if self.box is not None and self._since_detection + 1 < self.config.detect_every:
            self._since_detection += 1
            return self.box
        if metrics is not None:
            with metrics.stage("detect"):
                boxes = self.detector.detect(bgr)
        else:
            boxes = self.detector.detect(bgr)
        self.box = boxes[0] if boxes else None
        self._since_detection = 0
        return self.box


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """`count` indices spread over range(n), first and last included (repeats when n < count)."""
    return np.rint(np.linspace(0, n - 1, count)).astype(np.int64)


@dataclass(eq=False)
class EngagementPipeline(FacePipeline[EngagementConfig]):
    _settings: dict[tuple, ModelSettings] = field(default_factory=dict, init=False, repr=False)

    # -- models

    @property
    def model_names(self) -> list[str]:
        return [self.config.temporal_model, *self.config.xgboost_models.values()]

    def served_models(self) -> list[ServedModel]:
        ready = {s.name: s for s in self.backend.models() if s.ready}
        out = []
        for name in self.model_names:
            if name in ready:
                demo = name in self.repository and is_demo(self.repository.get(name).parameters)
                out.append(ServedModel(name, ready[name].version, ready[name].backend, demo))
        return out

    def require(self, purpose: str) -> ModelSettings:
        """The served versions' settings, or FAILED_PRECONDITION naming what is missing."""
        served = {m.name: m for m in self.served_models()}
        missing = [n for n in self.model_names if n not in served]
        if missing:
            raise FailedPrecondition(
                f"{purpose} needs model(s) {', '.join(missing)}, which are not served from the model repository "
                f"{self.repository.root}; build the demo ones with `make models`"
            )
        key = tuple((m.name, m.version) for m in served.values())
        if key not in self._settings:
            self._settings = {key: self._load_settings(served)}  # only the current versions' settings
        return self._settings[key]

    def _load_settings(self, served: dict[str, ServedModel]) -> ModelSettings:
        temporal = served[self.config.temporal_model]
        entry = self.repository.get(temporal.name)
        try:
            params = load_params(entry.file(PREPROCESS_FILE, temporal.version))
        except ValueError as exc:
            raise FailedPrecondition(f"model {temporal.name}: {exc}") from None
        dims = list(entry.config.input[0].dims) if entry.config is not None and entry.config.input else []
        if len(dims) < 2 or dims[0] < 1:
            raise FailedPrecondition(
                f"model {temporal.name}: its input needs a time axis first "
                f"([frames, channels, height, width]); config.pbtxt says {dims}"
            )
        hogs = []
        for affect, name in self.config.xgboost_models.items():
            path = self.repository.get(name).file(HOG_FILENAME, served[name].version)
            try:
                hogs.append(HogParams.load(path))
            except (OSError, ValueError) as exc:
                raise FailedPrecondition(
                    f"booster {name} ({affect}): no usable {HOG_FILENAME} beside it: {exc}"
                ) from None
        if any(h != hogs[0] for h in hogs[1:]):
            raise FailedPrecondition(
                "the engagement boosters were trained on different HOG settings "
                f"({', '.join(self.config.xgboost_models.values())})"
            )
        return ModelSettings(params, int(dims[0]), hogs[0])

    # -- per frame

    def frame_face(self, image: ImageInput, tracker: FaceTracker, settings: ModelSettings) -> FrameFace:
        """Decode one frame and find, crop and describe its face (CPU work: call from a thread)."""
        with self.metrics.stage("decode"):
            bgr = decode_input(image, self.config.decode)
        box = tracker.locate(bgr, image, self.metrics)
        if box is None:
            return FrameFace(None)
        with self.metrics.stage("preprocess"):
            crop = face_crop(bgr, (box.x, box.y, box.w, box.h), margin=self.config.crop_margins)
            hog = hog_features(crop[None], settings.hog)[0]
        return FrameFace(box, crop, hog)

    # -- per clip or hop

    async def score(
        self, crops: Sequence[np.ndarray], hogs: np.ndarray, settings: ModelSettings
    ) -> ModelOutputs:
        """Both models over the frames with a face: the boosters on the mean HOG, the temporal
        network on `settings.frames` crops spread evenly over them."""
        picked = [crops[i] for i in evenly_spaced(len(crops), settings.frames)]
        with self.metrics.stage("preprocess", self.config.temporal_model):
            frames = await asyncio.to_thread(preprocess_faces, picked, settings.temporal)
        mean_hog = np.asarray(hogs, np.float32).mean(axis=0, keepdims=True)
        temporal_run = self.backend.infer(
            self.config.temporal_model, {settings.temporal.input_name: frames[None]}
        )
        booster_runs = [
            self.backend.infer(name, {"input__0": mean_hog}) for name in self.config.xgboost_models.values()
        ]
        temporal, *boosters = await asyncio.gather(temporal_run, *booster_runs)
        levels = np.asarray(temporal.outputs[settings.temporal.output_name], np.float32)[0]
        if levels.shape != (len(AFFECTS), 4):
            raise FailedPrecondition(
                f"model {self.config.temporal_model} answered shape {list(levels.shape)}, "
                f"expected [{len(AFFECTS)}, 4] (affect × level)"
            )
        xgb = {
            affect: np.asarray(result.outputs["output__0"], np.float32)[0]
            for affect, result in zip(self.config.xgboost_models, boosters, strict=True)
        }
        return {
            self.config.temporal_model: dict(zip(AFFECTS, levels, strict=True)),
            self.config.xgboost_model: xgb,
        }
