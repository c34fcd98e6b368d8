"""One backend object over several: each model goes to the child backend that serves it.

A service holds one ``Backend`` whether its models are ONNX, XGBoost or both:

    RoutingBackend(repository, [OnnxBackend(...), XgbBackend(...)])

A model belongs to the first child (in the order given) that lists it in ``models()``, ready or
broken, so a broken model's own error reaches the caller rather than a NotFound. Children keep
their own locks, batchers and versions; this class only routes, merges and fans out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.runtime.backends.base import Backend, InferResult, ModelStatus
from services.runtime.errors import NotFound
from services.runtime.repository import ModelRepository

BACKEND_NAME = "routing"


class RoutingBackend:
    """Routes each model to the child backend that lists it; the Backend protocol over all."""

    name = BACKEND_NAME

    def __init__(self, repository: ModelRepository, backends: Sequence[Backend]) -> None:
        if not backends:
            raise ValueError("RoutingBackend needs at least one backend")
        self.repository = repository
        self.backends: tuple[Backend, ...] = tuple(backends)
        self._routes: dict[str, Backend] = {}

    async def start(self) -> None:
        for backend in self.backends:
            # One after another: loading shares the cores with whatever already serves.
            await backend.start()
        self._route_all()

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferResult:
        return await self.backend_for(model).infer(model, inputs)

    def models(self) -> list[ModelStatus]:
        merged: dict[str, ModelStatus] = {}
        for backend in self.backends:
            for status in backend.models():
                merged.setdefault(status.name, status)
        return [merged[name] for name in sorted(merged)]

    async def load(self, model: str) -> ModelStatus:
        # The routed child first; a new model (or one whose kind changed) is offered to each
        # child in turn, and a child that does not serve its kind answers NotFound.
        routed = self._routes.get(model)
        candidates = [routed] if routed is not None else []
        candidates += [b for b in self.backends if b is not routed]
        for backend in candidates:
            try:
                status = await backend.load(model)
            except NotFound:
                continue
            self._routes[model] = backend
            return status
        raise self._unknown(model)

    async def reload(self) -> list[str]:
        changed: list[str] = []
        for backend in self.backends:
            changed += [n for n in await backend.reload() if n not in changed]
        self._route_all()
        return changed

    async def close(self) -> None:
        # Every child is closed even if one fails; the first failure is raised afterwards.
        first: BaseException | None = None
        for backend in self.backends:
            try:
                await backend.close()
            except Exception as exc:  # re-raised below, after the others closed
                first = first or exc
        self._routes = {}
        if first is not None:
            raise first

    def backend_for(self, model: str) -> Backend:
        """The child serving a model; NotFound naming the repository when none does."""
        backend = self._routes.get(model)
        if backend is None:
            self._route_all()  # a child may have loaded it since (e.g. its own load())
            backend = self._routes.get(model)
        if backend is None:
            raise self._unknown(model)
        return backend

    # -- internals

    def _route_all(self) -> None:
        routes: dict[str, Backend] = {}
        for backend in self.backends:
            for status in backend.models():
                routes.setdefault(status.name, backend)
        self._routes = routes  # one assignment: infer() sees the old or the new table

    def _unknown(self, model: str) -> NotFound:
        root = self.repository.root
        if model not in self.repository:
            return NotFound(f"model '{model}' is not in the model repository {root}")
        kind = self.repository.get(model).kind or "unknown"
        served = ", ".join(b.name for b in self.backends)
        return NotFound(
            f"model '{model}' of the model repository {root} is of kind '{kind}', "
            f"which none of the configured backends ({served}) serves"
        )
