"""Installing a model directory built in the cache into the repository (the demo builders)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KEY_FILE = ".demo-key"


def install_built(built: Path, repo: Path, key: str) -> None:
    """Copy `built` (a whole model directory) to `<repo>/<built.name>`, swapped in by rename, and
    mark it with its content key; nothing happens when the same key is installed already."""
    target = repo / built.name
    marker = target / KEY_FILE
    # The marker alone is not enough: a fresh clone has the committed config but no version.
    if marker.is_file() and marker.read_text() == key and (target / "1").is_dir():
        return
    staging = repo / f".{built.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(built, staging)
    (staging / KEY_FILE).write_text(key)
    old = repo / f".{built.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
