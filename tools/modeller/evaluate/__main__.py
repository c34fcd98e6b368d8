"""Evaluate the served models on labelled data: tessera-evaluate COMMAND ...

    tessera-evaluate emotion MANIFEST.csv [--faces detect|crop] [--mode student|ensemble] [--ensemble NAME]
        [--fit-temperature] [--out DIR] [--json FILE]
    tessera-evaluate search-weights MANIFEST.csv [--ensemble NAME] [--step 0.1] [--space logit prob]
        [--metric macro_f1|nll] [--val-split val --test-split test | --val-fraction 0.5] [--write-rules FILE]
    tessera-evaluate export-softlabels MANIFEST.csv --out DIR|FILE.parquet [--ensemble NAME]
    tessera-evaluate engagement CLIPS.csv [--sweep-threshold [--thresholds 0:1:0.05]] [--out DIR]
    tessera-evaluate proxylabel SHARD.parquet [--repo model_repository] [--sweep [--folds 5]] [--out DIR]

Every command that asks the gateway (--gateway, default TESSERA_GATEWAY or 127.0.0.1:50051;
--token or TESSERA_TOKEN) caches its answers (--cache DIR, default .cache/evaluate; --no-cache),
so a second run, a refit or a weight search costs no serving and an interrupted run resumes.
--out DIR writes report.json, report.md and the PNG figures there. A row that cannot be scored is
reported by its line and the run goes on. Figures need matplotlib (make install-modeller).

Exit status: 0 on success; 2 for a bad command line or unusable input (manifest, clip list, shard,
rules file: nothing is sent); 1 when the gateway or the models fail (a whole request refused,
unreachable, nothing scored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import grpc

from tools.modeller.evaluate.common import DEFAULT_CACHE, EvaluationError, ManifestError
from tools.modeller.evaluate.figures import FiguresUnavailable


class _Report(Protocol):
    """What every command returns (what --json writes)."""

    def to_dict(self) -> dict[str, Any]: ...


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _step(text: str) -> float:
    value = float(text)
    parts = round(1 / value) if value > 0 else 0
    if parts < 1 or abs(parts * value - 1) > 1e-9:
        raise argparse.ArgumentTypeError("must divide 1 (0.1, 0.05, 0.2, 0.25, …)")
    return value


def _gateway_options(p: argparse.ArgumentParser, timeout: float = 60.0) -> None:
    p.add_argument("--gateway", default=os.environ.get("TESSERA_GATEWAY", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("TESSERA_TOKEN"))
    p.add_argument(
        "--timeout", type=float, default=timeout, help=f"seconds per request (default {timeout:g})"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("TESSERA_EVALUATE_CACHE", DEFAULT_CACHE)),
        help="answer cache folder (default .cache/evaluate, or TESSERA_EVALUATE_CACHE)",
    )
    p.add_argument("--no-cache", action="store_true", help="ask the gateway for everything, cache nothing")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rules",
        type=Path,
        default=None,
        help="the gateway's fusion rules file (default TESSERA_GATEWAY__RULES_PATH, else "
        "config/fusion_rules.yaml)",
    )
    p.add_argument("--out", type=Path, help="folder for report.json, report.md and the figures")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _emotion_request(p: argparse.ArgumentParser, modes: bool = True) -> None:
    if modes:
        p.add_argument("--mode", choices=["student", "ensemble"], help="default: the rules' default mode")
    p.add_argument(
        "--ensemble",
        help="a named ensemble of the rules (implies --mode ensemble); default: the rules' emotion.ensemble",
    )
    p.add_argument(
        "--faces",
        choices=["detect", "crop"],
        default="detect",
        help="rows without a box: detect (default; the served detector finds the face, images with no "
        "face or several are reported, not scored) or crop (each image is a face crop)",
    )
    p.add_argument("--batch", type=_positive, default=16, help="images per request (default 16)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="tessera-evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = top.add_subparsers(dest="task", required=True)

    p = sub.add_parser("emotion", help="the emotion answer and each ensemble member on a manifest of images")
    p.add_argument("manifest", type=Path, help="CSV: path, label [, x, y, w, h] [, split] [, source]")
    _emotion_request(p)
    p.add_argument("--fit-temperature", action="store_true", help="fit T on the fused logits (min NLL)")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--split", help="only rows whose 'split' column is this (e.g. test)")
    p.add_argument("--bins", type=_positive, default=15, help="ECE and reliability bins (default 15)")
    _gateway_options(p)
    _common(p)

    p = sub.add_parser("search-weights", help="grid search of a named ensemble's member weights")
    p.add_argument(
        "manifest", type=Path, help="CSV as for emotion; its split column may name val and test rows"
    )
    _emotion_request(p, modes=False)
    p.add_argument("--step", type=_step, default=0.1, help="weight grid step on the simplex (default 0.1)")
    p.add_argument(
        "--space",
        nargs="+",
        choices=["logit", "prob"],
        default=["logit", "prob"],
        help="fusion spaces searched (default both)",
    )
    p.add_argument("--metric", choices=["macro_f1", "nll"], default="macro_f1", help="ranking on validation")
    p.add_argument(
        "--val-split", help="split value of the validation rows (default val/validation/dev if present)"
    )
    p.add_argument("--test-split", help="split value of the test rows (default test if present)")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.5,
        help="without split values: share of rows for validation, stratified (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=_positive, default=10, help="candidates in the report (default 10)")
    p.add_argument(
        "--write-rules",
        type=Path,
        metavar="FILE",
        help="write the best weights, space and temperature into this rules file (validated)",
    )
    p.add_argument("--bins", type=_positive, default=15)
    _gateway_options(p)
    _common(p)

    p = sub.add_parser(
        "export-softlabels", help="every row's member logits and fused probabilities, to parquet"
    )
    p.add_argument("manifest", type=Path)
    _emotion_request(p)
    p.add_argument("--split", help="only rows whose 'split' column is this")
    _gateway_options(p)
    p.add_argument("--rules", type=Path, default=None, help="the gateway's fusion rules file")
    p.add_argument("--out", type=Path, required=True, help="a folder (softlabels.parquet) or a .parquet file")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("engagement", help="the engagement answer and each model on clips with known levels")
    p.add_argument(
        "clips",
        type=Path,
        help="CSV: path (video or folder of frames), engagement, boredom, confusion, "
        "frustration [, fps] [, source]",
    )
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of folders of frames (default 30)")
    p.add_argument("--sweep-threshold", action="store_true", help="macro-F1 per selective-fusion threshold")
    p.add_argument("--thresholds", default="0:1:0.05", help="start:stop:step or a list (default 0:1:0.05)")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    _gateway_options(p, timeout=120.0)
    _common(p)

    p = sub.add_parser("proxylabel", help="kNN, MLP and soft vote on a shard with known gpt_scores (offline)")
    p.add_argument("shard", type=Path, help="parquet shard with gpt_scores")
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="the served model repository")
    p.add_argument(
        "--sweep", action="store_true", help="k-fold cross-validated sweep over K, tau, weighting, alpha"
    )
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=_positive, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--tau", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument(
        "--weighting",
        nargs="+",
        choices=["softmax", "power", "uniform"],
        default=["softmax", "power", "uniform"],
    )
    p.add_argument("--power-alpha", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=[round(0.1 * i, 1) for i in range(11)],
        help="soft-vote alphas (the MLP's weight)",
    )
    p.add_argument("--rank", choices=["accuracy", "macro_f1"], default="accuracy")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    _common(p)
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse's own exit (2 for a bad line, 0 for --help), as a return value
        return int(exc.code or 0)
    json_path = getattr(args, "json", None)
    if json_path and not json_path.parent.is_dir():
        print(f"error: --json {json_path}: no directory {json_path.parent}", file=sys.stderr)
        return 2
    from tools.modeller.evaluate.emotion import default_rules_path

    rules = args.rules or default_rules_path()
    progress = not args.quiet
    cache = None if getattr(args, "no_cache", False) else getattr(args, "cache", None)
    result: _Report
    try:
        if args.task == "emotion":
            from tools.modeller.evaluate import emotion

            evaluated = emotion.run(
                args.manifest,
                args.gateway,
                mode=args.mode,
                batch=args.batch,
                fit=args.fit_temperature,
                token=args.token,
                rules_path=rules,
                split=args.split,
                bins=args.bins,
                timeout=args.timeout,
                progress=progress,
                ensemble=args.ensemble,
                faces=args.faces,
                cache_dir=cache,
                out=args.out,
            )
            print(emotion.format_markdown(evaluated))
            result = evaluated
        elif args.task == "search-weights":
            from tools.modeller.evaluate import weights

            searched = weights.run(
                args.manifest,
                args.gateway,
                ensemble=args.ensemble,
                step=args.step,
                spaces=args.space,
                metric=args.metric,
                val_split=args.val_split,
                test_split=args.test_split,
                val_fraction=args.val_fraction,
                seed=args.seed,
                top=args.top,
                write_rules_to=args.write_rules,
                rules_path=rules,
                faces=args.faces,
                batch=args.batch,
                token=args.token,
                timeout=args.timeout,
                progress=progress,
                cache_dir=cache,
                bins=args.bins,
                out=args.out,
            )
            print(weights.format_markdown(searched))
            result = searched
        elif args.task == "export-softlabels":
            from tools.modeller.evaluate import softlabels

            exported = softlabels.run(
                args.manifest,
                args.gateway,
                args.out,
                mode=args.mode,
                ensemble=args.ensemble,
                faces=args.faces,
                batch=args.batch,
                token=args.token,
                rules_path=rules,
                split=args.split,
                timeout=args.timeout,
                progress=progress,
                cache_dir=cache,
            )
            print(softlabels.format_summary(exported))
            result = exported
        elif args.task == "engagement":
            from tools.modeller.evaluate import engagement

            if not (args.fps > 0):
                raise ManifestError(f"--fps {args.fps}: must be a positive number")
            thresholds = engagement.parse_thresholds(args.thresholds) if args.sweep_threshold else None
            engaged = engagement.run(
                args.clips,
                args.gateway,
                token=args.token,
                rules_path=rules,
                fps=args.fps,
                sweep=thresholds,
                timeout=args.timeout,
                progress=progress,
                cache_dir=cache,
                out=args.out,
            )
            print(engagement.format_markdown(engaged))
            result = engaged
        else:
            from tools.modeller.evaluate import proxylabel

            proxied = proxylabel.run(
                args.shard,
                repo=args.repo,
                rules_path=rules,
                do_sweep=args.sweep,
                folds=args.folds,
                seed=args.seed,
                ks=args.k,
                taus=args.tau,
                weightings=args.weighting,
                power_alphas=args.power_alpha,
                alphas=args.alpha,
                rank=args.rank,
                progress=progress,
                out=args.out,
            )
            print(proxylabel.format_markdown(proxied))
            result = proxied
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a sweep option the functions refuse (folds, weighting …)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: gateway {args.gateway}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (EvaluationError, FiguresUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    if getattr(args, "out", None) is not None:
        print(f"written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
