"""What a pipeline over faces is made of, whatever it computes from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from services.runtime.backends.base import Backend
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from services.vision.faces import FaceDetector

C = TypeVar("C")


@dataclass(eq=False)
class FacePipeline(Generic[C]):
    """Its service's config, the repository its models come from (with their stored
    preprocessing), the backend that runs them, the face detector chosen at start, and the
    metrics its stages are timed in."""

    config: C
    repository: ModelRepository
    backend: Backend
    detector: FaceDetector
    metrics: Metrics
