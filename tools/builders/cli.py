"""The command line every model builder shares: `--repo`, `--cache`, timing."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path


def builder_main(build: Callable[[Path, Path], Path], description: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model_dir = build(args.repo, args.cache)
    print(f"{model_dir} ready in {time.perf_counter() - start:.2f}s")
    return 0
