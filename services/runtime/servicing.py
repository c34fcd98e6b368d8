"""Small helpers servicers share: how a served model is reported, request size checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.runtime.errors import InvalidArgument, ResourceExhausted
from tessera.common.v1 import common_pb2


@dataclass(frozen=True)
class ServedModel:
    """A model as a service reports it in its answers."""

    name: str
    version: int | None
    backend: str
    demo: bool = False
    # A classifier's stored calibration and class order (emotion models), which the gateway fuses
    # with; 0.0 and () for the others.
    temperature: float = 0.0
    class_names: tuple[str, ...] = ()

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            name=self.name,
            version="" if self.version is None else str(self.version),
            backend=self.backend,
            demo=self.demo,
            temperature=self.temperature,
        )


def is_demo(parameters: Mapping[str, str]) -> bool:
    """Whether a model's config marks it as a demo model (trained at setup on generated data)."""
    return parameters.get("demo", "").lower() == "true"


def check_batch_size(count: int, limit: int, noun: str) -> None:
    """A whole request's item count: none is INVALID_ARGUMENT, over the limit RESOURCE_EXHAUSTED."""
    if count == 0:
        raise InvalidArgument(f"no {noun} in the request")
    if count > limit:
        raise ResourceExhausted(f"{count} {noun} exceed the limit of {limit} per request")
