"""Triton backend: the repository's ONNX models, run by a Triton server over gRPC (tritonclient aio).

The same ``Backend`` interface and the same request checks as the in-process backend: a request is
validated against the repository's config before it leaves the process; batching is Triton's (its
``dynamic_batching`` of the same config). Triton's statuses become the suite's errors:

    connection refused, server down   Unavailable        (the message names the Triton url)
    server frozen (no keepalive ack)  Unavailable
    model not in the repository       NotFound           (checked here, no call made)
    model in the repository that Triton has not loaded   FailedPrecondition
    bad input                         InvalidArgument
    no answer within timeout_seconds  DeadlineExceeded

A call that finds Triton unavailable retires the gRPC channel: the next call opens a fresh one,
so the backend answers again as soon as Triton is back, instead of waiting out the channel's
reconnect backoff (which grows to minutes). Until a call or a probe gets through again, the
backend reports Triton unreachable (`unreachable`, and to whoever `follow`s it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from pydantic import Field
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.runtime.backends.base import InferResult, ModelStatus
from services.runtime.backends.inprocess import InputSpec, check_request
from services.runtime.backends.onnx import input_specs, is_onnx_entry
from services.runtime.config import StrictModel
from services.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServingError,
    Unavailable,
    error_for,
)
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelEntry, ModelRepository, onnx_signature

log = logging.getLogger(__name__)

BACKEND_NAME = "triton"
# First and longest wait before the channel tries Triton again after a failed connection.
RECONNECT_BACKOFF_MS = (200, 2000)
MIB = 1024 * 1024


class TritonConfig(StrictModel):
    url: str = Field("127.0.0.1:8001", description="Triton's gRPC address, host:port.")
    timeout_seconds: float = Field(
        10.0, gt=0, description="Deadline of every call to Triton (the client's default is none)."
    )
    models: tuple[str, ...] | None = Field(
        None,
        description="Models served through Triton; null: every onnxruntime_onnx model of the "
        "repository. Other kinds (faiss, xgboost, tokenizers) stay with their in-process backends.",
    )
    max_message_bytes: int = Field(256 * MIB, gt=0, description="Largest request or response.")
    # A frozen Triton keeps its connection open: without keepalive a call waits out its whole
    # deadline. Pings go only while calls are in flight, at most two without data (gRPC's
    # default), so Triton's default ping policy (one ping per 5 min without data, two strikes)
    # never closes a healthy connection.
    keepalive_time_ms: int = Field(
        2_000,
        gt=0,
        description="Ping Triton after this long without an answer on a connection with calls in flight.",
    )
    keepalive_timeout_ms: int = Field(
        2_000,
        gt=0,
        description="A ping not acknowledged within this closes the connection: its calls end "
        "UNAVAILABLE (a frozen server), well within a caller's deadline.",
    )
    ssl: bool = Field(False, description="TLS to Triton with the system's root certificates.")
    control_models: bool = Field(
        False,
        description="Ask Triton to (re)load models on load()/reload(); needs Triton in "
        "explicit model-control mode. Off: Triton manages its repository itself.",
    )


@dataclass(frozen=True)
class _Model:
    """What a request to one model is checked against, from the repository's config."""

    entry: ModelEntry
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]  # empty: ask Triton for every output


def _describe(entry: ModelEntry) -> _Model:
    """Input specs as the in-process backend builds them (reads the ONNX file when the config
    declares no inputs: call from a worker thread)."""
    config = entry.config
    assert config is not None
    if config.input:
        # The in-process backend's own specs: it consults the session only for configs without
        # inputs, which the branch below covers from the file instead.
        inputs = input_specs(entry, None)
    else:
        specs, _ = onnx_signature(entry.model_path())
        inputs = tuple(
            InputSpec(s.name, s.dtype, tuple(-1 if d is None else d for d in s.shape), False) for s in specs
        )
    return _Model(entry, inputs, tuple(o.name for o in config.output))


def _status_code(exc: InferenceServerException) -> grpc.StatusCode | None:
    """The gRPC code tritonclient folded into a string ("StatusCode.UNAVAILABLE")."""
    name = (exc.status() or "").rsplit(".", 1)[-1]
    return grpc.StatusCode.__members__.get(name)


