"""Entry point shared by every process: flags, config, logging, serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from services.runtime.auth import Authorizer
from services.runtime.config import ConfigError, ProcessConfig, load_config
from services.runtime.logs import NativeStderr, setup_logging
from services.runtime.metrics import Metrics
from services.runtime.server import Servicer, ServingProcess
from services.runtime.streams import Drain

C = TypeVar("C", bound=ProcessConfig)


async def _nothing(_server: ServingProcess | None = None) -> None:
    return None


class Background(Protocol):
    """A task that runs while the process serves (e.g. a repository poller)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class App:
    """What a process serves: its servicers, background tasks started once it serves and stopped
    before `cleanup`, and hooks run after start and after stop."""

    servicers: list[Servicer]
    on_start: Callable[[ServingProcess], Awaitable[None]] = _nothing
    cleanup: Callable[[], Awaitable[None]] = _nothing
    background: list[Background] = field(default_factory=list)
    # Streams of the servicers watch it; the server starts it on SIGTERM.
    drain: Drain = field(default_factory=Drain)


Builder = Callable[[C, Metrics], Awaitable[App]]

log = logging.getLogger(__name__)


def parse_args(process: str, argv: Sequence[str] | None) -> tuple[Path | None, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog=f"tessera-{process}", description=f"Run the {process} server.")
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    server = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "metrics_port": args.metrics_port,
            "ready_file": args.ready_file,
        }.items()
        if v is not None
    }
    return args.config, ({"server": server} if server else {})


PARENT_ENV = "TESSERA_PARENT_PID"


def _stop_when_orphaned(server: ServingProcess) -> asyncio.Task[None] | None:
    """A process started by a launcher (which sets TESSERA_PARENT_PID) drains and stops when that
    launcher is gone, instead of serving on as an orphan nobody will stop."""
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit():
        return None
    parent = int(raw)

    async def watch() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("launcher (pid %d) is gone: stopping", parent)
        await server.stop()

    return asyncio.create_task(watch())


def run(process: str, model: type[C], build: Builder[C], argv: Sequence[str] | None = None) -> int:
    """Run one process to completion; exit code 0 after a graceful stop, 2 on bad config."""
    path, overrides = parse_args(process, argv)
    try:
        config = load_config(model, process, path, overrides)
    except ConfigError as exc:
        print(f"{process}: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging, process)
    metrics = Metrics(process)
    try:
        authorizer = Authorizer(config.auth)
    except ValueError as exc:
        print(f"{process}: {exc}", file=sys.stderr)
        return 2
    NativeStderr(lambda library: metrics.decoder_warnings.labels(library).inc()).start()

    async def main() -> None:
        app = await build(config, metrics)
        server = ServingProcess(process, config.server, app.servicers, metrics, authorizer, app.drain)
        await server.start()
        orphan_watch = _stop_when_orphaned(server)
        try:
            await app.on_start(server)
            for task in app.background:
                task.start()
            await server.wait_for_termination()
        finally:
            if orphan_watch is not None:
                orphan_watch.cancel()
            for task in app.background:
                await task.stop()
            await app.cleanup()

    try:
        asyncio.run(main())
    except ConfigError as exc:  # a builder found its config unusable (e.g. a bad rules file)
        log.error("%s: %s", process, exc)
        return 2
    log.info("%s stopped", process)
    return 0
