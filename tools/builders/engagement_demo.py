"""The engagement demo models, trained at setup on generated clips and flagged `demo` everywhere
(docs/models.md): no real affect data exists offline, so these only prove the plumbing end to end.

    <repo>/engagement_xgb_<affect>/     one 4-level XGBoost booster per affect (FIL layout)
        config.pbtxt                    input__0 [1764] FP32 (mean HOG of the clip's face crops),
                                        output__0 [4] FP32 (level probabilities)
        1/xgboost.json, 1/hog.json      the booster and its HOG parameters
    <repo>/engagement_temporal/         per-frame CNN + temporal pooling + MLP head (ONNX; see
        config.pbtxt                    tools.builders.engagement_temporal): frames [30, 1, 64, 64] FP32
        1/model.onnx, 1/preprocess.json -> probabilities [4, 4] FP32 (affect x level)

The clips come from tools.modeller.engagement.generate, their crops cut at the generator's face boxes
strayed as a detector's are (no detector in training); 320 clips train, 96 held-out ones give
the accuracies in `report.json`. Built once per content key (the sources of the generator,
features, preprocessing and builders, the recipe, the library versions) under
`<cache>/engagement_demo/<key>/`, then copied into the repository; a rebuild with nothing changed
is a few file checks (xgboost, scikit-learn are imported only to train).

    python -m tools.builders.engagement_demo --repo model_repository --cache .cache
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.engagement.features import AFFECTS, CROP_SIZE, HOG_FILENAME, HogParams, hog_features
from services.runtime.model_files import write_atomic
from tools.builders import engagement_temporal as temporal
from tools.builders.cli import builder_parser, report_built
from tools.builders.engagement_temporal import FRAMES, LEVEL_NAMES, PREPROCESS
from tools.builders.install import install_built
from tools.modeller.engagement import generate

if TYPE_CHECKING:
    import xgboost as xgb

# Bump when the recipe changes in a way the hashed sources below do not show.
DEMO_VERSION = "1"
XGB_PREFIX = "engagement_xgb"
XGB_MODELS = tuple(f"{XGB_PREFIX}_{affect}" for affect in AFFECTS)
TEMPORAL_MODEL = temporal.MODEL_NAME
MODELS = (*XGB_MODELS, TEMPORAL_MODEL)
# Modules whose source is the recipe: found, not imported (xgb_demo would import xgboost).
SOURCES = (
    "tools.modeller.engagement.generate",
    "tools.builders.engagement_temporal",
    "tools.builders.engagement_demo",
    "services.engagement.features",
    "services.vision.preprocess",
    "tools.builders.xgb_demo",
    "tools.modeller.export.temporal_export",
    "tools.modeller.export.versions",
    "services.runtime.model_files",
)
LIBRARIES = (
    ("numpy",),
    ("opencv-python-headless", "opencv-python"),
    ("xgboost-cpu", "xgboost"),
    ("scikit-learn",),
    ("onnx",),
    ("onnxruntime-gpu", "onnxruntime"),
)


@dataclass(frozen=True)
class Recipe:
    """Everything the trained models depend on besides the hashed sources."""

    train_clips: int = 320
    test_clips: int = 96
    frames: int = FRAMES
    seed: int = 2026
    xgb_rounds: int = 40
    xgb_depth: int = 3
    xgb_eta: float = 0.3
    xgb_colsample: float = 0.2
    xgb_max_bin: int = 16
    mlp_hidden: int = 32
    mlp_alpha: float = 3.0
    # Train on crops whose boxes stray as a detector's do, so served crops (detector boxes) match.
    box_noise: generate.BoxNoise | None = field(default_factory=generate.BoxNoise)


# ---------------------------------------------------------------------------------------------
# The boosters


def train_boosters(hogs: np.ndarray, levels: np.ndarray, recipe: Recipe) -> list[xgb.Booster]:
    """One 4-level booster per affect on the clips' mean HOG."""
    import xgboost as xgb

    params = {
        "objective": "multi:softprob",
        "num_class": len(LEVEL_NAMES),
        "max_depth": recipe.xgb_depth,
        "eta": recipe.xgb_eta,
        "subsample": 0.8,
        "colsample_bytree": recipe.xgb_colsample,
        "max_bin": recipe.xgb_max_bin,
        "tree_method": "hist",
        # One thread: on two shared cores more threads only contend (measured 10x slower).
        "nthread": 1,
        "seed": recipe.seed,
    }
    return [
        xgb.train(params, xgb.DMatrix(hogs, label=levels[:, k]), num_boost_round=recipe.xgb_rounds)
        for k in range(len(AFFECTS))
    ]


def booster_probabilities(boosters: list[xgb.Booster], hogs: np.ndarray) -> np.ndarray:
    """[n, 4 affects, 4 levels] as offline evaluation computes them."""
    import xgboost as xgb

    return np.stack([b.predict(xgb.DMatrix(hogs)) for b in boosters], axis=1)