def _channel_args(config: TritonConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        # A keepalive ping due while another ping is unanswered (a flow-control probe, sent with
        # the data) waits for that ping's ack, which only this timeout bounds (60 s by default).
        ("grpc.http2.ping_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),  # Triton refuses idle pings by default
        ("grpc.http2.max_pings_without_data", 2),
        # gRPC shares subchannels between channels to the same address by default, so a fresh
        # channel would inherit the dead one's reconnect backoff; and keep that backoff short.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


class TritonBackend:
    """Serves the repository's ONNX models through a Triton server."""

    name = BACKEND_NAME

    def __init__(self, repository: ModelRepository, config: TritonConfig, metrics: Metrics) -> None:
        self.repository = repository
        self.config = config
        self.metrics = metrics
        self._client: triton_aio.InferenceServerClient | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._known: dict[str, _Model] = {}
        self._status: dict[str, ModelStatus] = {}
        self._applied: dict[
            str, tuple[object, ...]
        ] = {}  # repository fingerprint each model was described from
        self._lock = asyncio.Lock()
        self._unreachable: str | None = None  # why Triton is known unreachable; None: it answers
        self._listeners: list[Callable[[bool], Coroutine[Any, Any, None]]] = []
        self._telling: set[asyncio.Task[None]] = set()

    # -- Backend interface

    async def start(self) -> None:
        async with self._lock:
            await self._sync_repository()
            await self._refresh(list(self._status))
        ready = sum(s.ready for s in self._status.values())
        log.info("triton backend (%s): %d of %d models ready", self.config.url, ready, len(self._status))

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferResult:
        served = self._known.get(model)
        if served is None:
            status = self._status.get(model)
            if status is not None:  # configured, but the repository cannot describe it
                raise FailedPrecondition(f"model '{model}' is not served: {status.error}")
            raise NotFound(f"model '{model}' is not a Triton model of the repository {self.repository.root}")
        check_request(model, served.inputs, inputs)
        request = []
        for name, array in inputs.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        wanted = [triton_grpc.InferRequestedOutput(n) for n in served.outputs] or None
        client = self._get_client()
        start = time.perf_counter()
        try:
            result = await client.infer(
                model, request, outputs=wanted, client_timeout=self.config.timeout_seconds
            )
        except InferenceServerException as exc:
            raise self._failure(exc, model, client) from None
        elapsed = time.perf_counter() - start
        response = result.get_response()
        version = int(response.model_version) if response.model_version.isdigit() else None
        names = served.outputs or tuple(o.name for o in response.outputs)
        outputs = {}
        for name in names:
            array = result.as_numpy(name)
            if array is None:
                raise ServingError(
                    f"Triton at {self.config.url} returned no output '{name}' for model '{model}'"
                )
            # as_numpy views the response bytes read-only; callers may scale in place.
            outputs[name] = array if array.flags.writeable else array.copy()
        self.metrics.inference_duration.labels(
            model, version if version is not None else "", BACKEND_NAME
        ).observe(elapsed)
        self._mark_ready(model, version)
        return InferResult(outputs, model, version, BACKEND_NAME)

    def models(self) -> list[ModelStatus]:
        return [self._status[name] for name in sorted(self._status)]

    async def load(self, model: str) -> ModelStatus:
        async with self._lock:
            await self._sync_repository()
            if model not in self._status:
                raise NotFound(
                    f"model '{model}' is not a Triton model of the repository {self.repository.root}"
                )
            if self.config.control_models:
                await self._load_on_triton(model)
            await self._refresh([model])
        return self._status[model]

    async def reload(self) -> list[str]:
        async with self._lock:
            before = dict(self._status)
            changed = await self._sync_repository()
            if self.config.control_models:
                for name in changed:
                    if name in self._status:
                        await self._load_on_triton(name)
            await self._refresh(list(self._status))
            changed |= {
                n
                for n, s in self._status.items()
                if n not in before or (before[n].version, before[n].ready) != (s.version, s.ready)
            }
            changed |= set(before) - set(self._status)
        if changed:
            log.info("triton backend reloaded: %s", sorted(changed))
        return sorted(changed)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        for task in list(self._retiring):
            task.cancel()  # each closes its channel on the way out
        await asyncio.gather(*self._retiring, *self._telling, return_exceptions=True)

    async def refresh(self) -> list[ModelStatus]:
        """Ask Triton which models are ready now (for health checks); never raises."""
        async with self._lock:
            await self._refresh(list(self._status))
        return self.models()

    def unreachable(self, model: str) -> str | None:
        """Why `model` is not served now when the reason is that Triton is unreachable (it comes
        back by itself once Triton answers again); None when it is not that."""
        if self._unreachable is None or model not in self._known:
            return None
        return self._unreachable

    def follow(self, listener: Callable[[bool], Coroutine[Any, Any, None]]) -> None:
        """Tell `listener` whether Triton is reachable: now if it is known not to be, then at every
        change (e.g. to set a service's health NOT_SERVING while its models cannot run)."""
        self._listeners.append(listener)
        if self._unreachable is not None:
            self._tell(listener, False)

    # -- internals

    def _get_client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(
                self.config.url, ssl=self.config.ssl, channel_args=_channel_args(self.config)
            )
        return self._client

    def _retire(self, client: triton_aio.InferenceServerClient) -> None:
        """Drop a channel that found Triton down; the next call opens a fresh one."""
        if self._client is not client:
            return  # a concurrent failure already retired it
        self._client = None
        retired: Any = client  # (mypy narrowed `client` through the identity test above)

        async def close_later() -> None:
            try:
                # Calls still in flight on the old channel end by their own deadline.
                await asyncio.sleep(self.config.timeout_seconds)
            finally:
                await retired.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _failure(
        self, exc: InferenceServerException, model: str, client: triton_aio.InferenceServerClient
    ) -> ServingError:
        code = _status_code(exc)
        message = exc.message() or str(exc)
        url = self.config.url
        if code is grpc.StatusCode.UNAVAILABLE:
            self._retire(client)
            self._set_unreachable(f"Triton at {url} is unreachable: {message}")
            self._mark_down(model, f"Triton at {url} is unavailable: {message}")
            return Unavailable(f"Triton at {url} is unavailable (model '{model}'): {message}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"Triton at {url} did not answer model '{model}' within {self.config.timeout_seconds:g} s"
            )
        if code is grpc.StatusCode.NOT_FOUND:
            self._mark_down(model, f"not loaded on Triton at {url}: {message}")
            return FailedPrecondition(
                f"model '{model}' is in the repository but not loaded on Triton at {url}: {message}"
            )
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"model '{model}': {message}")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"Triton at {url}, model '{model}': {message}")
        if code is None:
            return ServingError(f"Triton at {url}, model '{model}': {message}")
        return error_for(code, f"Triton at {url}, model '{model}': {message}")

    def _wanted(self) -> dict[str, ModelEntry | None]:
        """The models this backend serves, with their repository entries (None: not there)."""
        if self.config.models is None:
            return {e.name: e for e in self.repository.entries() if is_onnx_entry(e)}
        return {n: self.repository.get(n) if n in self.repository else None for n in self.config.models}

    async def _sync_repository(self) -> set[str]:
        """Rescan the repository and describe what changed; returns the changed model names."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.repository.rescan)
        wanted = self._wanted()
        changed: set[str] = set()
        for name in list(self._status):
            if name not in wanted:
                self._status.pop(name)
                self._known.pop(name, None)
                self._applied.pop(name, None)
                changed.add(name)
        for name, entry in wanted.items():
            fingerprint = entry.fingerprint if entry is not None else ()
            if name in self._status and self._applied.get(name) == fingerprint:
                continue
            changed.add(name)
            self._applied[name] = fingerprint
            error = (
                f"model '{name}' is not in the repository {self.repository.root}"
                if entry is None
                else entry.error
            )
            if error is None and entry is not None:
                try:
                    self._known[name] = await loop.run_in_executor(None, _describe, entry)
                except Exception as exc:
                    error = f"{entry.path}: cannot read its inputs: {exc}"
            if error is not None:
                self._known.pop(name, None)
                log.error("triton backend: model %s not served: %s", name, error)
            versions = tuple(entry.versions) if entry is not None else ()
            self._status[name] = ModelStatus(
                name, entry.version if entry else None, BACKEND_NAME, False, error, versions
            )
        return changed

    async def _load_on_triton(self, model: str) -> None:
        client = self._get_client()
        try:
            await client.load_model(model, client_timeout=self.config.timeout_seconds)
        except InferenceServerException as exc:
            error = self._failure(exc, model, client)
            self._mark_down(model, f"Triton at {self.config.url} could not load it: {error.message}")

    async def _refresh(self, names: Sequence[str]) -> None:
        await asyncio.gather(*(self._probe(n) for n in names))

    async def _probe(self, model: str) -> None:
        """Readiness and versions of one model as Triton reports them."""
        if model not in self._known:
            return  # the repository's error stands
        client = self._get_client()
        timeout = self.config.timeout_seconds
        try:
            ready = await client.is_model_ready(model, client_timeout=timeout)
            versions: tuple[int, ...] = ()
            if ready:
                metadata = await client.get_model_metadata(model, client_timeout=timeout)
                versions = tuple(sorted(int(v) for v in metadata.versions if v.isdigit()))
        except InferenceServerException as exc:
            self._failure(exc, model, client)  # marks the model down, retires a dead channel
            return
        self._set_unreachable(None)
        if not ready:
            self._mark_down(model, f"not ready on Triton at {self.config.url}")
            return
        self._status[model] = ModelStatus(
            model, max(versions) if versions else None, BACKEND_NAME, True, None, versions
        )

    def _set_unreachable(self, reason: str | None) -> None:
        """Record whether Triton answers; tell the listeners when that changes."""
        changed = (reason is None) != (self._unreachable is None)
        self._unreachable = reason
        if changed:
            log.log(
                logging.INFO if reason is None else logging.WARNING,
                "triton backend: %s",
                reason or f"Triton at {self.config.url} answers again",
            )
            for listener in self._listeners:
                self._tell(listener, reason is None)

    def _tell(self, listener: Callable[[bool], Coroutine[Any, Any, None]], reachable: bool) -> None:
        task = asyncio.get_running_loop().create_task(listener(reachable))
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    def _mark_ready(self, model: str, version: int | None) -> None:
        self._set_unreachable(None)
        status = self._status.get(model)
        if status is not None and (not status.ready or status.version != version):
            versions = (
                status.versions
                if version in status.versions or version is None
                else tuple(sorted({*status.versions, version}))
            )
            self._status[model] = ModelStatus(model, version, BACKEND_NAME, True, None, versions)

    def _mark_down(self, model: str, error: str) -> None:
        status = self._status.get(model)
        if status is not None:
            self._status[model] = ModelStatus(
                model, status.version, BACKEND_NAME, False, error, status.versions
            )
