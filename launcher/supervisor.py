"""Keep the local suite serving: a process that ends is started again on the port it had.

A process that ends (a crash, `kill -9`, or even a clean exit 0: nothing asked it to stop) is
restarted after a backoff, on the same port, so the gateway's targets stay right; the others keep
serving meanwhile. Only a crash loop — more than `max_restarts` restarts of one process within
`window_seconds` — stops the suite, with the process's exit status and the last lines of its log.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.suite import Process, Suite, SuiteError


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_seconds: float = 60.0
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0


class CrashLoop(RuntimeError):
    """A process kept dying: the suite stops."""


@dataclass
class _History:
    restarts: deque[float] = field(default_factory=deque)
    backoff: float = 0.0


class Supervisor:
    def __init__(
        self,
        suite: Suite,
        policy: RestartPolicy = RestartPolicy(),
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.suite = suite
        self.policy = policy
        self.say = say
        self.clock = clock
        self.history: dict[str, _History] = {}

    def check(self) -> list[str]:
        """Restart every process that has ended; returns their names. Raises CrashLoop."""
        restarted = []
        for proc in list(self.suite.processes.values()):
            code = proc.popen.poll()
            if code is None:
                continue
            self._restart(proc, code)
            restarted.append(proc.name)
        return restarted

    def _restart(self, proc: Process, code: int) -> None:
        p = self.policy
        history = self.history.setdefault(proc.name, _History())
        now = self.clock()
        while history.restarts and now - history.restarts[0] > p.window_seconds:
            history.restarts.popleft()
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if len(history.restarts) >= p.max_restarts:
            raise CrashLoop(
                f"{proc.name} {how} after {len(history.restarts)} restarts within "
                f"{p.window_seconds:.0f}s: crash loop, stopping the suite. Last lines of its log:\n"
                f"{proc.log_tail()}"
            )
        history.backoff = (
            p.initial_backoff_seconds
            if not history.restarts
            else min(history.backoff * 2, p.max_backoff_seconds)
        )
        history.restarts.append(now)
        self.say(
            f"{proc.name} {how}; restarting it on port {proc.port} in {history.backoff:.1f}s "
            f"(restart {len(history.restarts)} of at most {p.max_restarts} per {p.window_seconds:.0f}s). "
            f"Last lines of its log:\n{proc.log_tail(10)}"
        )
        time.sleep(history.backoff)
        try:
            self.suite.restart(proc.name)
        except SuiteError as exc:
            # It died again while starting: the next check counts it as another restart.
            self.say(f"{proc.name} did not come back: {exc}")
            return
        self.say(f"{proc.name} serving again on {self.suite.processes[proc.name].target}")
