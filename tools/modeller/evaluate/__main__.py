"""Evaluate a served model through the gateway on a labelled manifest.

    tessera-evaluate emotion MANIFEST.csv --gateway HOST:PORT [--mode student|ensemble] \\
        [--batch 16] [--fit-temperature] [--json out.json] [--token T] [--rules config/fusion_rules.yaml] \\
        [--split test] [--bins 15] [--timeout 60] [--quiet]

Prints accuracy, macro-F1, per-class F1, NLL, ECE and Brier of the served probabilities; with
--fit-temperature also the temperature that minimises the NLL, the same metrics with it, and the
rules-file line that serves it. --rules names the gateway's rules file (default: the gateway's
TESSERA_GATEWAY__RULES_PATH if set, else config/fusion_rules.yaml); the report says whether it is the
one the gateway used.

Exit status 0 on success, 2 for a bad command line or an unusable manifest / rules file (nothing is
sent), 1 when the gateway fails (a whole request refused, unreachable, or no image scored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from tools.modeller.evaluate.emotion import EvaluationError, ManifestError, default_rules_path, format_report, run


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tessera-evaluate", description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = top.add_subparsers(dest="task", required=True)
    p = sub.add_parser("emotion", help="the emotion answer (ClassifyEmotion) on a manifest of faces")
    p.add_argument("manifest", type=Path, help="CSV: path, label [, x, y, w, h] [, split]")
    p.add_argument("--gateway", default=os.environ.get("TESSERA_GATEWAY", "127.0.0.1:50051"))
    p.add_argument("--mode", choices=["student", "ensemble"], help="default: the rules' default mode")
    p.add_argument("--batch", type=_positive, default=16, help="images per request (default 16)")
    p.add_argument("--fit-temperature", action="store_true", help="fit T on the fused logits (min NLL)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--token", default=os.environ.get("TESSERA_TOKEN"))
    p.add_argument("--rules", type=Path, default=None, help="the gateway's fusion rules file")
    p.add_argument("--split", help="only rows whose 'split' column is this (e.g. test)")
    p.add_argument("--bins", type=_positive, default=15, help="ECE bins (default 15)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse's own exit (2 for a bad line, 0 for --help), as a return value
        return int(exc.code or 0)
    if args.json and not args.json.parent.is_dir():
        print(f"error: --json {args.json}: no directory {args.json.parent}", file=sys.stderr)
        return 2
    try:
        report = run(args.manifest, args.gateway, mode=args.mode, batch=args.batch, fit=args.fit_temperature,
                     token=args.token, rules_path=args.rules or default_rules_path(), split=args.split,
                     bins=args.bins, timeout=args.timeout, progress=not args.quiet and sys.stderr.isatty())
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: gateway {args.gateway}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
