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
    output_roots: list[Path] = Field(
        default_factory=lambda: [Path("data")],
        description="Shard jobs write only under these; ListShardJobs lists the jobs indexed under them.",
    )
    job_lock_expiry_seconds: float = Field(
        30.0,
        gt=0,
        description="A shard job's lock whose heartbeat is older than this is stale: the job's "
        "owner is taken for dead and the next ScoreShard of the same job takes it over. The owner refreshes "
        "the heartbeat every third of this; clocks of replicas sharing the volume must agree well within it.",
    )
    job_poll_seconds: float = Field(
        1.0,
        gt=0,
        description="How often a ScoreShard stream watching a job that another process runs reads "
        "the job's manifest for progress.",
    )
