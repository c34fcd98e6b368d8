"""Configuration of the gateway."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.config import ChannelTls, ProcessConfig, StrictModel


class Targets(StrictModel):
    """gRPC targets of the model services (any gRPC target string: host:port, dns:///name:port)."""

    emotion: str = "127.0.0.1:50061"
    engagement: str = "127.0.0.1:50062"
    proxylabel: str = "127.0.0.1:50063"


class Deadlines(StrictModel):
    """Seconds a downstream call may take when the caller set no (shorter) deadline."""

    unary: float = Field(30.0, gt=0)
    stream: float | None = Field(
        None,
        gt=0,
        description="Cap on streams (live video, clips, shard watches); null: as long as the caller "
        "wants (a lecture lasts 45 minutes, a school day six hours).",
    )
    status: float = Field(2.0, gt=0)


class Reconnect(StrictModel):
    """How fast the gateway's channels reconnect to a service that went away (gRPC connect backoff)."""

    initial_backoff_ms: int = Field(100, gt=0)
    max_backoff_ms: int = Field(
        1_000, gt=0, description="gRPC's own default is 120 s: far too slow for a restarted local service."
    )
    min_connect_timeout_ms: int = Field(1_000, gt=0)


class RetryPolicy(StrictModel):
    """Retries of UNAVAILABLE, in the channel's service config (gRPC does them, transparently)."""

    max_attempts: int = Field(3, ge=2, le=5)
    initial_backoff_seconds: float = Field(0.05, gt=0)
    max_backoff_seconds: float = Field(1.0, gt=0)
    backoff_multiplier: float = Field(2.0, ge=1)


class Downstream(StrictModel):
    """How the gateway reaches the model services: TLS or mTLS, and the token it shows them."""

    tls: ChannelTls | None = Field(None, description="null: plaintext (local runs).")
    token_file: Path | None = Field(
        None,
        description="A bearer token the services accept (re-read when it changes); not needed with mTLS "
        "when the services trust the gateway's certificate.",
    )


class GatewayConfig(ProcessConfig):
    targets: Targets = Targets()
    rules_path: Path = Path("config/fusion_rules.yaml")
    deadlines: Deadlines = Deadlines()
    retry: RetryPolicy = RetryPolicy()
    reconnect: Reconnect = Reconnect()
    downstream: Downstream = Downstream()
    health_poll_seconds: float = Field(2.0, gt=0)
    max_images_per_request: int = Field(32, gt=0)
    max_rows_per_request: int = Field(4096, gt=0)
    live_frames_in_flight: int = Field(
        32,
        gt=0,
        description="Frames of a live stream relayed to the engagement service and not yet answered "
        "(the gateway keeps each until its answer comes); at the bound it reads no more of the caller's frames, "
        "so a caller that stops reading its answers is held back by flow control, not buffered.",
    )
