"""`tessera-models` (`make models`): build the default model repository (idempotent, keyed by content)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tools.builders.blazeface import build_blazeface
from tools.builders.cli import Builder, builder_parser
from tools.builders.emotion_facex import build_facex
from tools.builders.emotion_pyemotion import build_pyemotion
from tools.builders.engagement_demo import build_engagement_demo
from tools.builders.fer_student import build_fer_student
from tools.builders.minilm import build_text_embedder
from tools.builders.proxylabel_demo import build_demo_models

# In build order: the proxylabel demo embeds its rows with the text embedder built before it.
BUILDERS: dict[str, Builder] = {
    "emotion": build_fer_student,
    # The face detectors both the emotion and the engagement service run (MediaPipe's BlazeFace).
    "detector": build_blazeface,
    # The pretrained ensemble's other two members (emotion mode ENSEMBLE, ensemble `pretrained`):
    # facex's MobileNetV2 (TFLite) and PyEmotion's CNN (a torch checkpoint), each converted
    # without TensorFlow or torch and proved against a numpy forward pass before it is written.
    "emotion_facex": build_facex,
    "emotion_pyemotion": build_pyemotion,
    "embedder": build_text_embedder,
    # The demo kNN index and MLP, named `demo` in every answer: trained on generated rows
    # embedded with the text embedder above (first build ~1-2 min on 2 cores, then cached).
    "proxylabel": build_demo_models,
    # The engagement demo boosters and temporal network, trained on generated clips (first build
    # ~30 s on 2 cores, then cached).
    "engagement": build_engagement_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = builder_parser(__doc__.splitlines()[0], prog="tessera-models")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BUILDERS),
        metavar="FAMILY",
        help=f"build only these ({', '.join(BUILDERS)}; default: all)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    built: list[Path] = []
    for name, build in BUILDERS.items():
        if args.only is None or name in args.only:
            result = build(args.repo, args.cache)
            built += result if isinstance(result, list) else [result]
    print(
        f"model repository {args.repo}: {', '.join(p.name for p in built)} ready "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
