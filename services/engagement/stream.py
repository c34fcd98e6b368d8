"""Frame sequences: a whole clip scored once, or a live stream scored every hop.

Both keep only what the models need per frame — a 64×64 gray crop and its HOG, about 11 KB —
never the frames, so a 30-second clip or an endless stream holds a few megabytes.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

import numpy as np

from services.engagement.pipeline import (
    EngagementPipeline,
    FaceTracker,
    FrameFace,
    ModelOutputs,
    ModelSettings,
)
from services.runtime.errors import InvalidArgument, ResourceExhausted
from services.vision.inputs import ImageInput


def check_fps(fps: float) -> None:
    """A clip's or stream's frame rate: a finite number > 0, or INVALID_ARGUMENT for the call."""
    if not math.isfinite(fps) or fps <= 0:
        raise InvalidArgument(
            f"ClipHeader.fps must be a finite number of frames per second above 0, got {fps}"
        )


class _Frames:
    def __init__(self, pipeline: EngagementPipeline, settings: ModelSettings, keep: int | None) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.tracker = FaceTracker(pipeline.detector, pipeline.config.tracking)
        self.faces: deque[FrameFace] = deque(maxlen=keep)
        self.received = 0
        self.with_face = 0
        self.last_timestamp_us: int | None = None

    def _check_timestamp(self, timestamp_us: int | None) -> None:
        """A frame's timestamp may not go below the previous frame's. The previous frame's counts
        even when that frame was refused, so a clock that restarts is reported on one frame, not
        on every frame until it catches up."""
        if timestamp_us is None:
            return
        previous, self.last_timestamp_us = self.last_timestamp_us, timestamp_us
        if previous is not None and timestamp_us < previous:
            raise InvalidArgument(
                f"timestamp {timestamp_us} µs goes backwards (the previous frame's was {previous} µs)"
            )

    async def _add(self, image: ImageInput, timestamp_us: int | None) -> FrameFace:
        self.received += 1
        self._check_timestamp(timestamp_us)  # before any work on the frame
        face = await asyncio.to_thread(self.pipeline.frame_face, image, self.tracker, self.settings)
        self.faces.append(face)
        self.with_face += face.box is not None
        return face

    async def _score(self, min_faces: int) -> ModelOutputs | None:
        # A frame has its crop and HOG exactly when a face was found in it.
        crops = [f.crop for f in self.faces if f.crop is not None]
        hogs = [f.hog for f in self.faces if f.hog is not None]
        if len(crops) < min_faces:
            return None
        return await self.pipeline.score(crops, np.stack(hogs), self.settings)


class Clip(_Frames):
    """A finished clip: frames in order, both models once at the end."""

    def __init__(self, pipeline: EngagementPipeline, settings: ModelSettings) -> None:
        super().__init__(pipeline, settings, keep=None)

    async def add(self, image: ImageInput, timestamp_us: int | None = None) -> FrameFace:
        """One more frame; its timestamp (when given) may not go backwards."""
        limit = self.pipeline.config.max_frames_per_clip
        if self.received >= limit:
            raise ResourceExhausted(f"the clip has more than {limit} frames (max_frames_per_clip)")
        return await self._add(image, timestamp_us)

    async def finish(self) -> ModelOutputs | None:
        """Both models' outputs, or None when too few frames had a face to judge."""
        return await self._score(self.pipeline.config.min_face_frames)


class LiveWindow(_Frames):
    """A live stream: every `hop_frames` frames, both models over the last `window_frames`."""

    def __init__(self, pipeline: EngagementPipeline, settings: ModelSettings) -> None:
        super().__init__(pipeline, settings, keep=pipeline.config.stream.window_frames)

    async def add(
        self, image: ImageInput, timestamp_us: int | None = None
    ) -> tuple[FrameFace, ModelOutputs | None]:
        """One more frame (a timestamp going backwards is InvalidArgument for this frame alone)."""
        face = await self._add(image, timestamp_us)
        stream = self.pipeline.config.stream
        if self.received % stream.hop_frames:
            return face, None
        return face, await self._score(stream.min_face_frames)
