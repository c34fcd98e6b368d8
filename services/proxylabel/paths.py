"""Shard paths: confined to the configured roots, and shown relative to them.

A path a caller gives is resolved (symlinks followed) and must lie under one of the roots. Every
problem with it is INVALID_ARGUMENT with a message that says what is wrong (empty, a NUL byte,
outside the roots, a name too long, a symlink loop, a parent that is not a directory, no
permission), except a shard that does not exist (NOT_FOUND).

Messages never show the server's absolute paths: a path under a root is shown as
`input_roots[0]/shards/x.parquet` (the root's place in the configuration, then the path below
it); a path under no root by its last name only.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from services.runtime.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

INPUT_ROOTS, OUTPUT_ROOTS = "input_roots", "output_roots"
_SHOWN_CHARS = 120  # a longer shown path is cut in the middle


def _cut(text: str) -> str:
    if len(text) <= _SHOWN_CHARS:
        return text
    half = _SHOWN_CHARS // 2 - 2
    return f"{text[:half]}…({len(text)} characters)…{text[-half:]}"


def _root(root: Path) -> Path:
    try:
        return root.resolve()
    except (OSError, RuntimeError):  # a broken root: it holds nothing
        return root.absolute()


def relative(path: Path, roots: Sequence[Path]) -> tuple[int, PurePosixPath] | None:
    """(index of the root that holds `path`, the path below it), or None."""
    for i, root in enumerate(roots):
        resolved = _root(root)
        if path == resolved or path.is_relative_to(resolved):
            return i, PurePosixPath(path.relative_to(resolved).as_posix())
    return None


def shown(path: Path, roots: Sequence[Path], kind: str) -> str:
    """How messages name a server path: `<kind>[i]/<below the root>`, never absolute; a path
    under no root by its last name."""
    found = relative(path, roots)
    if found is None:
        return _cut(path.name)
    i, below = found
    return _cut(f"{kind}[{i}]" if str(below) == "." else f"{kind}[{i}]/{below}")


def _given(path: str) -> str:
    """A caller's path as messages may echo it: its last name only (the rest may be absolute)."""
    return _cut(PurePosixPath(path).name or path.strip("/") or path)


def _problem(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "a name in it is too long (or the whole path is)"
    if exc.errno == errno.ELOOP:
        return "it runs into a symlink loop"
    if exc.errno == errno.ENOTDIR:
        return "a part of it that should be a directory is not one"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "the proxylabel service may not access it"
    return (exc.strerror or type(exc).__name__).lower()


def confine(path: str, roots: Sequence[Path], what: str, kind: str) -> Path:
    """The resolved path, if it lies under one of the roots (symlinks resolved on both sides)."""
    if not path:
        raise InvalidArgument(f"{what} is empty")
    if "\x00" in path:
        raise InvalidArgument(f"{what} contains a NUL byte")
    try:
        resolved = Path(path).resolve()
    except RuntimeError:  # pathlib's report of a symlink loop
        raise InvalidArgument(f"{what} {_given(path)!r} is not usable: it runs into a symlink loop") from None
    except (OSError, ValueError) as exc:
        problem = _problem(exc) if isinstance(exc, OSError) else str(exc)
        raise InvalidArgument(f"{what} {_given(path)!r} is not usable: {problem}") from None
    if relative(resolved, roots) is None:
        log.info("%s %s (resolved %s) is outside the %s", what, path, resolved, kind)
        raise InvalidArgument(
            f"{what} {_given(path)!r} is outside the proxylabel service's {kind} "
            f"({len(roots)} configured); give a path under one of them"
        )
    return resolved


def _stat(path: Path, what: str, roots: Sequence[Path], kind: str) -> os.stat_result | None:
    """The path's stat (symlinks followed); None when it does not exist; INVALID_ARGUMENT for
    any other problem (a name too long, a symlink loop, a parent that is a file, no permission)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidArgument(f"{what} {shown(path, roots, kind)!r} is not usable: {_problem(exc)}") from None


def check_input(resolved: Path, roots: Sequence[Path], what: str = "input_path") -> Path:
    """A confined shard path: an existing regular file that can be opened (NOT_FOUND when it does
    not exist)."""
    st = _stat(resolved, what, roots, INPUT_ROOTS)
    name = shown(resolved, roots, INPUT_ROOTS)
    if st is None:
        raise NotFound(f"shard {name!r} does not exist")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{what} {name!r} is not a file")
    try:
        with open(resolved, "rb"):
            pass
    except OSError as exc:
        raise InvalidArgument(f"{what} {name!r} is not usable: {_problem(exc)}") from None
    return resolved


def check_output(resolved: Path, roots: Sequence[Path], what: str = "output_path") -> Path:
    """A confined output directory: a directory, or not there yet with its nearest existing
    ancestor a directory. Nothing is created here."""
    st = _stat(resolved, what, roots, OUTPUT_ROOTS)
    name = shown(resolved, roots, OUTPUT_ROOTS)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what} {name!r} exists and is not a directory")
        return resolved
    for parent in resolved.parents:
        pst = _stat(parent, what, roots, OUTPUT_ROOTS)
        if pst is None:
            continue
        if not stat.S_ISDIR(pst.st_mode):
            raise InvalidArgument(
                f"{what} {name!r} is not usable: {shown(parent, roots, OUTPUT_ROOTS)!r} is not a directory"
            )
        break
    # Names the directory would get that the file system refuses (checked without creating it).
    for part in resolved.parts:
        if len(os.fsencode(part)) > 255:
            raise InvalidArgument(
                f"{what} {name!r} is not usable: {_problem(OSError(errno.ENAMETOOLONG, ''))}"
            )
    return resolved


def confine_input(path: str, roots: Sequence[Path], what: str = "input_path") -> Path:
    """A shard to read: under the input roots, an existing regular file."""
    return check_input(confine(path, roots, what, INPUT_ROOTS), roots, what)


def confine_output(path: str, roots: Sequence[Path], what: str = "output_path") -> Path:
    """An output directory: under the output roots, a directory or not there yet."""
    return check_output(confine(path, roots, what, OUTPUT_ROOTS), roots, what)
