"""Prometheus metrics of one process, on a registry it owns (no module-level globals).

Names follow Prometheus conventions: seconds, ``_total`` counters, histogram buckets from 0.5 ms
to 10 s. Labels: ``service`` is the gRPC service (e.g. ``tessera.gateway.v1.GatewayService``),
``method`` the RPC name, ``code`` the gRPC status name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

STAGES = ("decode", "detect", "preprocess", "queue", "infer", "fuse", "postprocess")


class Metrics:
    """Every metric a process exports. Create one per process (tests: one per server)."""

    def __init__(self, process: str, registry: CollectorRegistry | None = None) -> None:
        self.process = process
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "tessera_request_duration_seconds",
            "gRPC request duration as the server saw it.",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "tessera_requests_in_flight", "gRPC requests being handled.", ["service", "method"], registry=r
        )
        self.request_errors = Counter(
            "tessera_request_errors_total",
            "gRPC requests that ended with a non-OK status.",
            ["service", "method", "code"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "tessera_stage_duration_seconds",
            "Time spent in one stage of a request pipeline.",
            ["stage", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "tessera_model_inference_seconds",
            "Model execution time per batch.",
            ["model", "version", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tessera_batch_size", "Items per model execution.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.rows_scored = Counter(
            "tessera_shard_rows_scored_total", "Rows written by shard jobs.", registry=r
        )
        self.rows_per_second = Gauge(
            "tessera_shard_rows_per_second", "Throughput of the running shard job.", registry=r
        )
        self.rules_version = Gauge(
            "tessera_fusion_rules_info",
            "Fusion rules in force (value 1, version in the label).",
            ["version"],
            registry=r,
        )
        self.rules_reload_errors = Counter(
            "tessera_fusion_rules_reload_errors_total", "Rules files rejected at reload.", registry=r
        )
        self.decoder_warnings = Counter(
            "tessera_decoder_warnings_total",
            "Warnings image decoders (libpng, libjpeg) printed; the image's "
            "own answer already reports a bad image.",
            ["library"],
            registry=r,
        )
        self.admission_rejected = Counter(
            "tessera_admission_rejected_total",
            "Calls refused before running: gate full (RESOURCE_EXHAUSTED) "
            "or deadline passed or unmeetable while queued (DEADLINE_EXCEEDED).",
            ["method", "reason"],
            registry=r,
        )
        self.admission_queued = Gauge(
            "tessera_admission_queued",
            "Calls waiting for a slot, per gate (unary, stream, or a method).",
            ["gate"],
            registry=r,
        )
        self.http_port: int | None = None
        self._http_server: WSGIServer | None = None

    @contextmanager
    def stage(self, stage: str, model: str = "") -> Iterator[None]:
        """Time one pipeline stage."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_duration.labels(stage, model).observe(time.perf_counter() - start)

    def set_rules_version(self, version: str) -> None:
        self.rules_version.clear()
        self.rules_version.labels(version).set(1)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        self.http_port = server.server_port
        return self.http_port

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
