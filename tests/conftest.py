"""Shared fixtures: the default model repository and a running suite on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from skimage import data as skdata

from launcher.suite import ROOT, Suite
from tests.helpers.images import png_bomb as make_png_bomb
from tests.helpers.suites import CACHE, start_suite
from tools.builders.blazeface import build_blazeface
from tools.builders.fer_student import build_fer_student


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The default repository (what `make models` builds; built here too, idempotently)."""
    repo = ROOT / "model_repository"
    build_fer_student(repo, CACHE)
    build_blazeface(repo, CACHE)  # the default face detector of the emotion and engagement services
    return repo


@pytest.fixture(scope="session")
def astronaut_jpeg() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Suite]:
    """The whole suite, shared by a test module: tests must not break it."""
    s = start_suite(
        tmp_path_factory.mktemp("suite"), model_repository, data_roots=(tmp_path_factory.getbasetemp(),)
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def png_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A zero-filled 30000x30000 PNG: 2.7 MB on the wire, 900 MB if anyone decoded it."""
    return make_png_bomb(tmp_path_factory.getbasetemp() / "bomb_30000.png")
