"""The proxylabel demo models: a kNN index and a Fusion MLP trained at setup on a generated shard
embedded with the repository's MiniLM text embedder, flagged `demo` everywhere (docs/models.md).

Built once per content key (generator, builders, embedder build, size, seed) under
`<cache>/proxylabel_demo/<key>/` and copied into the repository, so `make models` is a copy after
the first time. Embedding the shard with MiniLM on CPU is most of the first build.

    python -m tools.builders.proxylabel_demo --repo model_repository --cache .cache
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.proxylabel import features, knn
from services.proxylabel.features import compute_features
from services.runtime import model_files
from tools.builders.cli import builder_parser, report_built
from tools.builders.install import install_built
from tools.modeller.proxylabel import build_index as build_index_module
from tools.modeller.proxylabel import fusion_mlp, generate, train_mlp
from tools.modeller.proxylabel.build_index import build_index, labelled_rows
from tools.modeller.proxylabel.generate import write_shard
from tools.modeller.proxylabel.train_mlp import train_mlp as fit_mlp
from tools.modeller.proxylabel.train_mlp import write_mlp

# Bump when the demo's recipe changes in a way the source hashes below do not show.
DEMO_VERSION = "1"
DEMO_ROWS = 2000
DEMO_SEED = 2026
EMBEDDER_MODEL = "text_embedder"
MODELS = (knn.MODEL_NAME, train_mlp.MODEL_NAME)

Embed = Callable[[list[str]], np.ndarray]


def _embedder_identity(embedder_dir: Path) -> tuple[str, int, str]:
    """(name, dimension, build identity) of the repository's text embedder."""
    version_dir = embedder_dir / "1"
    info = json.loads((version_dir / "embedder.json").read_text())
    key_file = version_dir / ".build-key"
    identity = (
        key_file.read_text()
        if key_file.is_file()
        else hashlib.sha256((version_dir / "model.onnx").read_bytes()).hexdigest()
    )
    return str(info["name"]), int(info["dimension"]), identity


def _content_key(embedder: str, rows: int, seed: int) -> str:
    h = hashlib.sha256(f"{DEMO_VERSION}|{rows}|{seed}|{embedder}".encode())
    for module in (generate, build_index_module, train_mlp, fusion_mlp, model_files, features, knn):
        h.update(Path(module.__file__).read_bytes())  # type: ignore[arg-type]
    return h.hexdigest()[:16]


def build_demo_models(
    repo: Path, cache: Path, embed: Embed | None = None, *, rows: int = DEMO_ROWS, seed: int = DEMO_SEED
) -> list[Path]:
    """Write `<repo>/proxylabel_knn/` and `<repo>/proxylabel_mlp/`; returns their directories.

    `embed` (texts → embeddings) defaults to ONNX Runtime on `<repo>/text_embedder/`, which is
    built first when absent.
    """
    repo, cache = Path(repo), Path(cache)
    embedder_dir = repo / EMBEDDER_MODEL
    if not (embedder_dir / "1" / "embedder.json").is_file():
        from tools.builders.minilm import build_text_embedder

        build_text_embedder(repo, cache)
    name, dimension, identity = _embedder_identity(embedder_dir)
    if embed is None:
        from services.proxylabel.embedder import embed_offline

        def embed(texts: list[str]) -> np.ndarray:
            return embed_offline(embedder_dir, texts)

    key = _content_key(f"{name}|{dimension}|{identity}", rows, seed)
    built = cache / "proxylabel_demo" / key
    if not (built / ".complete").is_file():
        work = built.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        shard = write_shard(
            work / "demo.parquet",
            rows,
            dimension=dimension,
            labelled_fraction=1.0,
            seed=seed,
            row_group_rows=500,
            embed=embed,
            embedder_name=name,
            id_prefix="demo",
        )
        build_index([shard], work / "repo", knn.KnnOptions(), demo=True)
        labelled = labelled_rows([shard])
        model, meta = fit_mlp(
            labelled.embeddings,
            compute_features(labelled.conversations),
            labelled.labels,
            labelled.embedder,
            hidden=(128,),
            seed=seed,
            demo=True,
        )
        write_mlp(work / "repo", model, meta)
        (work / ".complete").write_text(key)
        shutil.rmtree(built, ignore_errors=True)
        os.replace(work, built)
    repo.mkdir(parents=True, exist_ok=True)
    for model_name in MODELS:
        install_built(built / "repo" / model_name, repo, key)
    return [repo / m for m in MODELS]


def main(argv: list[str] | None = None) -> int:
    p = builder_parser(__doc__.splitlines()[0], prog="python -m tools.builders.proxylabel_demo")
    p.add_argument("--rows", type=int, default=DEMO_ROWS)
    args = p.parse_args(argv)
    started = time.perf_counter()
    report_built(build_demo_models(args.repo, args.cache, rows=args.rows), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
