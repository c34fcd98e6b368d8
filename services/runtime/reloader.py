"""Hot model swaps: poll the repository and let the backend load new versions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from services.runtime.backends.base import Backend

log = logging.getLogger(__name__)


class Reloadable(Protocol):
    async def reload(self) -> list[str]:
        """Pick up what changed in the repository; the names of the models that changed."""
        ...


class RepositoryPoller:
    """Calls ``backend.reload()`` every interval, then each of ``also`` (models the backend does
    not own, e.g. a faiss index, which can rely on the backend's rescan); ``on_change`` gets the
    names that changed. A failed reload is logged, never fatal (the models already served keep
    serving)."""

    def __init__(
        self,
        backend: Backend,
        interval: float | None,
        on_change: Callable[[list[str]], Awaitable[None]] | None = None,
        also: Sequence[Reloadable] = (),
    ) -> None:
        self.sources: list[Reloadable] = [backend, *also]
        self.interval = interval
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval is not None:
            self._task = asyncio.create_task(self._run(self.interval))

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            changed: list[str] = []
            try:
                for source in self.sources:
                    changed += await source.reload()
            except Exception:  # keep polling; the served models are unaffected
                log.exception("model repository reload failed")
                continue
            if changed:
                log.info("models reloaded: %s", ", ".join(changed))
                if self.on_change:
                    try:
                        await self.on_change(changed)
                    except Exception:  # the models already in use keep serving
                        log.exception(
                            "models changed (%s) but applying the change failed", ", ".join(changed)
                        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
