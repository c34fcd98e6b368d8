"""Writing one exported version into the repository, whole or not at all (no torch here).

A version is filled in a hidden staging directory (the repository ignores non-numeric names),
checked against the config it will be served with, then renamed into place; versions are never
overwritten. Every exporter shares this, so a reader of the repository never sees half a model.
The config is a `ModelSpec` (or the `ModelConfig` it makes), written by
`services.runtime.model_files` once the version is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.model_files import ModelSpec, model_config, write_config
from services.runtime.repository import check_signature, onnx_signature


class ExportError(RuntimeError):
    """The export was refused; nothing was written to the repository."""


def next_version(model_dir: Path) -> int:
    existing = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(existing, default=0) + 1


def check_onnx_signature(config: mc.ModelConfig, staging: Path) -> None:
    """The staged model.onnx declares what the config says."""
    problems = check_signature(config, *onnx_signature(staging / "model.onnx"))
    if problems:
        raise ExportError("exported model disagrees with its config: " + "; ".join(problems))


def write_version(
    repo: Path,
    version: int | None,
    spec: ModelSpec | mc.ModelConfig,
    fill: Callable[[Path], None],
    check: Callable[[mc.ModelConfig, Path], None] = check_onnx_signature,
) -> Path:
    """`fill(staging)` writes the version's files (the model and what lies beside it); `check`
    holds them against the config `spec` describes (an ONNX model's signature by default), then
    they are renamed into `<repo>/<spec.name>/<version>` and the config is written. Returns the
    version directory."""
    config = spec if isinstance(spec, mc.ModelConfig) else model_config(spec)
    name = config.name
    model_dir = Path(repo) / name
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    final = model_dir / str(version)
    if final.exists():
        _drop_if_empty(model_dir, created)
        raise ExportError(
            f"{final} already exists: versions are never overwritten; "
            f"leave --version out to take the next one"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_dir))
    try:
        fill(staging)
        check(config, staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a server may run as another user
        try:
            os.rename(staging, final)
        except OSError as exc:
            raise ExportError(f"cannot create {final} (another export took it?): {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _drop_if_empty(model_dir, created)
        raise
    write_config(model_dir, config)
    return final


def _drop_if_empty(model_dir: Path, created: bool) -> None:
    if created and model_dir.is_dir() and not any(model_dir.iterdir()):
        model_dir.rmdir()
