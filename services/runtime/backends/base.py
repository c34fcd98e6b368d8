"""The interface every model backend implements (ONNX Runtime in process, Triton, XGBoost, kNN).

Pipelines hold a ``Backend`` and never know which one: a service switches by configuration alone.
Errors are the domain errors of ``services.runtime.errors``: an unknown model is NotFound, a model
that failed to load is FailedPrecondition, a backend that is down is Unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class InferResult:
    """Outputs of one request and which model version produced them."""

    outputs: dict[str, np.ndarray]
    model: str
    version: int | None
    backend: str


@dataclass(frozen=True)
class ModelStatus:
    """One model as a backend serves it; ``error`` says why it is not ready (or why a new version
    failed to load while an older one keeps serving)."""

    name: str
    version: int | None
    backend: str
    ready: bool
    error: str | None = None
    versions: tuple[int, ...] = field(default=())


@runtime_checkable
class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Load every model the backend serves; a bad model is reported, never fatal."""

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferResult:
        """Run one request; axis 0 of every input is its rows when the model batches."""

    def models(self) -> list[ModelStatus]:
        """Every model this backend knows, ready or broken."""

    async def load(self, model: str) -> ModelStatus:
        """(Re)load one model from the repository as it is now."""

    async def reload(self) -> list[str]:
        """Rescan the repository and swap in what changed; returns the names of changed models."""

    async def close(self) -> None:
        """Finish queued requests and release every session."""