def accuracies(probabilities: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    hits = probabilities.argmax(axis=2) == levels
    return {a: float(hits[:, k].mean()) for k, a in enumerate(AFFECTS)}


def majority_rates(levels: np.ndarray) -> dict[str, float]:
    return {a: float(np.bincount(levels[:, k]).max() / len(levels)) for k, a in enumerate(AFFECTS)}


# ---------------------------------------------------------------------------------------------
# Training and writing


def write_boosters(repo: Path, boosters: list[xgb.Booster], hog: HogParams) -> list[Path]:
    """`<repo>/engagement_xgb_<affect>/`, each with the HOG parameters beside the booster."""
    from tools.builders.xgb_demo import write_xgb_model

    extra = {HOG_FILENAME: hog.dumps().encode()}
    return [
        write_xgb_model(
            b,
            repo,
            name,
            1,
            n_features=hog.dimension,
            n_classes=len(LEVEL_NAMES),
            demo=True,
            extra_files=extra,
        ).parent
        for b, name in zip(boosters, XGB_MODELS, strict=True)
    ]


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


def _train(work: Path, recipe: Recipe) -> dict[str, Any]:
    """Generate, train, verify and write the five models under `work/repo`; returns the report."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # ships no type information

    # One BLAS thread: two shared cores gain nothing from more (they contend), and the MLPs'
    # training then does not depend on the machine's thread count.
    with threadpool_limits(limits=1):
        return _train_single_threaded(work, recipe, _Stopwatch())


def _train_single_threaded(work: Path, recipe: Recipe, clock: _Stopwatch) -> dict[str, Any]:
    n_train = recipe.train_clips
    crops, levels, _ = generate.make_dataset(
        n_train + recipe.test_clips, recipe.frames, recipe.seed, box_noise=recipe.box_noise
    )
    clock.lap("generate")
    hog = HogParams()
    hogs = hog_features(crops.reshape(-1, CROP_SIZE, CROP_SIZE), hog).reshape(len(crops), recipe.frames, -1)
    hogs = hogs.mean(axis=1, dtype=np.float64).astype(np.float32)  # clip_hog of each clip
    clock.lap("hog")
    boosters = train_boosters(hogs[:n_train], levels[:n_train], recipe)
    clock.lap("xgboost")
    feats = temporal.clip_features(crops, recipe.frames)
    clock.lap("cnn_features")
    heads = temporal.train_heads(
        feats[:n_train], levels[:n_train], hidden=recipe.mlp_hidden, alpha=recipe.mlp_alpha, seed=recipe.seed
    )
    clock.lap("mlp")

    # Verify before writing: the served graph on held-out clips against scikit-learn.
    model = temporal.temporal_model(temporal.fold_heads(heads), recipe.frames)
    held_out = temporal.model_input(crops[n_train:])
    served = temporal.session(model).run([PREPROCESS.output_name], {"frames": held_out})[0]
    reference = temporal.head_probabilities(heads, feats[n_train:])
    worst = float(np.abs(served - reference).max())
    if worst > 1e-5:
        raise RuntimeError(
            f"the temporal ONNX graph disagrees with its scikit-learn reference by {worst:.2e}"
        )
    clock.lap("verify")

    write_boosters(work / "repo", boosters, hog)
    temporal.write_temporal(work / "repo", model)
    test_levels = levels[n_train:]
    return {
        "recipe": asdict(recipe),
        "held_out_clips": len(test_levels),
        "majority_rate": majority_rates(test_levels),
        "accuracy": {
            "xgboost": accuracies(booster_probabilities(boosters, hogs[n_train:]), test_levels),
            "temporal": accuracies(served, test_levels),
        },
        "onnx_vs_sklearn_max_abs": worst,
        "seconds": clock.seconds,
    }


# ---------------------------------------------------------------------------------------------
# Cache and install


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def content_key(recipe: Recipe) -> str:
    """What the built models depend on: recipe, sources, library versions (read from the installed
    distributions' metadata: importing xgboost and scikit-learn alone takes seconds)."""
    versions = {names[0]: _version(*names) for names in LIBRARIES}
    h = hashlib.sha256(
        json.dumps(
            {"demo": DEMO_VERSION, "recipe": asdict(recipe), "libraries": versions}, sort_keys=True
        ).encode()
    )
    for module in SOURCES:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def build_engagement_demo(repo: Path, cache: Path, recipe: Recipe | None = None) -> list[Path]:
    """Write the four boosters and the temporal network into `repo`; returns their directories.

    Trains under `<cache>/engagement_demo/<key>/` the first time (~30 s on two cores), then only
    copies; `report.json` there holds the held-out accuracies.
    """
    repo, cache, recipe = Path(repo), Path(cache), recipe or Recipe()
    key = content_key(recipe)
    built = cache / "engagement_demo" / key
    if not (built / ".complete").is_file():
        work = built.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        report = _train(work, recipe)
        write_atomic(work / "report.json", json.dumps(report, indent=2) + "\n", durable=False)
        (work / ".complete").write_text(key)
        shutil.rmtree(built, ignore_errors=True)
        os.replace(work, built)
    repo.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        install_built(built / "repo" / name, repo, key)
    return [repo / name for name in MODELS]


def report(cache: Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """The training report of the build `build_engagement_demo` made (or would reuse)."""
    path = Path(cache) / "engagement_demo" / content_key(recipe or Recipe()) / "report.json"
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = builder_parser(
        __doc__.splitlines()[0], prog="python -m tools.builders.engagement_demo"
    ).parse_args(argv)
    started = time.perf_counter()
    paths = build_engagement_demo(args.repo, args.cache)
    summary = report(args.cache)
    print(json.dumps({"accuracy": summary["accuracy"], "majority_rate": summary["majority_rate"]}, indent=2))
    report_built(paths, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
