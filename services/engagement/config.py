"""Configuration of the engagement service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from services.fusion.rules import AFFECTS
from services.runtime.backends.onnx import OnnxConfig
from services.runtime.backends.xgb import XgbConfig
from services.runtime.config import ServiceConfig, StrictModel
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

# Video frames are 640×480 or so, faces at arm's length (110-160 px): the short-range model, on a
# 320-px copy, smallest face 40 px. Haar on the same copy keeps a frame well inside 33 ms too.
DETECTOR_DEFAULTS: dict[str, DetectorConfig] = {
    "blazeface": BlazeFaceConfig(range="short", detect_max_side=320, min_size=40),
    "haar": HaarConfig(detect_max_side=320, min_size=40),
}


class TrackingConfig(StrictModel):
    """Faces in a frame sequence: detect now and then, carry the box in between."""

    detect_every: int = Field(
        1,
        ge=1,
        description="Run the detector on every n-th frame; frames in between reuse its box. "
        "A frame without a box is detected at once. 1: every frame (BlazeFace's short range costs ~2 ms: "
        "a 640×480 frame then takes 4.0 ms on average through the pipeline, vs 6.9 ms with Haar every "
        "5th frame, and the box never lags); set 5 with kind: haar.",
    )
    margin: CropMargin = Field(
        CropMargin(),
        description="Crop margins around the face box; unset sides take "
        "the detector's defaults. A number is the share every side grows by.",
    )

    @field_validator("margin", mode="before")
    @classmethod
    def _a_number_is_a_ratio(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"ratio": value}
        return value


class StreamConfig(StrictModel):
    """Live streams: the models run every `hop_frames` over the last `window_frames` frames."""

    hop_frames: int = Field(15, ge=1, description="Frames between two model runs (0.5 s at 30 fps).")
    window_frames: int = Field(300, ge=1, description="Frames the models look back over (10 s at 30 fps).")
    min_face_frames: int = Field(8, ge=1, description="Fewest frames with a face for the models to run.")


class EngagementConfig(ServiceConfig, ChoosesDetector):
    detector_defaults: ClassVar[Mapping[str, DetectorSettings]] = DETECTOR_DEFAULTS

    temporal_model: str = "engagement_temporal"
    # One 4-class booster per affect, named <prefix>_<affect> (the FIL layout holds one booster).
    xgboost_model: str = "engagement_xgb"
    onnx: OnnxConfig = OnnxConfig()
    xgb: XgbConfig = XgbConfig()
    decode: DecodeLimits = DecodeLimits()
    detector: DetectorConfig = Field(
        DETECTOR_DEFAULTS["blazeface"],
        description="The face detector, by `kind` "
        "(blazeface or haar), as the emotion service's. Read at start.",
    )
    tracking: TrackingConfig = TrackingConfig()
    stream: StreamConfig = StreamConfig()
    max_frames_per_clip: int = Field(900, gt=0, description="30 s at 30 fps.")
    min_face_frames: int = Field(8, ge=1, description="Fewest frames with a face for a clip to be scored.")

    @property
    def crop_margins(self) -> Margins:
        """The margins face crops are cut with: the configured ones over the detector's defaults."""
        return self.tracking.margin.resolve(self.detector.margins)

    @property
    def xgboost_models(self) -> dict[str, str]:
        """Booster name per affect."""
        return {affect: f"{self.xgboost_model}_{affect}" for affect in AFFECTS}

    @model_validator(mode="after")
    def _window_holds_enough(self) -> EngagementConfig:
        if self.stream.min_face_frames > self.stream.window_frames:
            raise ValueError("stream.min_face_frames cannot exceed stream.window_frames")
        return self
