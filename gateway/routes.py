"""Channels from the gateway to the model services: load balancing, retries, keepalive, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig, RetryPolicy
from services.runtime import request_ids
from services.runtime.auth import FileSecret
from services.runtime.config import ConfigError
from services.runtime.errors import ServingError, Unavailable, error_for
from services.runtime.security import channel_credentials
from services.runtime.server import channel_options
from tessera.common.v1 import common_pb2
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.emotion.v1 import emotion_service_pb2_grpc as emotion_grpc
from tessera.engagement.v1 import engagement_service_pb2 as engagement_pb
from tessera.engagement.v1 import engagement_service_pb2_grpc as engagement_grpc
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as proxylabel_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Cancellable(Protocol):
    """A grpc.aio call of any kind."""

    def cancel(self) -> bool: ...


class CancellableCall(Cancellable, Protocol[T_co]):
    """A grpc.aio unary call: awaitable for its answer, and cancellable."""

    def __await__(self) -> Generator[Any, None, T_co]: ...


_HEALTH_STATES = {
    health_pb2.HealthCheckResponse.SERVING: common_pb2.SERVING_STATE_SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: common_pb2.SERVING_STATE_NOT_SERVING,
}


def service_config(retry: RetryPolicy) -> str:
    """The channel's service config: round robin over resolved addresses, UNAVAILABLE retried."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{}],  # every method of every service on the channel
                    "retryPolicy": {
                        "maxAttempts": retry.max_attempts,
                        "initialBackoff": f"{retry.initial_backoff_seconds}s",
                        "maxBackoff": f"{retry.max_backoff_seconds}s",
                        "backoffMultiplier": retry.backoff_multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


@dataclass
class Route:
    """One downstream service: its channel, stub, and last known health."""

    name: str
    service: str  # full gRPC service name, as its health service knows it
    target: str
    channel: grpc.aio.Channel
    stub: Any
    health: health_pb2_grpc.HealthStub
    list_request: Any  # the service's ListModelsRequest class
    state: int = common_pb2.SERVING_STATE_UNSPECIFIED
    detail: str = ""
    models: list[common_pb2.ModelInfo] = field(default_factory=list)
    timeouts: int = 0  # health checks in a row that got no answer in time
    inflight: set[Any] = field(default_factory=set)  # grpc.aio calls waiting on this service
    cut: set[Any] = field(default_factory=set)
    extra: request_ids.Extra | None = None  # metadata every call adds (the services' bearer token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What each call to the service carries: the request id, and the token when configured."""
        return request_ids.outgoing(self.extra)

    @property
    def unreachable(self) -> bool:
        return self.state == common_pb2.SERVING_STATE_UNREACHABLE

    def unavailable(self) -> Unavailable:
        return Unavailable(
            f"{self.name} service ({self.target}) is unreachable ({self.detail}); not waiting for it"
        )

    def ensure_reachable(self) -> None:
        """Fail fast: a service known to be down is not waited for until the caller's deadline."""
        if self.unreachable:
            raise self.unavailable()

    def mark_unreachable(self, detail: str) -> None:
        """Known down (connection lost, or frozen: no health answer): calls waiting on it (unary,
        and the streams relayed to it) end UNAVAILABLE now rather than DEADLINE_EXCEEDED later."""
        self.state, self.detail = common_pb2.SERVING_STATE_UNREACHABLE, detail
        for pending in self.inflight:
            self.cut.add(pending)
            pending.cancel()

    def error(self, exc: grpc.aio.AioRpcError) -> ServingError:
        """A downstream failure as the same status, naming this service."""
        error = error_for(exc.code(), f"{self.name} service ({self.target}): {exc.details()}")
        # The same status also for codes without a class of their own (a cancelled shard job
        # ends its watchers with CANCELLED), which error_for would make INTERNAL.
        error.code = exc.code()
        return error

    @contextlib.contextmanager
    def waiting_on(self, pending: Cancellable) -> Iterator[None]:
        """While the block runs, `pending` (a grpc.aio call, unary or streaming) waits on this
        service: marking it unreachable cancels the call, and the block ends UNAVAILABLE naming it."""
        self.inflight.add(pending)
        try:
            yield
        except asyncio.CancelledError:
            if pending in self.cut:
                raise self.unavailable() from None
            raise
        finally:
            self.inflight.discard(pending)
            self.cut.discard(pending)

    async def call(self, pending: CancellableCall[T]) -> T:
        """Await a unary call (a grpc.aio call object: awaitable and cancellable, no extra task)."""
        if self.unreachable:
            pending.cancel()
            raise self.unavailable()
        with self.waiting_on(pending):
            try:
                return await pending
            except grpc.aio.AioRpcError as exc:
                raise self.error(exc) from None

    async def refresh(self, timeout: float) -> None:
        """Poll health and the model inventory."""
        try:
            reply = await self.health.Check(
                health_pb2.HealthCheckRequest(service=self.service), timeout=timeout, wait_for_ready=False
            )
            self.state = _HEALTH_STATES.get(reply.status, common_pb2.SERVING_STATE_NOT_SERVING)
            self.detail = (
                "" if self.state == common_pb2.SERVING_STATE_SERVING else "health check says NOT_SERVING"
            )
            listed = await self.stub.ListModels(
                self.list_request(), timeout=timeout, metadata=self.metadata()
            )
            self.models = list(listed.models)
            self.timeouts = 0
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # Connected but silent (frozen, or a loop stalled for a moment): twice in a row is down.
                self.timeouts += 1
                if self.timeouts < 2:
                    self.detail = detail
                    return
            self.mark_unreachable(detail)

    def status(self) -> common_pb2.ServiceStatus:
        return common_pb2.ServiceStatus(
            name=self.name,
            target=self.target,
            state=cast("common_pb2.ServingState", self.state),
            models=self.models,
            detail=self.detail,
        )


class Routes:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        reconnect = config.reconnect
        options = [
            *channel_options(config.server),
            ("grpc.service_config", service_config(config.retry)),
            ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", reconnect.initial_backoff_ms),
            ("grpc.max_reconnect_backoff_ms", reconnect.max_backoff_ms),
            ("grpc.min_reconnect_backoff_ms", reconnect.min_connect_timeout_ms),
        ]

        down = config.downstream
        extra = None
        if down.token_file is not None:
            try:
                secret = FileSecret(down.token_file)
            except ValueError as exc:
                raise ConfigError(f"downstream.token_file: {exc}") from None

            def extra() -> list[tuple[str, str]]:
                return [("authorization", f"Bearer {secret.value()}")]

        credentials = None
        if down.tls is not None:
            credentials, tls_options = channel_credentials(down.tls)
            options += tls_options

        def route(name: str, target: str, stub_cls: Any, pb: Any, service: str) -> Route:
            channel = (
                grpc.aio.insecure_channel(target, options=options)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials, options=options)
            )
            full = pb.DESCRIPTOR.services_by_name[service].full_name
            return Route(
                name,
                full,
                target,
                channel,
                stub_cls(channel),
                health_pb2_grpc.HealthStub(channel),
                pb.ListModelsRequest,
                extra=extra,
            )

        t = config.targets
        self.emotion = route(
            "emotion", t.emotion, emotion_grpc.EmotionServiceStub, emotion_pb, "EmotionService"
        )
        self.engagement = route(
            "engagement",
            t.engagement,
            engagement_grpc.EngagementServiceStub,
            engagement_pb,
            "EngagementService",
        )
        self.proxylabel = route(
            "proxylabel",
            t.proxylabel,
            proxylabel_grpc.ProxyLabelServiceStub,
            proxylabel_pb,
            "ProxyLabelService",
        )
        self.all = [self.emotion, self.engagement, self.proxylabel]

    def timeout(self, context: grpc.aio.ServicerContext[Any, Any], kind: str = "unary") -> float | None:
        """The caller's remaining deadline, capped by the configured one (streams may have none)."""
        cap: float | None = getattr(self.config.deadlines, kind)
        remaining = context.time_remaining()
        if remaining is None:
            return cap
        return max(0.0, remaining if cap is None else min(cap, remaining))

    async def watch_connectivity(self, route: Route, on_change: Callable[[Route], Awaitable[None]]) -> None:
        """Follow a channel's connectivity: READY again means the service is back now (its health is
        checked at once), not at the next poll; a lost connection marks it unreachable at once."""
        state = route.channel.get_state(try_to_connect=True)
        while True:
            await route.channel.wait_for_state_change(state)
            state = route.channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY:
                await route.refresh(self.config.deadlines.status)
            elif state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                route.mark_unreachable("connection lost; reconnecting")
            else:
                continue
            log.info(
                "%s service (%s): %s", route.name, route.target, common_pb2.ServingState.Name(route.state)
            )
            await on_change(route)

    async def refresh_all(self) -> None:
        await asyncio.gather(*(r.refresh(self.config.deadlines.status) for r in self.all))

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close(None) for r in self.all))
