"""XGBoost models into the model repository, in the Triton FIL backend's layout.

    <repo>/<name>/config.pbtxt              backend "fil", model_type xgboost_json, predict_proba
    <repo>/<name>/<version>/xgboost.json    the Booster as JSON (loading it executes no code)

The same directory is served in process by ``services.runtime.backends.xgb`` and by production
Triton's FIL backend. ``train_demo_booster`` makes the small models trained on generated data
that the suite ships as ``demo`` (docs/models.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.model_files import Batching, ModelSpec, Tensor, model_config, write_atomic, write_config
from tools.modeller.export.versions import next_version

MODEL_FILENAME = "xgboost.json"  # FIL's default for model_type xgboost_json


def booster_classes(booster: xgb.Booster) -> int:
    """Classes a classifier booster predicts (binary: 2, as FIL's predict_proba output has)."""
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    if objective.startswith("binary:"):
        return 2
    if objective.startswith("multi:"):
        return int(learner["learner_model_param"]["num_class"])
    raise ValueError(f"objective '{objective}' is not a classifier's")


def fil_config(
    name: str,
    n_features: int,
    n_classes: int,
    *,
    demo: bool,
    max_batch_size: int = 256,
    queue_delay_us: int = 500,
) -> mc.ModelConfig:
    """The FIL-backend config of a probability-output XGBoost classifier, on one CPU instance."""
    config = model_config(
        ModelSpec(
            name=name,
            backend="fil",
            max_batch_size=max_batch_size,
            inputs=[Tensor("input__0", (n_features,))],
            outputs=[Tensor("output__0", (n_classes,))],
            batching=Batching(max_queue_delay_us=queue_delay_us),
            parameters={
                "model_type": "xgboost_json",
                "output_class": "true",
                "predict_proba": "true",
                "demo": str(demo).lower(),
            },
        )
    )
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    return config


def write_xgb_model(
    booster: xgb.Booster,
    repo: Path | str,
    name: str,
    version: int | None = None,
    *,
    n_features: int | None = None,
    n_classes: int | None = None,
    demo: bool,
    max_batch_size: int = 256,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a classifier booster as ``<repo>/<name>/<version>/xgboost.json`` plus its config.

    ``version`` None adds the next version. ``n_features`` / ``n_classes`` default to the
    booster's and must agree with it when given. ``extra_files`` (name -> bytes) go in the version
    directory beside the booster, e.g. the feature parameters it was trained on. Returns the
    version directory. A new version directory appears whole (written under a hidden name, then
    renamed), so a reload never sees it half written; the extra files are written before the
    model, the config after it, each file atomically.
    """
    model_dir = Path(repo) / name
    actual_features, actual_classes = booster.num_features(), booster_classes(booster)
    if n_features is not None and n_features != actual_features:
        raise ValueError(f"n_features={n_features} but the booster has {actual_features} features")
    if n_classes is not None and n_classes != actual_classes:
        raise ValueError(f"n_classes={n_classes} but the booster predicts {actual_classes} classes")
    config = fil_config(name, actual_features, actual_classes, demo=demo, max_batch_size=max_batch_size)
    data = bytes(booster.save_raw(raw_format="json"))

    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    version_dir = model_dir / str(version)
    if extra_files and MODEL_FILENAME in extra_files:
        raise ValueError(f"extra_files cannot replace {MODEL_FILENAME}")
    files = {**(extra_files or {}), MODEL_FILENAME: data}  # the model last: it marks the version whole
    if version_dir.exists():
        for filename, content in files.items():
            write_atomic(version_dir / filename, content)
    else:
        staging = model_dir / f".{version}.tmp-{os.getpid()}"
        for filename, content in files.items():
            write_atomic(staging / filename, content)
        os.replace(staging, version_dir)
    write_config(model_dir, config)
    return version_dir


def train_demo_booster(
    n_features: int, n_classes: int, *, rows: int = 400, rounds: int = 10, seed: int = 0
) -> tuple[xgb.Booster, np.ndarray]:
    """A small classifier on generated, learnable data (labels from a random linear map).

    Returns the booster and a float32 sample of its inputs (useful to compare served outputs).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features)).astype(np.float32)
    w = rng.standard_normal((n_features, n_classes))
    y = (x @ w + 0.3 * rng.standard_normal((rows, n_classes))).argmax(axis=1)
    params: dict[str, object] = {"max_depth": 3, "eta": 0.3, "nthread": 1, "seed": seed}
    if n_classes == 2:
        params["objective"] = "binary:logistic"
    else:
        params.update(objective="multi:softprob", num_class=n_classes)
    booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=rounds)
    return booster, x
