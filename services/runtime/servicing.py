"""Small helpers servicers share: model inventories and the answer for absent models."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted


def present_models(repository: Path) -> set[str]:
    """Names of the models in a repository that have a config and at least one version."""
    if not repository.is_dir():
        return set()
    return {
        d.name for d in repository.iterdir()
        if (d / "config.pbtxt").is_file() and any(v.is_dir() and v.name.isdigit() for v in d.iterdir())
    }


def require_models(repository: Path, needed: Iterable[str], purpose: str) -> None:
    """FAILED_PRECONDITION naming the models a request needs that the repository lacks."""
    missing = sorted(set(needed) - present_models(repository))
    if missing:
        raise FailedPrecondition(
            f"{purpose} needs model(s) {', '.join(missing)}, which are not in the model repository "
            f"{repository}; build them with `make models` or export them with the exporter")


def pipeline_missing(purpose: str) -> FailedPrecondition:
    """For a service whose models exist but whose pipeline this build does not have yet."""
    return FailedPrecondition(f"{purpose} is not available in this build: its pipeline is not implemented yet")


def check_batch_size(count: int, limit: int, noun: str) -> None:
    """A whole request's item count: none is INVALID_ARGUMENT, over the limit RESOURCE_EXHAUSTED."""
    if count == 0:
        raise InvalidArgument(f"no {noun} in the request")
    if count > limit:
        raise ResourceExhausted(f"{count} {noun} exceed the limit of {limit} per request")
