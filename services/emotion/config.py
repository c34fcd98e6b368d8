"""Configuration of the emotion service."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

from pydantic import Field

from services.runtime.backends.onnx import OnnxConfig
from services.runtime.backends.triton import TritonConfig
from services.runtime.config import ServiceConfig
from services.vision.decode import DecodeLimits
from services.vision.faces import (
    BlazeFaceConfig,
    ChoosesDetector,
    CropMargin,
    DetectorConfig,
    DetectorSettings,
    HaarConfig,
    Margins,
)

__all__ = ["DETECTOR_DEFAULTS", "CropMargin", "EmotionConfig"]

# The service's default detector of each kind: `detector.kind: haar` alone gives HaarConfig().
DETECTOR_DEFAULTS: dict[str, DetectorConfig] = {"blazeface": BlazeFaceConfig(), "haar": HaarConfig()}


class EmotionConfig(ServiceConfig, ChoosesDetector):
    detector_defaults: ClassVar[Mapping[str, DetectorSettings]] = DETECTOR_DEFAULTS

    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="In-process ONNX Runtime, or a Triton server (same repository)."
    )
    onnx: OnnxConfig = OnnxConfig()
    triton: TritonConfig = TritonConfig()
    decode: DecodeLimits = DecodeLimits()
    detector: DetectorConfig = Field(
        DETECTOR_DEFAULTS["blazeface"],
        description="The face detector, by `kind`: blazeface (MediaPipe's "
        "BlazeFace on ONNX Runtime, the default) or haar (OpenCV's cascade: the boxes fer's models were "
        "trained on). Read at start.",
    )
    margin: CropMargin = Field(
        CropMargin(),
        description="Crop margins around each face box; unset sides take "
        "the detector's defaults (`crop_margins`).",
    )
    models: list[str] = Field(
        ["emotion_*"],
        description="Names (glob patterns) of the repository's models this service serves; "
        "the other services' models in the same repository are left alone.",
    )
    max_images_per_request: int = Field(32, gt=0)
    max_faces_per_image: int = Field(32, gt=0)
    # A request's decoded images stay in memory until its last face is preprocessed (the crops
    # are views into them), so this bounds the pixels one request holds: 80 M is two images at
    # decode.max_pixels, 240 MB of BGR.
    max_decoded_pixels_per_request: int = Field(
        80_000_000,
        gt=0,
        description="Largest sum of width*height over a request's images, read from their "
        "headers before any is decoded; beyond, the request is RESOURCE_EXHAUSTED. Images over "
        "decode.max_pixels are refused on their own and not counted.",
    )
    # Preprocessing converts every crop at full size before resizing it, so the crops' pixels are
    # the work (and the largest transient copy) of a request: 32 boxes that each cover a 6000²
    # photo would be 1.15 G pixels.
    max_crop_pixels_per_request: int = Field(
        80_000_000,
        gt=0,
        description="Largest sum of the face crops' areas (boxes with their margin, "
        "clipped to the image; a face crop image counts whole) over a request; beyond, the request is "
        "RESOURCE_EXHAUSTED. Checked from the headers before decoding for caller boxes and face crops, "
        "after detection (before any crop is preprocessed) for detected faces.",
    )
    preprocess_slice: int = Field(
        64,
        gt=0,
        description="Most face crops preprocessed at once into a model's input (a model's smaller "
        "max_batch_size wins): bounds the float input a request holds whatever its number of faces.",
    )

    @property
    def crop_margins(self) -> Margins:
        """The margins crops are cut with: the configured ones over the detector's defaults."""
        return self.margin.resolve(self.detector.margins)

    def serves(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)
