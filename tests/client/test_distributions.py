"""The API stubs and the client are distributions of their own: a client app installs them into a
clean environment (no server code, no generic top-level names) and calls a running suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from skimage import data as skdata

from launcher.suite import ROOT, Suite

UV = Path(sys.executable).parent / "uv"

APP = """
import importlib.util, json, sys
from tessera_client import TesseraClient
with TesseraClient(sys.argv[1], timeout=30) as c:
    faces = c.classify_image(sys.argv[2])
    status = c.status()
print(json.dumps({
    "faces": [[f.label, round(f.probabilities[f.label], 4)] for f in faces],
    "rules": status.rules_version,
    "server_names": [n for n in ("services", "gateway", "launcher", "tools", "client")
                     if importlib.util.find_spec(n) is not None],
}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with only `tessera-client` (and `tessera-api`) installed from the checkout."""
    venv = tmp_path_factory.mktemp("client-app") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The server's pins as constraints: the same grpcio/protobuf the suite runs, nothing else.
    subprocess.run(
        [
            str(UV),
            "pip",
            "install",
            "-q",
            "--python",
            str(venv / "bin" / "python"),
            "-c",
            str(ROOT / "requirements" / "serve.txt"),
            str(ROOT / "gen"),
            str(ROOT / "client"),
        ],
        check=True,
        cwd=tmp_path_factory.getbasetemp(),
        timeout=600,
    )
    return venv


def test_client_installs_alone_and_answers(client_venv: Path, suite: Suite, tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Run from a folder outside the checkout, so nothing of the server can be found by accident.
    out = subprocess.run(
        [str(client_venv / "bin" / "python"), "-c", APP, suite.gateway.target, str(photo)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    import json

    answer = json.loads(out.stdout)
    assert [label for label, _ in answer["faces"]] == ["Happy"]
    assert answer["faces"][0][1] > 0.9
    assert answer["rules"]
    assert answer["server_names"] == [], "the client environment sees server code"


def test_client_distribution_carries_the_shard_command(client_venv: Path) -> None:
    out = subprocess.run(
        [str(client_venv / "bin" / "tessera-score-shard"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--gateway" in out.stdout


def test_client_dependencies_are_the_api_and_grpc_only(client_venv: Path) -> None:
    out = subprocess.run(
        [str(UV), "pip", "list", "--python", str(client_venv / "bin" / "python"), "--format", "freeze"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {line.split("==")[0].lower() for line in out.stdout.split()}
    assert {"tessera-api", "tessera-client", "grpcio", "protobuf", "numpy"} <= names
    assert not names & {"onnxruntime-gpu", "opencv-python-headless", "torch", "pydantic", "tessera-server"}


def test_server_code_runs_from_the_checkout() -> None:
    """The server's editable install points into the checkout: no copy of its generic top-level names."""
    import importlib.util

    for name in ("services", "gateway", "launcher", "tools"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{name} comes from {spec.origin}"
