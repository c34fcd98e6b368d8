"""The Python client's live stream against a running suite: answers reach the caller as they come."""

from __future__ import annotations

import time
from collections.abc import Iterator

from launcher.suite import Suite
from tessera_client import TesseraClient
from tools.modeller.engagement.generate import encode_jpeg, make_clip

GAP = 0.5  # seconds between two frames of the slow source: far longer than a frame's answer


def test_an_answer_does_not_wait_for_the_next_frame(suite: Suite) -> None:
    """A camera's (or any paced) source blocks until its next frame. Before: the client held its
    state lock while it waited for the source, so the answer to frame i reached the caller only
    once frame i + 1 had been read — every answer one frame late."""
    frames = [
        encode_jpeg(f)
        for f in make_clip(
            {"engagement": 3, "boredom": 0, "confusion": 1, "frustration": 0}, n_frames=6, seed=5
        )
    ]
    handed_out: list[float] = []

    def slow_camera() -> Iterator[bytes]:
        for i, frame in enumerate(frames):
            if i:
                time.sleep(GAP)
            handed_out.append(time.perf_counter())
            yield frame

    answered: list[float] = []
    with TesseraClient(suite.gateway.target) as client:
        for _ in client.stream_video(slow_camera(), fps=1 / GAP, timeout=60):
            answered.append(time.perf_counter())
    assert len(answered) == len(frames)
    # Frame 0 pays the stream's set-up; every later answer arrives before the next frame exists.
    late = [i for i in range(1, len(frames) - 1) if answered[i] >= handed_out[i + 1]]
    assert not late, f"answers to frames {late} waited for the next frame"
