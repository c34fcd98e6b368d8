"""`tessera-score-shard`: score a parquet shard through the gateway, with a progress line.

The paths are the service's: the shard must lie under the proxylabel service's input roots and
the output directory under its output roots. The job runs in the proxylabel service, not in this
command: when the stream breaks (a gateway or proxylabel restart, a drain, a network cut) the
command re-attaches to the same job with exponential backoff, for up to `--reconnect-seconds` per
outage, and the progress line goes on where the job is. After an interruption (Ctrl-C, a
crash) the job goes on in the service; running the command again re-attaches to it, or resumes
it if it stopped.

    tessera-score-shard --gateway 127.0.0.1:50051 data/shard.parquet data/shard.scored
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import grpc

from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb
from tessera_client.client import ClientTls, TesseraClient

INITIAL_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 8.0
# Per attempt: long enough that a DEADLINE_EXCEEDED before it is the server's stream cap (the
# gateway's deadlines.stream), which ends a watch, not the job.
CALL_TIMEOUT_SECONDS = 24 * 3600.0
ATTACHED = {
    proxylabel_pb.SHARD_JOB_ATTACHMENT_STARTED: "started",
    proxylabel_pb.SHARD_JOB_ATTACHMENT_RESUMED: "resumed from its finished parts",
    proxylabel_pb.SHARD_JOB_ATTACHMENT_REATTACHED: "re-attached",
}


class ProgressLine:
    """One self-rewriting status line on a terminal (a line per update elsewhere, at most every 5 s),
    kept across re-attaches: a note (e.g. "re-attaching") shows on it until progress comes again."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self._last = 0.0
        self._figures: tuple[int, int, float, int] | None = None

    def update(self, done: int, total: int, rows_per_s: float, failed: int) -> None:
        if self._figures is not None and rows_per_s <= 0:
            rows_per_s = self._figures[2]  # a re-attached stream starts without a rate: keep the last one
        self._figures = (done, total, rows_per_s, failed)
        now = time.monotonic()
        if not self.tty and now - self._last < 5.0 and done < total:
            return
        self._render("")

    def note(self, text: str) -> None:
        self._render(text)

    def _render(self, note: str) -> None:
        if not self.enabled:
            return
        self._last = time.monotonic()
        parts = []
        if self._figures is not None:
            done, total, rows_per_s, failed = self._figures
            share = f" {100.0 * done / total:5.1f}%" if total else ""
            parts.append(
                f"{done:,}/{total:,} rows{share}  {rows_per_s:,.0f} rows/s  {failed:,} without a label"
            )
        if note:
            parts.append(note)
        text = "  ".join(parts)
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (the line goes on below it on a terminal)."""
        if not self.enabled:
            return
        self.stream.write(f"\r{text}\x1b[K\n" if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._figures is not None:
            self.stream.write("\n")
            self.stream.flush()


def _retryable(exc: grpc.RpcError, attempt_started: float) -> bool:
    """Whether the watch broke while the job goes on: the gateway or the service went away
    (UNAVAILABLE), or a server-side stream cap ended the watch before our own deadline."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return (
        exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        and time.monotonic() - attempt_started < CALL_TIMEOUT_SECONDS - 60
    )


