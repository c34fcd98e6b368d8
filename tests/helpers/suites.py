"""A running suite on loopback ports for tests, with small limits so oversized-input tests stay cheap."""

from __future__ import annotations

from pathlib import Path

from launcher.suite import ROOT, SERVICES, Suite

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


def rss_kib(suite: Suite) -> dict[str, int]:
    """VmRSS of every process of the suite, KiB (0 for a process that is gone)."""
    out = {}
    for name in ("gateway", *SERVICES):
        proc = suite.processes[name]
        try:
            status = Path(f"/proc/{proc.popen.pid}/status").read_text()
            out[name] = int(status.split("VmRSS:")[1].split()[0]) if proc.popen.poll() is None else 0
        except (OSError, IndexError):
            out[name] = 0
    return out
