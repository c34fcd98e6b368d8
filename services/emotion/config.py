"""Configuration of the emotion service."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

from pydantic import Field

from services.runtime.backends.onnx import OnnxConfig
from services.runtime.backends.triton import TritonConfig
from services.runtime.config import ServiceConfig, StrictModel
from services.vision.decode import DecodeLimits
from services.vision.faces import HaarConfig


class CropMargin(StrictModel):
    """Each side of a face box grows by pixels + ratio × side before cropping."""

    pixels: int = Field(0, ge=0)
    ratio: float = Field(0.1, ge=0, le=1)


class EmotionConfig(ServiceConfig):
    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="In-process ONNX Runtime, or a Triton server (same repository).")
    onnx: OnnxConfig = OnnxConfig()
    triton: TritonConfig = TritonConfig()
    decode: DecodeLimits = DecodeLimits()
    detector: HaarConfig = HaarConfig()
    margin: CropMargin = CropMargin()
    models: list[str] = Field(
        ["emotion_*"], description="Names (glob patterns) of the repository's models this service serves; "
        "the other services' models in the same repository are left alone.")
    max_images_per_request: int = Field(32, gt=0)
    max_faces_per_image: int = Field(32, gt=0)

    def serves(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)
