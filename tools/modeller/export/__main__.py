"""Command line of the exporters.

    tessera-export timm --arch resnet18 --checkpoint ckpt.pt --num-classes 7 \\
        --name emotion_rn18 --repo model_repository [--version N] [--input-size 224|auto] \\
        [--clahe-clip 2.0 --clahe-tile 8 --clahe-space lab_l|gray|none] [--temperature T] \\
        [--class-names Angry Disgust ...] [--cache DIR]

    tessera-export sentence-transformers --checkpoint DIR [--name text_embedder] \\
        [--repo model_repository] [--version N] [--cache DIR] [--embedder-name NAME] [--opset 17]

    tessera-export xgboost --booster boredom.json --name engagement_xgb_boredom [--hog hog.json]

    tessera-export temporal --model net.onnx --preprocess preprocess.json [--name engagement_temporal]

The first writes an image classifier (ONNX + config + preprocess.json), the second the proxylabel
service's text-embedding model (ONNX with pooling and normalisation + tokenizer.json + embedder.json)
from a sentence-transformers checkpoint directory, the third an engagement booster in the FIL layout
with the HOG parameters it was trained on, the fourth a temporal engagement network already in ONNX
(its clip-in, affect × level-out signature and probabilities checked). Each refuses to write what the served model would not
reproduce.

Exit status 0 when the version was written, 1 when the export was refused (nothing written),
2 for a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

ARCHS_HELP = "timm architecture, e.g. resnet18, tf_efficientnet_b3, convnext_tiny, mobilenetv3_large_100"


def _input_size(text: str) -> int | None:
    if text == "auto":
        return None  # timm's pretrained_cfg decides
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive number of pixels or 'auto'")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tessera-export", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("timm", help="a timm image classifier -> ONNX + config + preprocess.json")
    p.add_argument("--arch", required=True, help=ARCHS_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="state_dict file (or a dict with it under 'state_dict' / 'model')"
    )
    source.add_argument(
        "--random-init",
        type=int,
        metavar="SEED",
        dest="seed",
        help="no checkpoint: random weights from this seed (smoke tests only)",
    )
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--version", type=int, help="default: one more than the highest existing")
    p.add_argument(
        "--input-size",
        type=_input_size,
        default=224,
        help="square input in pixels, or 'auto' for timm's pretrained_cfg (default 224)",
    )
    p.add_argument("--clahe-clip", type=float, default=2.0)
    p.add_argument("--clahe-tile", type=int, default=8, help="tiles per side of the CLAHE grid")
    p.add_argument(
        "--clahe-space",
        choices=["lab_l", "gray", "none"],
        default="lab_l",
        help="where CLAHE runs; 'none' turns it off (default lab_l, the teachers' training)",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--class-names",
        nargs="+",
        help="class order of the logits (default: the 7 canonical emotion classes)",
    )
    p.add_argument("--cache", type=Path, help="reuse and store exported graphs under this directory")
    _sentence_transformers_parser(sub)
    _xgboost_parser(sub)
    _temporal_parser(sub)
    return top


def _temporal_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "temporal",
        help="a temporal engagement network already in ONNX ([batch, frames, C, H, W] "
        "-> [batch, 4, 4] probabilities) + its preprocess.json",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="the network as ONNX (ending in a softmax over levels)"
    )
    p.add_argument(
        "--preprocess",
        type=Path,
        required=True,
        help="preprocess.json: input/output names, crop size, colour, mean/std (as the emotion models')",
    )
    p.add_argument("--name", default="engagement_temporal")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--version", type=int, help="default: one more than the highest existing")


def _xgboost_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "xgboost",
        help="an XGBoost classifier (JSON/UBJSON) -> the FIL layout + hog.json (the engagement boosters)",
    )
    p.add_argument(
        "--booster", type=Path, required=True, help="the Booster saved with save_model (.json/.ubj)"
    )
    p.add_argument("--name", required=True, help="model name, e.g. engagement_xgb_boredom")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--version", type=int, help="default: one more than the highest existing")
    p.add_argument(
        "--hog", type=Path, help="hog.json of the features it was trained on (default: the service's)"
    )


def _sentence_transformers_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sentence-transformers",
        help="a sentence-transformers checkpoint -> the text-embedding model "
        "(ONNX + tokenizer.json + embedder.json + config)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="sentence-transformers checkpoint directory (modules.json, weights, tokenizer)",
    )
    p.add_argument(
        "--name",
        default="text_embedder",
        help="model name in the repository (default text_embedder, the proxylabel service's)",
    )
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--version", type=int, help="default: one more than the highest existing")
    p.add_argument("--cache", type=Path, help="reuse and store verified exports under this directory")
    p.add_argument(
        "--embedder-name",
        help="the embedder's identity, which kNN index and MLP must match "
        "(default: the checkpoint directory's name)",
    )
    # No default here: the exporter's (model_files.OPSET) is not imported before the export runs.
    p.add_argument("--opset", type=int, help="ONNX opset (default: the suite's, 17)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.kind == "sentence-transformers":
        return _sentence_transformers(args)
    if args.kind == "xgboost":
        return _xgboost(args)
    if args.kind == "temporal":
        return _temporal(args)
    return _timm(args)


def _bad_settings(exc: Exception | str) -> int:
    print(f"export failed: {exc}", file=sys.stderr)
    return 2


def _run(export: Callable[[], Path]) -> int:
    """Run one export: 0 once the version is written, 1 when it was refused (nothing written)."""
    # The light module's error class, which every exporter raises: importing an exporter here
    # would load torch before a cached export needs it.
    from tools.modeller.export.versions import ExportError

    started = time.perf_counter()
    try:
        out = export()
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"{out} written in {time.perf_counter() - started:.1f}s")
    return 0


def _temporal(args: argparse.Namespace) -> int:
    from services.vision.preprocess import load_params
    from tools.modeller.export.temporal_export import export_temporal

    try:
        params = load_params(args.preprocess)
    except ValueError as exc:
        return _bad_settings(exc)
    return _run(lambda: export_temporal(args.model, params, args.name, args.repo, version=args.version))


def _xgboost(args: argparse.Namespace) -> int:
    from services.engagement.features import HogParams
    from tools.modeller.export.xgb_export import export_xgboost

    try:
        hog = HogParams.load(args.hog) if args.hog else None
    except ValueError as exc:  # a bad hog.json (ConfigError)
        return _bad_settings(exc)
    return _run(lambda: export_xgboost(args.booster, args.name, args.repo, version=args.version, hog=hog))


def _sentence_transformers(args: argparse.Namespace) -> int:
    from tools.modeller.export.st_export import export_sentence_transformer

    return _run(
        lambda: export_sentence_transformer(
            args.checkpoint,
            args.name,
            args.repo,
            version=args.version,
            cache_dir=args.cache,
            embedder_name=args.embedder_name,
            **({} if args.opset is None else {"opset": args.opset}),
        )
    )


def _timm(args: argparse.Namespace) -> int:
    # Imported after parsing so --help and usage errors do not wait for torch.
    from services.vision.preprocess import ClaheParams
    from tools.modeller.export.timm_export import export_timm

    try:
        clahe = (
            None
            if args.clahe_space == "none"
            else ClaheParams(
                clip_limit=args.clahe_clip,
                tile_grid=(args.clahe_tile, args.clahe_tile),
                space=args.clahe_space,
            )
        )
    except ValueError as exc:
        return _bad_settings(f"bad CLAHE settings: {exc}")
    return _run(
        lambda: export_timm(
            args.arch,
            args.checkpoint,
            args.num_classes,
            args.name,
            args.repo,
            version=args.version,
            input_size=args.input_size,
            clahe=clahe,
            temperature=args.temperature,
            class_names=args.class_names,
            seed=args.seed,
            cache_dir=args.cache,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
