"""Configuration of the engagement service."""

from __future__ import annotations

from pydantic import Field

from services.runtime.config import ServiceConfig


class EngagementConfig(ServiceConfig):
    temporal_model: str = "engagement_temporal"
    xgboost_model: str = "engagement_xgb"
    max_frames_per_clip: int = Field(900, gt=0, description="30 s at 30 fps.")
