"""A model directory built once per content key: `<repo>/<model>/1/.build-key` says from what.

The key names everything a build read (the source's digest, the converter's version, the pinned
wheel). A directory that holds the same key, its config and every file the build writes is not
built again. The key is removed first and written last, so an interrupted build is redone rather
than trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.model_files import ModelSpec, write_atomic, write_config
from services.runtime.repository import CONFIG_FILE

KEY_FILE = ".build-key"
VERSION = "1"


def is_built(model_dir: Path, key: str, files: Iterable[str]) -> bool:
    """Whether `model_dir` was built with `key` and still holds its config and `files` (in version 1)."""
    version_dir = Path(model_dir) / VERSION
    key_file = version_dir / KEY_FILE
    return (
        key_file.is_file()
        and key_file.read_text() == key
        and (Path(model_dir) / CONFIG_FILE).is_file()
        and all((version_dir / name).is_file() for name in files)
    )


def write_built(
    model_dir: Path, key: str, spec: ModelSpec | mc.ModelConfig, files: Mapping[str, bytes | str]
) -> Path:
    """Write `files` into version 1, then the config for `spec`, then `key`; returns `model_dir`."""
    version_dir = Path(model_dir) / VERSION
    (version_dir / KEY_FILE).unlink(missing_ok=True)  # a half-rewritten directory must not pass as built
    for name, data in files.items():
        write_atomic(version_dir / name, data)
    write_config(model_dir, spec)
    write_atomic(version_dir / KEY_FILE, key)
    return Path(model_dir)
