"""`tessera-serve` / `tessera-demo` (`make serve` / `make demo`): run the suite locally."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from launcher.suite import ROOT, Suite
from launcher.supervisor import CrashLoop, RestartPolicy, Supervisor


def serve(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tessera-"))
    suite = Suite(workdir, repository=args.repository, rules=args.rules, gateway_port=args.port).start()
    print(
        f"gateway SERVING on 127.0.0.1:{suite.gateway.port} (metrics :{suite.gateway.metrics_port}); "
        f"services: "
        + ", ".join(
            f"{p.name} {p.target} (metrics :{p.metrics_port})"
            for p in suite.processes.values()
            if p.name != "gateway"
        ),
        flush=True,
    )
    print(
        f"logs in {workdir}; a process that ends is restarted on its port; Ctrl-C stops everything",
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    policy = RestartPolicy(max_restarts=args.max_restarts, window_seconds=args.restart_window)
    supervisor = Supervisor(suite, policy, say=lambda text: print(text, file=sys.stderr, flush=True))
    try:
        while not stop:
            supervisor.check()
            time.sleep(0.2)
    except CrashLoop as exc:
        print(str(exc), file=sys.stderr, flush=True)
        suite.stop()
        return 1
    codes = suite.stop()
    print("stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
    return 0 if all(c == 0 for c in codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run gateway and services until Ctrl-C")
    p.add_argument("--port", type=int, default=50051, help="gateway port")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--rules", type=Path, default=ROOT / "config" / "fusion_rules.yaml")
    p.add_argument("--workdir", type=Path, help="logs and ready files (default: a new temporary folder)")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=RestartPolicy.max_restarts,
        help="restarts of one process within --restart-window before the suite stops (crash loop)",
    )
    p.add_argument("--restart-window", type=float, default=RestartPolicy.window_seconds, metavar="SECONDS")
    sub.add_parser("demo", help="start the suite, call every public RPC once, stop")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from launcher.demo import main as demo

        return demo()
    return serve(args)


def serve_main() -> int:
    """`tessera-serve [--port …]`."""
    return main(["serve", *sys.argv[1:]])


def demo_main() -> int:
    """`tessera-demo`."""
    return main(["demo", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
