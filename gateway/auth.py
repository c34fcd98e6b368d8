"""Bearer-token check for the gateway's public API."""

from __future__ import annotations

import hmac

import grpc

from gateway.config import AuthConfig
from services.runtime.errors import Unauthenticated
from services.runtime.interceptors import Authenticator


def load_tokens(config: AuthConfig) -> list[str]:
    tokens = list(config.tokens)
    if config.token_file is not None:
        tokens += [line.strip() for line in config.token_file.read_text().splitlines() if line.strip()]
    return tokens


def bearer_authenticator(tokens: list[str]) -> Authenticator | None:
    """None when no tokens are configured (open gateway, e.g. behind a mesh that authenticates)."""
    if not tokens:
        return None
    accepted = [t.encode() for t in tokens]

    def authenticate(context: grpc.aio.ServicerContext) -> None:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: no timing side channel on the token.
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), t) for t in accepted):
            raise Unauthenticated("missing or invalid bearer token in the 'authorization' metadata")

    return authenticate
