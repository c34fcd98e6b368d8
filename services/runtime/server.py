"""grpc.aio server bootstrap shared by every process: health, reflection, metrics, graceful stop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.admission import Admission
from services.runtime.auth import Authorizer
from services.runtime.config import ServerConfig
from services.runtime.interceptors import ServingInterceptor
from services.runtime.metrics import Metrics
from services.runtime.security import server_credentials
from services.runtime.streams import Drain

log = logging.getLogger(__name__)

# gRPC's "infinite" for millisecond options (INT_MAX: about 24.8 days).
UNBOUNDED_MS = 2**31 - 1


@dataclass(frozen=True)
class Servicer:
    """One gRPC service to mount: its full name, its implementation and the stub's add function."""

    name: str
    implementation: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


def channel_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Message sizes and keepalive: the same for the server and the gateway's client channels."""
    return [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class ServingProcess:
    """A started gRPC server with its health service, reflection and /metrics endpoint."""

    def __init__(
        self,
        process: str,
        config: ServerConfig,
        servicers: Sequence[Servicer],
        metrics: Metrics | None = None,
        authorizer: Authorizer | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.process = process
        self.config = config
        self.servicers = list(servicers)
        self.metrics = metrics or Metrics(process)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc_health-stubs lacks aio
        # Set when the drain starts: long-lived streams watch it (see services.runtime.streams).
        self.drain = drain or Drain(config.drain_streams_after_seconds)
        options = channel_options(config)
        if config.max_connection_age_ms is not None:
            grace = config.max_connection_age_grace_ms
            options += [
                ("grpc.max_connection_age_ms", config.max_connection_age_ms),
                ("grpc.max_connection_age_grace_ms", UNBOUNDED_MS if grace is None else grace),
            ]
        self.server = grpc.aio.server(
            interceptors=[
                ServingInterceptor(self.metrics, authorizer, Admission(config.admission, self.metrics))
            ],
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        self.port: int = 0
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> int:
        """Bind, start, mark every service SERVING, write the ready file; returns the gRPC port."""
        for s in self.servicers:
            s.add_to_server(s.implementation, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.name for s in self.servicers]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        self.port = (
            self.server.add_secure_port(address, server_credentials(tls))
            if tls is not None
            else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.server.start()
        if self.config.metrics_port is not None:
            self.metrics.serve_http(self.config.host, self.config.metrics_port)
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._write_ready_file()
        log.info(
            "%s serving on %s:%d (%s; metrics port %s)",
            self.process,
            self.config.host,
            self.port,
            "plaintext" if tls is None else "mTLS" if tls.client_ca_file else "TLS",
            self.metrics.http_port,
        )
        return self.port

    def _write_ready_file(self) -> None:
        path = self.config.ready_file
        if path is None:
            return
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "process": self.process,
                    "pid": os.getpid(),
                    "host": self.config.host,
                    "port": self.port,
                    "metrics_port": self.metrics.http_port,
                }
            )
        )
        tmp.replace(path)

    async def set_serving(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace period, then close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("%s stopping: draining in-flight calls for up to %.1fs", self.process, grace)
        await self.health.enter_graceful_shutdown()
        self.drain.start()
        await self.server.stop(grace)
        self.metrics.close()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self._stopped.wait()
