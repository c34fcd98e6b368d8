"""Transport security: TLS (and mutual TLS) for every server, and for the gateway's channels.

Plaintext stays the local default (`make serve`); TLS is one config section. A server re-reads its
certificate and key when the files change (a rotated Kubernetes Secret is served without a
restart: the check runs at each new connection's handshake, at most once per `reload_seconds`).
With `client_ca_file`, clients must present a certificate signed by that CA (mTLS); the model
services use it to accept only the gateway.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc

from services.runtime.config import ChannelTls, ConfigError, ServerTls
from services.runtime.watched import WatchedFiles

log = logging.getLogger(__name__)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


class _Rotating:
    """The server's certificate configuration, re-read when its files change."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        paths = [tls.cert_file, tls.key_file, *([tls.client_ca_file] if tls.client_ca_file else [])]
        self.files = WatchedFiles(paths, tls.reload_seconds)
        self.files.take(self.files.stamp())

    def configuration(self) -> Any:
        t = self.tls
        ca = _read(t.client_ca_file) if t.client_ca_file else None
        return grpc.ssl_server_certificate_configuration(
            [(_read(t.key_file), _read(t.cert_file))], root_certificates=ca
        )

    def fetch(self) -> Any:
        """gRPC asks at each handshake: a new configuration when the files changed, else None."""
        stamp = self.files.poll()
        if stamp is None:
            return None
        try:
            config = self.configuration()
        except ValueError as exc:
            log.error("TLS files changed but cannot be read (%s); serving the previous certificate", exc)
            return None
        self.files.take(stamp)
        log.info("TLS certificate files changed: serving the new certificate on new connections")
        return config


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    rotating = _Rotating(tls)
    try:
        initial = rotating.configuration()
    except ValueError as exc:
        raise ConfigError(f"server.tls: {exc}") from None
    return grpc.dynamic_ssl_server_credentials(
        initial, rotating.fetch, require_client_authentication=tls.client_ca_file is not None
    )


def channel_credentials(tls: ChannelTls) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    """Credentials and channel options (the expected server name) for a TLS channel."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("a client certificate needs both cert_file and key_file")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca_file),
            private_key=_read(tls.key_file) if tls.key_file else None,
            certificate_chain=_read(tls.cert_file) if tls.cert_file else None,
        )
    except ValueError as exc:
        raise ConfigError(f"channel TLS: {exc}") from None
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return creds, options


def peer_names(context: grpc.aio.ServicerContext[Any, Any]) -> set[str]:
    """Names in the verified client certificate (common name and DNS SANs); empty without mTLS."""
    auth = context.auth_context() or {}
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names.update(v.decode(errors="replace") for v in auth.get(key, ()))
    return names
