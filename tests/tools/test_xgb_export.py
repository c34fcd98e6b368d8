"""`tessera-export xgboost`: a modeller's booster into the FIL layout with its HOG
parameters, served by the XGBoost backend exactly as the booster predicts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from services.engagement.features import HOG_FILENAME, HogParams
from services.runtime.backends.xgb import XgbBackend, XgbConfig
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from tools.modeller.export.__main__ import main as export_main


def _booster(n_features: int, seed: int = 0) -> tuple[xgb.Booster, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((240, n_features)).astype(np.float32)
    y = (x[:, :4] @ rng.standard_normal((4, 4))).argmax(axis=1)
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 4, "max_depth": 3, "nthread": 1, "seed": seed},
        xgb.DMatrix(x, label=y),
        num_boost_round=6,
    )
    return booster, x[:32]


def _served(repo: Path, name: str, rows: np.ndarray) -> np.ndarray:
    async def run() -> np.ndarray:
        backend = XgbBackend(ModelRepository(repo), XgbConfig(), Metrics("test"))
        await backend.start()
        try:
            return (await backend.infer(name, {"input__0": rows})).outputs["output__0"]
        finally:
            await backend.close()

    return asyncio.run(run())


@pytest.mark.parametrize("suffix", [".json", ".ubj"])
def test_exported_booster_serves_what_it_predicts(tmp_path: Path, suffix: str) -> None:
    booster, rows = _booster(HogParams().dimension)
    path = tmp_path / f"boredom{suffix}"
    booster.save_model(path)
    repo = tmp_path / "repo"
    assert (
        export_main(
            ["xgboost", "--booster", str(path), "--name", "engagement_xgb_boredom", "--repo", str(repo)]
        )
        == 0
    )
    np.testing.assert_allclose(
        _served(repo, "engagement_xgb_boredom", rows), booster.predict(xgb.DMatrix(rows)), atol=1e-6
    )
    assert HogParams.load(repo / "engagement_xgb_boredom" / "1" / HOG_FILENAME) == HogParams()
    # A second export is the next version; an explicit existing one is refused.
    assert (
        export_main(
            ["xgboost", "--booster", str(path), "--name", "engagement_xgb_boredom", "--repo", str(repo)]
        )
        == 0
    )
    assert (repo / "engagement_xgb_boredom" / "2" / "xgboost.json").is_file()
    assert (
        export_main(
            [
                "xgboost",
                "--booster",
                str(path),
                "--name",
                "engagement_xgb_boredom",
                "--repo",
                str(repo),
                "--version",
                "1",
            ]
        )
        == 1
    )


def test_hog_parameters_must_fit_the_booster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coarse = HogParams(cell=16)  # 3×3 blocks of 2×2 cells × 9 orientations = 324 features
    booster, rows = _booster(coarse.dimension, seed=1)
    booster.save_model(tmp_path / "b.json")
    repo = tmp_path / "repo"
    assert (
        export_main(["xgboost", "--booster", str(tmp_path / "b.json"), "--name", "m", "--repo", str(repo)])
        == 1
    )
    assert "--hog" in capsys.readouterr().err and not (repo / "m").exists()
    (tmp_path / "hog.json").write_text(coarse.dumps())
    assert (
        export_main(
            [
                "xgboost",
                "--booster",
                str(tmp_path / "b.json"),
                "--name",
                "m",
                "--repo",
                str(repo),
                "--hog",
                str(tmp_path / "hog.json"),
            ]
        )
        == 0
    )
    assert HogParams.load(repo / "m" / "1" / HOG_FILENAME) == coarse
    np.testing.assert_allclose(_served(repo, "m", rows), booster.predict(xgb.DMatrix(rows)), atol=1e-6)


def test_not_a_booster_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text('{"not": "a booster"}')
    assert (
        export_main(
            [
                "xgboost",
                "--booster",
                str(tmp_path / "x.json"),
                "--name",
                "m",
                "--repo",
                str(tmp_path / "repo"),
            ]
        )
        == 1
    )
    assert "export failed" in capsys.readouterr().err
    assert (
        export_main(
            [
                "xgboost",
                "--booster",
                str(tmp_path / "missing.json"),
                "--name",
                "m",
                "--repo",
                str(tmp_path / "repo"),
            ]
        )
        == 1
    )
    (tmp_path / "bad_hog.json").write_text('{"cell": 7}')
    booster, _ = _booster(HogParams().dimension)
    booster.save_model(tmp_path / "ok.json")
    assert (
        export_main(
            [
                "xgboost",
                "--booster",
                str(tmp_path / "ok.json"),
                "--name",
                "m",
                "--repo",
                str(tmp_path / "repo"),
                "--hog",
                str(tmp_path / "bad_hog.json"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "repo" / "m").exists()
