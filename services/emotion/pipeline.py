"""Emotion pipeline, plain Python: decode → faces → crops → per-model preprocess → logits.

It returns each requested model's logits per face; fusion and calibration happen in
`services.fusion.emotion`, called by the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.emotion.config import EmotionConfig
from services.runtime.backends.base import Backend
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from services.runtime.servicing import check_batch_size
from services.vision.faces import Box, FaceDetector, crop_with_margin
from services.vision.inputs import ImageInput, decode_input
from services.vision.preprocess import PreprocessParams, load_params, preprocess_faces


@dataclass
class FaceOutput:
    box: Box
    logits: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ImageOutput:
    faces: list[FaceOutput] = field(default_factory=list)
    error: Exception | None = None


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: int | None
    backend: str
    temperature: float
    class_names: tuple[str, ...]


class EmotionPipeline:
    def __init__(self, config: EmotionConfig, repository: ModelRepository, backend: Backend,
                 detector: FaceDetector, metrics: Metrics) -> None:
        self.config = config
        self.repository = repository
        self.backend = backend
        self.detector = detector
        self.metrics = metrics
        self._params: dict[tuple[str, int | None], PreprocessParams] = {}

    def served_models(self) -> list[ServedModel]:
        """Models the backend has ready, with what the gateway needs to calibrate them."""
        out = []
        for status in self.backend.models():
            if not status.ready:
                continue
            try:
                params = self._params_for(status.name, status.version)
            except FailedPrecondition:
                continue  # not an emotion model (no preprocessing stored beside it)
            out.append(ServedModel(status.name, status.version, status.backend, params.temperature,
                                   tuple(params.class_names)))
        return out

    def _params_for(self, model: str, version: int | None) -> PreprocessParams:
        key = (model, version)
        if key not in self._params:
            path = self.repository.get(model).file("preprocess.json", version)
            if not path.is_file():
                raise FailedPrecondition(f"model {model} has no preprocess.json beside it ({path})")
            try:
                self._params[key] = load_params(path)
            except ValueError as exc:
                raise FailedPrecondition(f"model {model}: {exc}") from None
        return self._params[key]

    def check_models(self, models: Sequence[str]) -> list[ServedModel]:
        """The request's models as served, or FAILED_PRECONDITION naming the missing ones."""
        if not models:
            raise InvalidArgument("no models requested")
        served = {m.name: m for m in self.served_models()}
        missing = [m for m in models if m not in served]
        if missing:
            raise FailedPrecondition(
                f"model(s) {', '.join(missing)} are not served (model repository {self.repository.root}); "
                f"served: {', '.join(sorted(served)) or 'none'}")
        return [served[m] for m in models]

    async def run(self, images: Sequence[ImageInput], served: Sequence[ServedModel]) -> list[ImageOutput]:
        """Each face of each image with the logits of the models `check_models` returned."""
        check_batch_size(len(images), self.config.max_images_per_request, "images")
        outputs = await asyncio.gather(*(asyncio.to_thread(self._faces, image) for image in images))
        crops = [crop for out, image_crops in outputs for crop in image_crops]
        results = [out for out, _ in outputs]
        if crops:
            batches: dict[str, np.ndarray] = {}  # ensemble members usually share their preprocessing
            for model in served:
                logits = await self._logits(model, crops, batches)
                faces = iter(f for r in results for f in r.faces)
                for face, row in zip(faces, logits, strict=True):
                    face.logits[model.name] = row
        return results

    def _faces(self, image: ImageInput) -> tuple[ImageOutput, list[np.ndarray]]:
        """Decode and locate faces of one image (in a worker thread: detection costs tens of ms)."""
        try:
            with self.metrics.stage("decode"):
                bgr = decode_input(image, self.config.decode)
            if image.is_face_crop:
                h, w = bgr.shape[:2]
                boxes: Sequence[Box] = [Box(0, 0, w, h, 1.0)]
                crops = [bgr]
            else:
                if image.boxes:
                    boxes = image.boxes
                else:
                    with self.metrics.stage("detect"):
                        boxes = self.detector.detect(bgr)
                boxes = boxes[: self.config.max_faces_per_image]
                m = self.config.margin
                crops = [crop_with_margin(bgr, b, margin_px=m.pixels, margin_ratio=m.ratio) for b in boxes]
            return ImageOutput(faces=[FaceOutput(box) for box in boxes]), crops
        except Exception as exc:  # noqa: BLE001 - reported on this image; the others are answered
            return ImageOutput(error=exc), []

    async def _logits(self, model: ServedModel, crops: list[np.ndarray], batches: dict[str, np.ndarray]
                      ) -> np.ndarray:
        params = self._params_for(model.name, model.version)
        batch = batches.get(params.pixels_key)
        if batch is None:
            with self.metrics.stage("preprocess", model.name):
                batch = batches[params.pixels_key] = await asyncio.to_thread(preprocess_faces, crops, params)
        limit = self.repository.get(model.name).config.max_batch_size or len(batch)
        # Members run one after another: on a CPU both cores already serve each run.
        parts = []
        for start in range(0, len(batch), limit):
            result = await self.backend.infer(model.name, {params.input_name: batch[start:start + limit]})
            parts.append(result.outputs[params.output_name])
        return np.concatenate(parts).astype(np.float32, copy=False)
