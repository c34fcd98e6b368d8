"""The command line every model builder shares: `--repo`, `--cache`, what was built and how fast.

python -m tools.builders.<builder> --repo model_repository --cache .cache
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

Built = Path | list[Path]
Builder = Callable[[Path, Path], Built]


class BuilderMain(Protocol):
    def __call__(self, argv: list[str] | None = None) -> int: ...


def builder_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the repository and cache options every builder takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    return parser


def report_built(built: Built, started: float) -> None:
    """Print the model directories a build wrote and the seconds since `started` (perf_counter)."""
    dirs = built if isinstance(built, list) else [built]
    print(f"{', '.join(str(d) for d in dirs)} ready in {time.perf_counter() - started:.2f}s")


def builder_main(build: Builder, description: str, argv: list[str] | None = None) -> int:
    args = builder_parser(description).parse_args(argv)
    started = time.perf_counter()
    report_built(build(args.repo, args.cache), started)
    return 0


def builder_cli(build: Builder, doc: str) -> BuilderMain:
    """The `main(argv)` of a builder module: `build` under the first line of the module's `doc`."""

    def main(argv: list[str] | None = None) -> int:
        return builder_main(build, doc.splitlines()[0], argv)

    return main
