"""`tessera-score-shard`: score a parquet shard through the gateway, with a progress line.

The paths are the service's: the shard must lie under the proxylabel service's input roots and
the output directory under its output roots. Run it again after an interruption to resume.

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

from tessera_client.client import TesseraClient


class ProgressLine:
    """One self-rewriting status line on a terminal (a line per update elsewhere, at most every 5 s)."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, done: int, total: int, rows_per_s: float, failed: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < 5.0 and done < total:
            return
        self._last = now
        share = f" {100.0 * done / total:5.1f}%" if total else ""
        text = f"{done:,}/{total:,} rows{share}  {rows_per_s:,.0f} rows/s  {failed:,} without a label"
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def score_shard(target: str, input_path: Path, output_path: Path, *, batch_rows: int = 0, token: str | None = None,
                quiet: bool = False) -> int:
    """Stream the job's events into a progress line; returns a process exit code."""
    with TesseraClient(target, token=token) as client:
        progress = ProgressLine(sys.stderr, enabled=not quiet)
        try:
            for event in client.score_shard(input_path, output_path, batch_rows=batch_rows):
                if event.WhichOneof("event") == "progress":
                    p = event.progress
                    progress.update(p.rows_done, p.rows_total, p.rows_per_second, p.rows_failed)
                    continue
                s = event.summary
                progress.close()
                print(f"{s.output_path}: {s.rows_done} rows ({s.rows_resumed} resumed, {s.rows_failed} without a "
                      f"label) in {s.seconds:.1f}s, rules {s.rules_version}")
                if s.HasField("evaluation"):
                    e = s.evaluation
                    per_class = " ".join(f"{a:.2f}" for a in e.per_class_accuracy)
                    print(f"evaluation on {e.rows_labelled} labelled rows: accuracy {e.accuracy:.4f}, "
                          f"macro-F1 {e.macro_f1:.4f}, MAE {e.mean_absolute_error:.4f}, per class [{per_class}]")
                if any(m.demo for m in s.models):
                    print("note: scored with demo models trained on generated data")
        except grpc.RpcError as exc:
            progress.close()
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-score-shard", description=(__doc__ or "").splitlines()[0])
    p.add_argument("input", type=Path, help="the shard, as the proxylabel service sees it")
    p.add_argument("output", type=Path, help="the output directory, as the proxylabel service sees it")
    p.add_argument("--gateway", default=os.environ.get("TESSERA_GATEWAY", "127.0.0.1:50051"))
    p.add_argument("--batch-rows", type=int, default=0, help="rows per output part (0: the shard's row groups)")
    p.add_argument("--token", default=os.environ.get("TESSERA_TOKEN"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    return score_shard(args.gateway, args.input.resolve(), args.output.resolve(), batch_rows=args.batch_rows,
                       token=args.token, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
