"""Configuration of the proxylabel service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.config import ServiceConfig


class ProxyLabelConfig(ServiceConfig):
    knn_model: str = "proxylabel_knn"
    mlp_model: str = "proxylabel_mlp"
    embedder_model: str = "text_embedder"
    max_rows_per_request: int = Field(4096, gt=0)
    max_text_chars: int = Field(200_000, gt=0)
    # Shard jobs may read and write only under these directories (symlinks resolved).
    input_roots: list[Path] = Field(default_factory=lambda: [Path("data")])
    output_roots: list[Path] = Field(default_factory=lambda: [Path("data")])
