"""Emotion pipeline, plain Python: decode → faces → crops → per-model preprocess → logits.

Work and memory per request are bounded: the decoded pixels and the crop pixels of a request have
budgets checked before the work they bound; crops are views into the decoded image, preprocessed
one batch slice at a time; and a call that is cancelled or past its deadline stops between stages.

It returns each requested model's logits per face; fusion and calibration happen in
`services.fusion.emotion`, called by the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from services.emotion.config import EmotionConfig
from services.emotion.stop import CallStopped, StopSignal
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.runtime.servicing import ServedModel, check_batch_size
from services.vision.decode import read_header
from services.vision.face_pipeline import FacePipeline
from services.vision.faces import Box, crop_region, crop_view
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


@runtime_checkable
class RemoteBackend(Protocol):
    """A backend whose models run on a server it can lose (Triton)."""

    def unreachable(self, model: str) -> str | None:
        """Why `model` is not served now when it is its server being unreachable; else None."""


@dataclass(eq=False)
class EmotionPipeline(FacePipeline[EmotionConfig]):
    _params: dict[tuple[str, int | None], PreprocessParams] = field(
        default_factory=dict, init=False, repr=False
    )

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
            out.append(
                ServedModel(
                    status.name,
                    status.version,
                    status.backend,
                    temperature=params.temperature,
                    class_names=tuple(params.class_names),
                )
            )
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
        """The request's models as served; UNAVAILABLE when they are missing because their server
        is unreachable, else FAILED_PRECONDITION naming the missing ones."""
        if not models:
            raise InvalidArgument("no models requested")
        repeated = sorted({m for m in models if list(models).count(m) > 1})
        if repeated:
            raise InvalidArgument(f"model(s) {', '.join(repeated)} named more than once")
        served = {m.name: m for m in self.served_models()}
        missing = [m for m in models if m not in served]
        if missing and isinstance(self.backend, RemoteBackend):
            # The models' server is down, not the models gone: UNAVAILABLE, which callers retry.
            reasons = [self.backend.unreachable(m) for m in missing]
            if all(reasons):
                raise Unavailable(f"model(s) {', '.join(missing)} cannot run now: {reasons[0]}")
        if missing:
            # No server path in the message: callers see names only.
            raise FailedPrecondition(
                f"model(s) {', '.join(missing)} are not served by this emotion service; "
                f"served: {', '.join(sorted(served)) or 'none'}"
            )
        return [served[m] for m in models]

    async def run(
        self, images: Sequence[ImageInput], served: Sequence[ServedModel], stop: StopSignal | None = None
    ) -> list[ImageOutput]:
        """Each face of each image with the logits of the models `check_models` returned. `stop`
        (the call's deadline and cancellation) is checked between stages, in the worker threads
        too; when it fires the call ends with CallStopped and no further stage starts."""
        stop = stop or StopSignal()
        check_batch_size(len(images), self.config.max_images_per_request, "images")
        # Headers only: a request over its pixel budgets is refused before any pixel is decoded.
        await asyncio.to_thread(self._check_budgets, images)
        outputs = await asyncio.gather(*(asyncio.to_thread(self._faces, image, stop) for image in images))
        crops = [crop for _, image_crops in outputs for crop in image_crops]
        results = [out for out, _ in outputs]
        del outputs
        # Detected faces are known only now: the same budget, before any crop is preprocessed.
        self._check_crop_pixels(sum(c.shape[0] * c.shape[1] for c in crops))
        if crops:
            logits = await self._logits(served, crops, stop)
            for model in served:
                faces = iter(f for r in results for f in r.faces)
                for face, row in zip(faces, logits[model.name], strict=True):
                    face.logits[model.name] = row
        return results

    def _check_budgets(self, images: Sequence[ImageInput]) -> None:
        """The request's decoded pixels, and the crop pixels of caller boxes and face crops, from
        the headers: RESOURCE_EXHAUSTED naming the limit. An image whose header is unreadable or
        over the per-image limits is left out: it is refused on its own when decoded."""
        limits = self.config.decode
        decoded = cropped = 0
        for image in images:
            if image.encoded is not None and len(image.encoded) > limits.max_encoded_bytes:
                continue
            size = _header_size(image)
            if size is None or size[0] * size[1] > limits.max_pixels:
                continue
            width, height = size
            decoded += width * height
            if image.is_face_crop:
                cropped += width * height
            elif image.boxes:
                cropped += self._boxes_pixels(image.boxes[: self.config.max_faces_per_image], width, height)
        if decoded > self.config.max_decoded_pixels_per_request:
            raise ResourceExhausted(
                f"the request's images total {decoded} pixels, over the limit of "
                f"{self.config.max_decoded_pixels_per_request} (max_decoded_pixels_per_request)"
            )
        self._check_crop_pixels(cropped)

    def _boxes_pixels(self, boxes: Sequence[Box], width: int, height: int) -> int:
        """Crop pixels of caller boxes. The decoder may turn a JPEG by its EXIF orientation, so
        both orientations are tried and the smaller count taken: never more than the real one (the
        exact count is checked again after decoding)."""
        margins = self.config.crop_margins
        counts = []
        for w, h in {(width, height), (height, width)}:
            total = 0
            for box in boxes:
                try:
                    _, _, cw, ch = crop_region(w, h, box, margins=margins)
                except InvalidArgument:
                    continue  # reported on its image
                total += cw * ch
            counts.append(total)
        return min(counts)

    def _check_crop_pixels(self, pixels: int) -> None:
        if pixels > self.config.max_crop_pixels_per_request:
            raise ResourceExhausted(
                f"the request's face crops total {pixels} pixels, over the limit of "
                f"{self.config.max_crop_pixels_per_request} (max_crop_pixels_per_request)"
            )

    def _faces(self, image: ImageInput, stop: StopSignal) -> tuple[ImageOutput, list[np.ndarray]]:
        """Decode and locate faces of one image (in a worker thread: detection costs tens of ms).
        The crops are views into the decoded image: nothing is copied before preprocessing."""
        try:
            stop.check("decoding")  # the thread may start late, after the call ended
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
                    stop.check("face detection")
                    with self.metrics.stage("detect"):
                        boxes = self.detector.detect(bgr)
                boxes = boxes[: self.config.max_faces_per_image]
                stop.check("cropping")
                margins = self.config.crop_margins
                crops = [crop_view(bgr, b, margins=margins) for b in boxes]
            return ImageOutput(faces=[FaceOutput(box) for box in boxes]), crops
        except CallStopped:
            raise  # the whole call ends, not this image
        except Exception as exc:
            return ImageOutput(error=exc), []

    async def _logits(
        self, served: Sequence[ServedModel], crops: list[np.ndarray], stop: StopSignal
    ) -> dict[str, np.ndarray]:
        """Each model's logits for the crops. Models with the same pixel recipe (ensemble members
        usually) share each preprocessed slice; a slice is at most the smallest max_batch_size of
        those models (and `preprocess_slice`), so a request never holds more preprocessed input
        than one batch, however many faces it has."""
        groups: dict[str, list[tuple[ServedModel, PreprocessParams]]] = {}
        slice_size: dict[str, int] = {}
        for model in served:
            params = self._params_for(model.name, model.version)
            key = params.pixels_key
            groups.setdefault(key, []).append((model, params))
            config = self.repository.get(model.name).config
            limit = (config.max_batch_size if config else 0) or self.config.preprocess_slice
            slice_size[key] = min(slice_size.get(key, self.config.preprocess_slice), limit)
        parts: dict[str, list[np.ndarray]] = {model.name: [] for model in served}
        for key, members in groups.items():
            size, (first, first_params) = slice_size[key], members[0]
            for start in range(0, len(crops), size):
                stop.check("preprocessing")
                with self.metrics.stage("preprocess", first.name):
                    batch = await asyncio.to_thread(
                        preprocess_faces, crops[start : start + size], first_params
                    )
                # Members run one after another: on a CPU both cores already serve each run.
                for model, params in members:
                    stop.check("inference")
                    result = await self.backend.infer(model.name, {params.input_name: batch})
                    parts[model.name].append(result.outputs[params.output_name])
                del batch
        return {name: np.concatenate(p).astype(np.float32, copy=False) for name, p in parts.items()}


def _header_size(image: ImageInput) -> tuple[int, int] | None:
    """(width, height) from the encoded image's header or the raw image's fields; None when
    unreadable (the image is then refused on its own when decoded)."""
    if image.encoded is not None:
        try:
            header = read_header(image.encoded)
        except InvalidArgument:
            return None
        return header.width, header.height
    if image.raw is not None and image.raw.width > 0 and image.raw.height > 0:
        return image.raw.width, image.raw.height
    return None
