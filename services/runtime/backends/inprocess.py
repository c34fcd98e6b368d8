"""What every in-process backend shares: one batcher per served model version, atomic version
swaps, status, load/reload/close. A concrete backend says which repository entries are its own
and how to open one version (``InProcessBackend._open``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.runtime.backends.base import InferResult, ModelStatus
from services.runtime.batching import BatchPolicy, DynamicBatcher
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelEntry, ModelRepository

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


def batch_policy(entry: ModelEntry, default_queue_size: int) -> BatchPolicy:
    """The batching a model's config asks for: none without ``dynamic_batching``."""
    config = entry.config
    assert config is not None
    dynamic = config.HasField("dynamic_batching") and config.max_batch_size > 0
    db = config.dynamic_batching
    queue_size = db.default_queue_policy.max_queue_size if dynamic else 0
    return BatchPolicy(
        max_batch_size=config.max_batch_size,
        dynamic=dynamic,
        preferred_batch_sizes=tuple(p for p in db.preferred_batch_size if p <= config.max_batch_size),
        max_queue_delay_microseconds=db.max_queue_delay_microseconds if dynamic else 0,
        max_queue_size=queue_size or default_queue_size,
    )


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # -1 = any; includes the batch axis (as -1) when the model batches
    optional: bool


def check_request(model: str, specs: Sequence[InputSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Validate a request against the model's inputs before it is queued (InvalidArgument)."""
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise InvalidArgument(f"model '{model}' has no inputs {unknown}; it takes {sorted(known)}")
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            if spec.optional:
                continue
            raise InvalidArgument(f"model '{model}' needs input '{spec.name}'")
        if not isinstance(array, np.ndarray):
            raise InvalidArgument(f"input '{spec.name}' of model '{model}' is not a numpy array")
        if array.dtype != spec.dtype:
            raise InvalidArgument(
                f"input '{spec.name}' of model '{model}' must be {spec.dtype}, got {array.dtype}"
            )
        if not spec.dims:
            continue  # reshaped input: its shape is checked by the model
        if array.ndim != len(spec.dims) or any(
            d != -1 and d != s for d, s in zip(spec.dims, array.shape, strict=True)
        ):
            raise InvalidArgument(
                f"input '{spec.name}' of model '{model}' has shape {list(array.shape)}, "
                f"expected {list(spec.dims)} (-1 = any)"
            )


@dataclass(frozen=True)
class Opened:
    """One model version, ready to run: what `_open` returns."""

    version: int
    run: Callable[[Tensors], Tensors]
    inputs: tuple[InputSpec, ...]  # checked before a request is queued
    description: str = ""
    handle: object = None  # keeps the runtime's object (session, booster) alive with the version


@dataclass(frozen=True)
class _Served:
    entry: ModelEntry
    opened: Opened
    batcher: DynamicBatcher

    @property
    def version(self) -> int:
        return self.opened.version


class InProcessBackend:
    name = "in-process"
    kind = "model"  # for messages: "is not an ONNX model of the repository"

    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics,
        max_queue_size: int,
        serves: Callable[[str], bool] | None = None,
    ) -> None:
        self.repository = repository
        # Which model names this process serves: the services share one repository, and each
        # loading every model of it would cost all of them the memory and start-up of all.
        self.serves = serves
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self._served: dict[str, _Served] = {}
        self._errors: dict[str, str] = {}  # why a model (or its newest version) is not served
        self._applied: dict[str, tuple[object, ...]] = {}  # fingerprint each model was last loaded from
        self._lock = asyncio.Lock()

    # -- what a concrete backend provides

    def _owns(self, entry: ModelEntry) -> bool:
        raise NotImplementedError

    def _fingerprint(self, entry: ModelEntry) -> tuple[object, ...]:
        return entry.fingerprint

    def _open(self, entry: ModelEntry) -> tuple[Opened | None, str | None]:
        """Open one version (in a worker thread); (None, error naming the file) on failure."""
        raise NotImplementedError

    # -- the Backend protocol

    async def start(self) -> None:
        async with self._lock:
            mine = await asyncio.get_running_loop().run_in_executor(None, self._mine)
            for entry, fp in mine.values():
                await self._apply(entry, fp)
        log.info(
            "%s backend: %d models ready, %d broken",
            self.name,
            len(self._served),
            len(set(self._errors) - set(self._served)),
        )

    async def infer(self, model: str, inputs: Tensors) -> InferResult:
        served = self._served.get(model)
        if served is None:
            if model in self._errors:
                raise FailedPrecondition(f"model '{model}' is not loaded: {self._errors[model]}")
            raise NotFound(f"model '{model}' is not {self.kind} of the repository {self.repository.root}")
        check_request(model, served.opened.inputs, inputs)
        # `served` is bound before the await: this request finishes on this version even if a
        # reload swaps in a newer one meanwhile.
        outputs = await served.batcher.submit(inputs)
        return InferResult(outputs, model, served.version, self.name)

    def models(self) -> list[ModelStatus]:
        out = []
        for name in sorted(set(self._served) | set(self._errors)):
            served = self._served.get(name)
            if served is not None:
                out.append(
                    ModelStatus(
                        name,
                        served.version,
                        self.name,
                        True,
                        self._errors.get(name),
                        tuple(served.entry.versions),
                    )
                )
            else:
                entry = self.repository.get(name) if name in self.repository else None
                out.append(
                    ModelStatus(
                        name,
                        entry.version if entry else None,
                        self.name,
                        False,
                        self._errors[name],
                        tuple(entry.versions) if entry else (),
                    )
                )
        return out

    async def load(self, model: str) -> ModelStatus:
        async with self._lock:
            mine = await asyncio.get_running_loop().run_in_executor(None, self._mine)
            if model not in mine:
                self.repository.get(model)  # NotFound naming the repository when it is absent
                if self.serves is not None and not self.serves(model):
                    raise NotFound(
                        f"model '{model}' of {self.repository.root} is not one this service serves"
                    )
                raise NotFound(f"model '{model}' of {self.repository.root} is not {self.kind}")
            await self._apply(*mine[model])
        return next(s for s in self.models() if s.name == model)

    async def reload(self) -> list[str]:
        async with self._lock:
            mine = await asyncio.get_running_loop().run_in_executor(None, self._mine)
            changed = [n for n, (_, fp) in mine.items() if self._applied.get(n) != fp]
            for name in changed:
                await self._apply(*mine[name])
            removed = [n for n in self._applied if n not in mine]
            for name in removed:
                await self._unload(name)
        if changed or removed:
            log.info("%s backend reloaded: changed %s, removed %s", self.name, changed, removed)
        return changed + removed

    async def close(self) -> None:
        async with self._lock:
            for name in list(self._applied):
                await self._unload(name)

    # -- internals

    def _mine(self) -> dict[str, tuple[ModelEntry, tuple[object, ...]]]:
        """Rescan and fingerprint this backend's models (file system work: a worker thread)."""
        self.repository.rescan()
        return {
            e.name: (e, self._fingerprint(e))
            for e in self.repository.entries()
            if self._owns(e) and (self.serves is None or self.serves(e.name))
        }

    async def _apply(self, entry: ModelEntry, fp: tuple[object, ...]) -> None:
        """Load an entry and swap it in; on failure keep any version already serving."""
        self._applied[entry.name] = fp
        opened, error = await asyncio.get_running_loop().run_in_executor(None, self._open, entry)
        if opened is None:
            self._errors[entry.name] = error or "cannot be opened"
            if entry.name in self._served:
                log.error(
                    "model %s: new version not loaded, version %d keeps serving: %s",
                    entry.name,
                    self._served[entry.name].version,
                    error,
                )
            else:
                log.error("model %s not loaded: %s", entry.name, error)
            return
        batcher = DynamicBatcher(
            entry.name,
            opened.run,
            batch_policy(entry, self.max_queue_size),
            self.metrics,
            opened.version,
            self.name,
        )
        old = self._served.get(entry.name)
        self._served[entry.name] = _Served(entry, opened, batcher)  # the swap: one assignment on the loop
        self._errors.pop(entry.name, None)
        log.info("model %s version %d loaded %s", entry.name, opened.version, opened.description)
        if old is not None:
            await old.batcher.close()  # drains what was queued on the old version

    async def _unload(self, name: str) -> None:
        self._applied.pop(name, None)
        self._errors.pop(name, None)
        old = self._served.pop(name, None)
        if old is not None:
            await old.batcher.close()
