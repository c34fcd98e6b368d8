"""Confinement of shard paths to configured roots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from services.runtime.errors import InvalidArgument


def confine(path: str, roots: Sequence[Path], what: str) -> Path:
    """The resolved path, if it lies under one of the roots (symlinks resolved on both sides)."""
    if not path:
        raise InvalidArgument(f"{what} is empty")
    if "\x00" in path:
        raise InvalidArgument(f"{what} contains a NUL byte")
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise InvalidArgument(f"{what} {path!r} is outside the allowed roots: {allowed}")
