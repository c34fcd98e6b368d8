"""A running suite on loopback ports for tests, with small limits so oversized-input tests stay cheap."""

from __future__ import annotations

from pathlib import Path

from launcher.suite import ROOT, Suite

CACHE = ROOT / ".cache"


# Small limits so oversized-input tests stay cheap.
GATEWAY_MAX_MESSAGE = 4 * 1024 * 1024


def start_suite(workdir: Path, repository: Path, **kwargs: object) -> Suite:
    env = {
        "TESSERA_GATEWAY__SERVER__MAX_RECEIVE_MESSAGE_BYTES": str(GATEWAY_MAX_MESSAGE),
        "TESSERA_GATEWAY__HEALTH_POLL_SECONDS": "0.2",
        **kwargs.pop("extra_env", {}),
    }  # type: ignore[dict-item]
    return Suite(workdir, repository=repository, extra_env=env, **kwargs).start()  # type: ignore[arg-type]
