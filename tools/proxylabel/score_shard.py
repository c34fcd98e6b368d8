"""Score a parquet shard through the gateway, with a progress bar.

The paths are the service's: the shard must lie under the proxylabel service's input roots and
the output directory under its output roots. Run it again after an interruption to resume.

    python -m tools.proxylabel.score_shard --gateway 127.0.0.1:50051 data/shard.parquet data/shard.scored
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from tqdm import tqdm

from client import TesseraClient


def score_shard(target: str, input_path: Path, output_path: Path, *, batch_rows: int = 0, token: str | None = None,
                quiet: bool = False) -> int:
    """Stream the job's events into a progress bar; returns a process exit code."""
    with TesseraClient(target, token=token) as client:
        bar = tqdm(total=0, unit="rows", disable=quiet, dynamic_ncols=True)
        try:
            for event in client.score_shard(input_path, output_path, batch_rows=batch_rows):
                if event.WhichOneof("event") == "progress":
                    p = event.progress
                    bar.total = p.rows_total
                    bar.n = p.rows_done
                    bar.set_postfix(rows_per_s=f"{p.rows_per_second:,.0f}", failed=p.rows_failed)
                    bar.refresh()
                    continue
                s = event.summary
                bar.close()
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
            bar.close()
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.proxylabel.score_shard", description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--gateway", default=os.environ.get("TESSERA_GATEWAY", "127.0.0.1:50051"))
    p.add_argument("--batch-rows", type=int, default=0, help="rows per output part (0: the shard's row groups)")
    p.add_argument("--token", default=os.environ.get("TESSERA_TOKEN"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    return score_shard(args.gateway, args.input.resolve(), args.output.resolve(), batch_rows=args.batch_rows,
                       token=args.token, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