def score_shard(
    target: str,
    input_path: Path,
    output_path: Path,
    *,
    batch_rows: int = 0,
    token: str | None = None,
    quiet: bool = False,
    reconnect_seconds: float = 120.0,
    tls: ClientTls | None = None,
) -> int:
    """Stream the job's events into a progress line, re-attaching when the stream breaks; returns a
    process exit code."""
    progress = ProgressLine(sys.stderr, enabled=not quiet)
    job_id = ""
    first_done: int | None = None  # rows done when this command first saw the job
    reattaches = 0
    give_up_at: float | None = None  # end of the current outage's budget
    backoff = INITIAL_BACKOFF_SECONDS
    while True:
        # A new channel per attempt: a channel that saw its target go away waits out its own
        # reconnect backoff (up to minutes), however soon the target is back.
        client = TesseraClient(target, token=token, tls=tls or False)
        attempt_started = time.monotonic()
        call = client.score_shard(
            input_path, output_path, batch_rows=batch_rows, timeout=CALL_TIMEOUT_SECONDS
        )
        try:
            for event in call:
                # Events flow: a later cut gets a fresh budget.
                give_up_at, backoff = None, INITIAL_BACKOFF_SECONDS
                if event.WhichOneof("event") == "progress":
                    p = event.progress
                    if p.HasField("job"):
                        if not job_id:
                            how = ATTACHED.get(p.job.attachment, "attached")
                            progress.message(f"shard job {p.job.job_id}: {how}")
                        job_id = p.job.job_id
                    if first_done is None:
                        first_done = p.rows_done
                    progress.update(p.rows_done, p.rows_total, p.rows_per_second, p.rows_failed)
                    continue
                progress.close()
                _print_summary(event.summary, first_done, reattaches)
                return 0
            reason = "the stream ended without a summary"
        except grpc.RpcError as exc:
            if not _retryable(exc, attempt_started):
                progress.close()
                print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            reason = f"{exc.code().name}: {exc.details()}"
        except KeyboardInterrupt:
            progress.close()
            if job_id:
                print(
                    f"interrupted; shard job {job_id} goes on in the service: run the same command "
                    "again to re-attach",
                    file=sys.stderr,
                )
            return 130
        finally:
            call.cancel()
            client.close()
        now = time.monotonic()
        give_up_at = now + reconnect_seconds if give_up_at is None else give_up_at
        if now >= give_up_at:
            progress.close()
            print(
                f"gave up re-attaching after {reconnect_seconds:.0f}s ({reason}); the job goes on in the "
                "service if it runs: run the same command again to re-attach",
                file=sys.stderr,
            )
            return 1
        delay = min(backoff, give_up_at - now)
        progress.note(f"re-attaching in {delay:.1f}s ({reason})")
        time.sleep(delay)
        backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        reattaches += 1


def _print_summary(s: proxylabel_pb.ShardSummary, first_done: int | None, reattaches: int) -> None:
    resumed = s.rows_resumed if first_done is None else first_done
    again = f", re-attached {reattaches} time{'s' * (reattaches != 1)}" if reattaches else ""
    print(
        f"{s.output_path}: {s.rows_done} rows ({resumed} done before, {s.rows_failed} without a "
        f"label) in {s.seconds:.1f}s, rules {s.rules_version}; job {s.job_id}{again}"
    )
    if s.HasField("evaluation"):
        e = s.evaluation
        per_class = " ".join(f"{a:.2f}" for a in e.per_class_accuracy)
        print(
            f"evaluation on {e.rows_labelled} labelled rows: accuracy {e.accuracy:.4f}, "
            f"macro-F1 {e.macro_f1:.4f}, MAE {e.mean_absolute_error:.4f}, per class [{per_class}]"
        )
    if any(m.demo for m in s.models):
        print("note: scored with demo models trained on generated data")


def _env_path(name: str) -> Path | None:
    return Path(os.environ[name]) if os.environ.get(name) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-score-shard", description=(__doc__ or "").splitlines()[0])
    p.add_argument("input", type=Path, help="the shard, as the proxylabel service sees it")
    p.add_argument("output", type=Path, help="the output directory, as the proxylabel service sees it")
    p.add_argument("--gateway", default=os.environ.get("TESSERA_GATEWAY", "127.0.0.1:50051"))
    p.add_argument(
        "--batch-rows", type=int, default=0, help="rows per output part (0: the shard's row groups)"
    )
    p.add_argument("--token", default=os.environ.get("TESSERA_TOKEN"))
    p.add_argument(
        "--reconnect-seconds",
        type=float,
        default=120.0,
        help="how long to keep re-attaching after the stream breaks, per outage (0: never)",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--ca-file",
        type=Path,
        default=_env_path("TESSERA_CA_FILE"),
        help="TLS: the CA of the gateway's certificate (env TESSERA_CA_FILE); without it, plaintext",
    )
    p.add_argument(
        "--cert-file",
        type=Path,
        default=_env_path("TESSERA_CERT_FILE"),
        help="mutual TLS: a client certificate (env TESSERA_CERT_FILE), with --key-file",
    )
    p.add_argument("--key-file", type=Path, default=_env_path("TESSERA_KEY_FILE"))
    p.add_argument(
        "--server-name",
        default=os.environ.get("TESSERA_SERVER_NAME") or None,
        help="the name in the gateway's certificate, when the target's host differs",
    )
    args = p.parse_args(argv)
    try:
        tls = ClientTls.from_files(args.ca_file, args.cert_file, args.key_file, args.server_name)
    except OSError as exc:
        print(f"tessera-score-shard: cannot read a TLS file: {exc}", file=sys.stderr)
        return 2
    return score_shard(
        args.gateway,
        args.input.resolve(),
        args.output.resolve(),
        batch_rows=args.batch_rows,
        token=args.token,
        quiet=args.quiet,
        reconnect_seconds=args.reconnect_seconds,
        tls=tls,
    )


if __name__ == "__main__":
    sys.exit(main())
