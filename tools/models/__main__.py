"""`python -m tools.models`: build the default model repository (idempotent, keyed by content)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tools.models.fer_student import build_fer_student
from tools.models.minilm import build_text_embedder
from tools.proxylabel.demo import build_demo_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.models")
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    built = [build_fer_student(args.repo, args.cache), build_text_embedder(args.repo, args.cache)]
    # The demo kNN index and MLP, named `demo` in every answer: trained on generated rows
    # embedded with the text embedder above (first build ~1-2 min on 2 cores, then cached).
    built += build_demo_models(args.repo, args.cache)
    print(f"model repository {args.repo}: {', '.join(p.name for p in built)} ready "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
