"""A trained XGBoost classifier (JSON or UBJSON) → the repository, in the Triton FIL layout.

    tessera-export xgboost --booster boredom.json --name engagement_xgb_boredom \\
        [--hog hog.json] [--repo model_repository] [--version N]

For the engagement boosters (one 4-class booster per affect, on the clip's mean HOG), the HOG
parameters the booster was trained with go beside it as `hog.json` (default: the service's
defaults, 64-px crops, 9 orientations, 8-px cells, 2×2-cell blocks → 1764 features); the booster's
feature count must equal their dimension. Before anything is written, the booster is loaded back
the way the service loads it and must predict what the modeller's booster predicts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xgboost as xgb

from services.engagement.features import HOG_FILENAME, HogParams
from services.runtime.backends.xgb import load_booster
from tools.builders.xgb_demo import MODEL_FILENAME, booster_classes, fil_config
from tools.modeller.export import versions
from tools.modeller.export.versions import ExportError


def read_booster(path: Path) -> xgb.Booster:
    """The modeller's booster; ExportError when XGBoost cannot read it (loading runs no code)."""
    if not Path(path).is_file():
        raise ExportError(f"booster file {path} does not exist")
    try:
        kind = "xgboost_json" if Path(path).read_bytes().lstrip()[:1] == b"{" else "xgboost_ubj"
        return load_booster(Path(path), kind, nthread=1)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def check_served_equal(original: xgb.Booster, written: Path, n_features: int, seed: int = 0) -> float:
    """Largest difference between the written booster's and the original's probabilities on
    random rows; ExportError above 1e-6 (the JSON round trip must be exact)."""
    rows = np.random.default_rng(seed).standard_normal((64, n_features)).astype(np.float32)
    served = load_booster(written, "xgboost_json", nthread=1)
    want = original.predict(xgb.DMatrix(rows))
    got = served.predict(xgb.DMatrix(rows))
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    if diff > 1e-6:
        raise ExportError(f"the written booster predicts differently from the original (max diff {diff:.2e})")
    return diff


def export_xgboost(
    booster_path: Path,
    name: str,
    repo: Path,
    *,
    version: int | None = None,
    hog: HogParams | None = None,
    demo: bool = False,
) -> Path:
    """Write the booster (and its HOG parameters) as a new version; returns its directory."""
    booster = read_booster(booster_path)
    try:
        classes = booster_classes(booster)
    except ValueError as exc:
        raise ExportError(f"{booster_path}: {exc}") from None
    hog = hog or HogParams()
    if booster.num_features() != hog.dimension:
        raise ExportError(
            f"{booster_path} takes {booster.num_features()} features, but the HOG parameters give "
            f"{hog.dimension}: pass the hog.json it was trained with (--hog)"
        )
    data = bytes(booster.save_raw(raw_format="json"))

    def fill(staging: Path) -> None:
        (staging / HOG_FILENAME).write_text(hog.dumps())
        (staging / MODEL_FILENAME).write_bytes(data)

    def check(_config: object, staging: Path) -> None:
        # The bytes the repository will hold, loaded back as the service loads them.
        check_served_equal(booster, staging / MODEL_FILENAME, booster.num_features())

    return versions.write_version(
        repo, version, fil_config(name, booster.num_features(), classes, demo=demo), fill, check
    )
