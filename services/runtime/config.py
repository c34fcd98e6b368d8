"""Validated configuration: one loader, one documented order of precedence.

Order (later wins): model defaults < YAML file < environment < explicit overrides (CLI flags).
Environment variables are named ``TESSERA_<PROCESS>__<SECTION>__<KEY>`` (e.g.
``TESSERA_EMOTION__SERVER__PORT=50051``); values are parsed as YAML scalars. Unknown keys, in the
file or the environment, are errors that name the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "TESSERA_"
MIB = 1024 * 1024


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Limit(StrictModel):
    max_concurrent: int | None = Field(None, gt=0, description="Calls running at once; null: no bound.")
    max_queued: int = Field(
        0, ge=0, description="Calls waiting for a slot; beyond, RESOURCE_EXHAUSTED at once."
    )


class AdmissionConfig(StrictModel):
    unary: Limit = Field(
        Limit(max_concurrent=64, max_queued=128),
        description="Every unary call of the process "
        "(the model services default to 8 running, 32 waiting: their calls are CPU-bound).",
    )
    streams: Limit = Field(
        Limit(max_concurrent=256, max_queued=0),
        description="Calls that stream requests or answers (live video, clips, shard jobs).",
    )
    methods: dict[str, Limit] = Field(
        default_factory=dict, description="A gate of its own for these RPC names (e.g. ClassifyEmotion)."
    )
    exempt: list[str] = Field(
        ["GetStatus", "ListModels", "GetShardJob", "ListShardJobs"],
        description="RPC names that are never held back (operators must see an overloaded process).",
    )
    early_drop: bool = Field(
        True,
        description="Drop a queued call whose remaining deadline is shorter than the "
        "method's typical run (an average of its recent successful calls).",
    )


class ServerTls(StrictModel):
    cert_file: Path = Field(description="PEM certificate chain the server presents.")
    key_file: Path = Field(description="PEM private key of that certificate.")
    client_ca_file: Path | None = Field(
        None, description="Require client certificates signed by this CA (mutual TLS); null: any client."
    )
    reload_seconds: float = Field(
        5.0, gt=0, description="How often, at most, the files are checked for a change."
    )


class ChannelTls(StrictModel):
    ca_file: Path = Field(description="CA that signed the server's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS (with key_file).")
    key_file: Path | None = None
    server_name: str | None = Field(
        None,
        description="Name expected in the server's certificate, when the target's host differs "
        "(e.g. an IP address, or a Kubernetes Service name the certificate does not carry).",
    )


class ServerConfig(StrictModel):
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        0, ge=0, le=65535, description="Port of the /metrics HTTP server; 0 picks one, null disables."
    )
    max_receive_message_bytes: int = Field(64 * MIB, gt=0)
    max_send_message_bytes: int = Field(64 * MIB, gt=0)
    grace_seconds: float = Field(10.0, ge=0, description="Drain time for in-flight calls on SIGTERM.")
    keepalive_time_ms: int = Field(30_000, gt=0)
    keepalive_timeout_ms: int = Field(10_000, gt=0)
    max_concurrent_rpcs: int | None = Field(None, gt=0)
    max_connection_age_ms: int | None = Field(
        300_000,
        gt=0,
        description="Clients reconnect (and re-resolve DNS) after this, so new replicas get traffic.",
    )
    max_connection_age_grace_ms: int | None = Field(
        None,
        ge=0,
        description="How long calls in flight on an aged connection may go on; null: as long as they "
        "last (an hour-long live stream must not be cut by connection ageing; new calls go to a new connection).",
    )
    drain_streams_after_seconds: float = Field(
        1.0,
        ge=0,
        description="On SIGTERM, long-lived streams end with UNAVAILABLE (saying so) this long after the "
        "drain starts, so callers resume elsewhere; unary calls get the whole grace_seconds.",
    )
    tls: ServerTls | None = Field(None, description="Serve TLS (mTLS with client_ca_file); null: plaintext.")
    admission: AdmissionConfig = Field(
        AdmissionConfig(),
        description="Bounds on calls running and waiting: "
        "overload is answered at once (services.runtime.admission).",
    )
    ready_file: Path | None = Field(
        None, description="Written (JSON: ports, pid) once the server is SERVING; for launchers and tests."
    )


class LoggingConfig(StrictModel):
    level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    json_format: bool = False


ALL_SCOPES = "admin"
REFLECTION_SCOPE = "reflection"

# The public API's scopes; a model service's RPCs fall to `default_scope`.
GATEWAY_SCOPES = {
    "ClassifyEmotion": "classify",
    "ScoreTexts": "classify",
    "ScoreClip": "stream",
    "StreamVideo": "stream",
    "ScoreShard": "shard",
    "GetShardJob": "shard",
    "ListShardJobs": "shard",
    "CancelShardJob": "shard",
    "GetStatus": "status",
}


class TokenEntry(StrictModel):
    token: str = Field(min_length=1)
    name: str = Field(min_length=1, description="Who holds it: in logs, and the owner of its shard jobs.")
    scopes: list[str] = Field([ALL_SCOPES], min_length=1)
    rate_per_second: float | None = Field(
        None, gt=0, description="Calls per second allowed (burst: one second's)."
    )


class TokenFile(StrictModel):
    tokens: list[TokenEntry]


class AuthConfig(StrictModel):
    """Bearer tokens accepted in the `authorization` metadata; none and no trusted peers = open."""

    tokens: list[str] = Field(
        default_factory=list, description="Tokens with every scope (small setups, tests)."
    )
    token_file: Path | None = Field(
        None, description="Token file, re-read when it changes (one per line, or YAML)."
    )
    method_scopes: dict[str, str] = Field(default_factory=lambda: dict(GATEWAY_SCOPES))
    default_scope: str = Field("internal", description="Scope of RPCs not in method_scopes.")
    trusted_peers: list[str] = Field(
        default_factory=list,
        description="Client-certificate names (CN or DNS SAN) let in with every scope (mTLS).",
    )
    open_reflection: bool = Field(False, description="Serve gRPC reflection without a token.")


class ProcessConfig(StrictModel):
    """What every process has; each service and the gateway extend it."""

    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    auth: AuthConfig = AuthConfig()


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


C = TypeVar("C", bound=StrictModel)
M = TypeVar("M", bound=BaseModel)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {key} is not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(process: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The overrides that environment variables give for one process, as a nested dict."""
    environ = os.environ if environ is None else environ
    prefix = f"{ENV_PREFIX}{process.upper()}__"
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(prefix):
            continue
        path = [part.lower() for part in name[len(prefix) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty key segment")
        _set_path(tree, path, yaml.safe_load(raw) if raw != "" else None)
    return tree


def describe_validation_error(err: ValidationError, prefix: Sequence[str] = ()) -> str:
    """Every problem of a pydantic validation, naming the keys as the file spells them
    (`prefix` first, for a section validated on its own): "unknown key 'a.b'; 'a.c': <why>"."""
    problems = []
    for e in err.errors():
        key = ".".join([*prefix, *(str(p) for p in e["loc"])]) or "<root>"
        problems.append(f"unknown key '{key}'" if e["type"] == "extra_forbidden" else f"'{key}': {e['msg']}")
    return "; ".join(problems)


def load_json_model(model: type[M], path: str | Path, what: str) -> M:
    """A JSON file (a model's stored parameters) validated as `model`; ConfigError messages name
    `what` and the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConfigError(f"{what} {path} are not valid JSON: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid {what} {path}: {describe_validation_error(exc)}") from None


def load_config(
    model: type[C],
    process: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Load and validate one process's configuration; raises ConfigError naming bad keys."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    env = env_overrides(process, environ)
    if env:
        source += " + environment"
    # Start from the model's own defaults, so a partial section (one key of `server.admission`)
    # keeps the sibling defaults of its class (a service's admission bounds differ from the gateway's).
    data = _deep_merge(_deep_merge(_deep_merge(model().model_dump(), data), env), overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration ({source}): {describe_validation_error(exc)}") from None


# A model service's unary calls are CPU-bound: a few at once keep both cores busy, more only wait
# (holding their decoded images) and finish late together.
SERVICE_SERVER = ServerConfig(admission=AdmissionConfig(unary=Limit(max_concurrent=8, max_queued=32)))


class ServiceConfig(ProcessConfig):
    """What every model service has beyond a process: the model repository it serves from."""

    server: ServerConfig = SERVICE_SERVER

    model_repository: Path = Field(Path("model_repository"), description="Triton-layout model repository.")
    repository_poll_seconds: float | None = Field(
        5.0, gt=0, description="How often to look for new model versions (hot swap); null: never."
    )
