"""Writing one exported version into the repository, whole or not at all (no torch here).

A version is filled in a hidden staging directory (the repository ignores non-numeric names),
checked against the config it will be served with, then renamed into place; versions are never
overwritten. Every exporter shares this, so a reader of the repository never sees half a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.repository import check_signature, onnx_signature
from tools.builders.fer_student import _write_atomic as write_atomic


class ExportError(RuntimeError):
    """The export was refused; nothing was written to the repository."""


def parse_config(text: str, name: str) -> mc.ModelConfig:
    """The generated config.pbtxt, which must parse and name the model."""
    parsed = mc.ModelConfig()
    try:
        text_format.Parse(text, parsed)
    except text_format.ParseError as exc:
        raise ExportError(f"generated config.pbtxt does not parse: {exc}") from None
    if parsed.name and parsed.name != name:
        raise ExportError(f"generated config.pbtxt names {parsed.name!r}, not {name!r}")
    return parsed


def next_version(model_dir: Path) -> int:
    existing = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(existing, default=0) + 1


def check_onnx_signature(config: mc.ModelConfig, staging: Path) -> None:
    """The staged model.onnx declares what the config says."""
    problems = check_signature(config, *onnx_signature(staging / "model.onnx"))
    if problems:
        raise ExportError("exported model disagrees with its config: " + "; ".join(problems))


def write_version(repo: Path, name: str, version: int | None, config: str,
                  fill: Callable[[Path], None],
                  check: Callable[[mc.ModelConfig, Path], None] = check_onnx_signature) -> Path:
    """`fill(staging)` writes the version's files (the model and what lies beside it); `check`
    holds them against `config` (an ONNX model's signature by default), then they are renamed
    into `<repo>/<name>/<version>` and the config is written. Returns the version directory."""
    parsed = parse_config(config, name)
    model_dir = Path(repo) / name
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    final = model_dir / str(version)
    if final.exists():
        _drop_if_empty(model_dir, created)
        raise ExportError(f"{final} already exists: versions are never overwritten; "
                          f"leave --version out to take the next one")
    staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_dir))
    try:
        fill(staging)
        check(parsed, staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a server may run as another user
        try:
            os.rename(staging, final)
        except OSError as exc:
            raise ExportError(f"cannot create {final} (another export took it?): {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _drop_if_empty(model_dir, created)
        raise
    write_atomic(model_dir / "config.pbtxt", config.encode())
    return final


def _drop_if_empty(model_dir: Path, created: bool) -> None:
    if created and model_dir.is_dir() and not any(model_dir.iterdir()):
        model_dir.rmdir()
