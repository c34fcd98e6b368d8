"""Configuration of the engagement service."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.fusion.rules import AFFECTS
from services.runtime.backends.onnx import OnnxConfig
from services.runtime.backends.xgb import XgbConfig
from services.runtime.config import ServiceConfig, StrictModel
from services.vision.decode import DecodeLimits
from services.vision.faces import HaarConfig


class TrackingConfig(StrictModel):
    """Faces in a frame sequence: detect now and then, carry the box in between."""

    detect_every: int = Field(
        5, ge=1, description="Run the detector on every n-th frame; frames in between reuse its box. "
        "A frame without a box is detected at once.")
    margin: float = Field(0.1, ge=0, le=1, description="Each side of the face box grows by this share.")


class StreamConfig(StrictModel):
    """Live streams: the models run every `hop_frames` over the last `window_frames` frames."""

    hop_frames: int = Field(15, ge=1, description="Frames between two model runs (0.5 s at 30 fps).")
    window_frames: int = Field(300, ge=1, description="Frames the models look back over (10 s at 30 fps).")
    min_face_frames: int = Field(8, ge=1, description="Fewest frames with a face for the models to run.")


class EngagementConfig(ServiceConfig):
    temporal_model: str = "engagement_temporal"
    # One 4-class booster per affect, named <prefix>_<affect> (the FIL layout holds one booster).
    xgboost_model: str = "engagement_xgb"
    onnx: OnnxConfig = OnnxConfig()
    xgb: XgbConfig = XgbConfig()
    decode: DecodeLimits = DecodeLimits()
    # Video frames are 640×480 or so: detecting on a 320-px copy keeps a frame well inside 33 ms.
    detector: HaarConfig = HaarConfig(detect_max_side=320, min_size=40)
    tracking: TrackingConfig = TrackingConfig()
    stream: StreamConfig = StreamConfig()
    max_frames_per_clip: int = Field(900, gt=0, description="30 s at 30 fps.")
    min_face_frames: int = Field(8, ge=1, description="Fewest frames with a face for a clip to be scored.")

    @property
    def xgboost_models(self) -> dict[str, str]:
        """Booster name per affect."""
        return {affect: f"{self.xgboost_model}_{affect}" for affect in AFFECTS}

    @model_validator(mode="after")
    def _window_holds_enough(self) -> EngagementConfig:
        if self.stream.min_face_frames > self.stream.window_frames:
            raise ValueError("stream.min_face_frames cannot exceed stream.window_frames")
        return self
