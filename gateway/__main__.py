"""`tessera-gateway`: run the public gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from gateway.config import GatewayConfig
from gateway.routes import Route, Routes
from gateway.servicer import SERVICE_NAME, GatewayServicer
from services.fusion.rules import RulesError, RulesStore
from services.runtime.config import ConfigError
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.server import Servicer, ServingProcess
from services.runtime.streams import Drain
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


async def build(config: GatewayConfig, metrics: Metrics) -> App:
    try:
        rules = RulesStore(
            config.rules_path,
            on_change=metrics.set_rules_version,
            on_error=lambda _msg: metrics.rules_reload_errors.inc(),
        )
    except (OSError, RulesError) as exc:
        raise ConfigError(f"fusion rules {config.rules_path}: {exc}") from None
    routes = Routes(config)
    drain = Drain(config.server.drain_streams_after_seconds)
    servicer = Servicer(
        SERVICE_NAME,
        GatewayServicer(config, routes, rules, drain),
        pb_grpc.add_GatewayServiceServicer_to_server,
    )
    watchers: list[asyncio.Task[None]] = []

    async def on_start(server: ServingProcess) -> None:
        async def publish(route: Route) -> None:
            # The gateway's own health entry per downstream service, so one health check tells it all.
            await server.set_serving(route.service, route.state == common_pb2.SERVING_STATE_SERVING)

        async def poll_health() -> None:
            while True:
                await routes.refresh_all()
                for route in routes.all:
                    await publish(route)
                rules.current()  # picks up an edited rules file even when no request comes
                await asyncio.sleep(config.health_poll_seconds)

        watchers.append(asyncio.create_task(poll_health()))
        watchers.extend(asyncio.create_task(routes.watch_connectivity(r, publish)) for r in routes.all)

    async def cleanup() -> None:
        for task in watchers:
            task.cancel()
        for task in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await routes.close()

    return App([servicer], on_start=on_start, cleanup=cleanup, drain=drain)


def main() -> int:
    return run("gateway", GatewayConfig, build)


if __name__ == "__main__":
    sys.exit(main())
