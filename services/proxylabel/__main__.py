"""The proxylabel service's commands: `tessera-proxylabel` runs the service;
`tessera-score-shard-offline` scores a shard in process, without gRPC (modellers; the crash tests):

    tessera-score-shard-offline --repo model_repository in.parquet out_dir
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from services.fusion.rules import KnnRules, ProxyLabelRules
from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.pipeline import ProxyLabelPipeline, local_pipeline
from services.proxylabel.runner import ShardJobs
from services.proxylabel.servicer import SERVICE_NAME, ProxyLabelServicer
from services.proxylabel.shard_plan import ShardJob, plan_shard
from services.proxylabel.shard_run import DEFAULT_LOCK_EXPIRY_SECONDS, run_shard
from services.runtime.backends.onnx import OnnxBackend, OnnxConfig
from services.runtime.errors import ServingError
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.reloader import RepositoryPoller
from services.runtime.repository import ModelRepository
from services.runtime.server import Servicer
from services.runtime.streams import Drain
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc


class IndexWatcher:
    """Tells the poller when the kNN index's files changed: the ONNX backend does not own that
    entry. Runs after the backend's reload, whose rescan it reads."""

    def __init__(self, repository: ModelRepository, name: str) -> None:
        self.repository, self.name = repository, name
        self.seen = self._fingerprint()

    def _fingerprint(self) -> tuple:
        if self.name not in self.repository:
            return ()
        entry = self.repository.get(self.name)
        return (entry.fingerprint, entry.error)

    async def reload(self) -> list[str]:
        now = self._fingerprint()
        if now == self.seen:
            return []
        self.seen = now
        return [self.name]


async def build(config: ProxyLabelConfig, metrics: Metrics) -> App:
    # Shard jobs are tasks of the process, not of the calls that watch them; they stop with it.
    jobs = ShardJobs(config)
    drain = Drain(config.server.drain_streams_after_seconds)
    if not config.model_repository.is_dir():
        pipeline = ProxyLabelPipeline(config, None, metrics)
        return App(
            [
                Servicer(
                    SERVICE_NAME,
                    ProxyLabelServicer(config, pipeline, jobs, drain),
                    pb_grpc.add_ProxyLabelServiceServicer_to_server,
                )
            ],
            background=[jobs],
            drain=drain,
        )
    repository = ModelRepository(config.model_repository)
    # ONNX Runtime settings are the runtime's defaults until the service config grows an `onnx` section.
    ours = {config.mlp_model, config.embedder_model}  # the kNN index is the pipeline's own
    backend = OnnxBackend(
        repository, getattr(config, "onnx", OnnxConfig()), metrics, serves=ours.__contains__
    )
    await backend.start()
    pipeline = await ProxyLabelPipeline.load(config, repository, backend, metrics)
    servicer = ProxyLabelServicer(config, pipeline, jobs, drain)

    async def swap(changed: list[str]) -> None:
        # A new pipeline for new requests; a shard job keeps the one it was planned with.
        servicer.pipeline = await ProxyLabelPipeline.load(
            config, repository, backend, metrics, previous=servicer.pipeline
        )

    poller = RepositoryPoller(
        backend,
        config.repository_poll_seconds,
        on_change=swap,
        also=[IndexWatcher(repository, config.knn_model)],
    )

    # Jobs stop (releasing their locks) before cleanup closes the backend they score with.
    return App(
        [Servicer(SERVICE_NAME, servicer, pb_grpc.add_ProxyLabelServiceServicer_to_server)],
        cleanup=backend.close,
        background=[poller, jobs],
        drain=drain,
    )


def main() -> int:
    return run("proxylabel", ProxyLabelConfig, build)


def score_shard_offline_main(argv: list[str] | None = None) -> int:
    """`tessera-score-shard-offline`: one job in this process; its events as JSON lines on stdout."""
    p = argparse.ArgumentParser(prog="tessera-score-shard-offline", description="Score a shard in process.")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--mode", choices=("knn", "mlp", "ensemble"), default="ensemble")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--knn", default="{}", help='kNN overrides as JSON, e.g. {"k": 20, "weighting": "power"}')
    p.add_argument("--rules-version", default="cli")
    p.add_argument("--batch-rows", type=int, default=0)
    p.add_argument(
        "--lock-expiry-seconds",
        type=float,
        default=DEFAULT_LOCK_EXPIRY_SECONDS,
        help="a lock whose heartbeat is older than this is stale: its job may be taken over",
    )
    p.add_argument("--throttle-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    async def score() -> int:
        try:
            async with local_pipeline(args.repo, Metrics("proxylabel-cli")) as pipeline:
                rules = ProxyLabelRules(
                    mode=args.mode, alpha=args.alpha, knn=KnnRules.model_validate_json(args.knn)
                )
                job = ShardJob(
                    args.input.resolve(), args.output.resolve(), rules, args.rules_version, args.batch_rows
                )
                plan = plan_shard(job, pipeline)
                async for event in run_shard(
                    plan,
                    pipeline,
                    throttle_seconds=args.throttle_seconds,
                    lock_expiry_seconds=args.lock_expiry_seconds,
                ):
                    print(json.dumps({type(event).__name__.lower(): asdict(event)}), flush=True)
        except ServingError as exc:
            print(f"{exc.code.name}: {exc.message}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(score())


if __name__ == "__main__":
    sys.exit(main())
