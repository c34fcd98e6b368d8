"""Who may call what: bearer tokens with scopes, and mTLS peers, for every process.

Tokens come from the config (`tokens`: all scopes) and from a file (a Kubernetes Secret) that is
re-read when it changes: either one token per line (all scopes), or YAML
`tokens: [{token, name, scopes: [...], rate_per_second}]`. Each RPC needs one scope
(`method_scopes`, else `default_scope`); `admin` holds every scope. A peer whose verified client
certificate (mTLS) names one of `trusted_peers` is let in with every scope: that is how the model
services accept only the gateway. Health is always open; reflection only with `open_reflection`
or the `reflection` scope. The caller's identity is kept for the call (`current_identity`), e.g. to
own shard jobs. With no tokens and no trusted peers configured, the process is open.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from pydantic import ValidationError

from services.runtime.config import (
    ALL_SCOPES,
    REFLECTION_SCOPE,
    AuthConfig,
    TokenEntry,
    TokenFile,
    describe_validation_error,
)
from services.runtime.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from services.runtime.security import peer_names
from services.runtime.watched import Stamp, WatchedFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return ALL_SCOPES in self.scopes or scope in self.scopes


_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("identity", default=None)


def current_identity() -> Identity | None:
    """The authenticated caller of the running call (None when the process is open)."""
    return _identity.get()


@dataclass
class _Bucket:
    rate: float
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class TokenStore:
    """The accepted tokens, re-read from the file when it changes (a bad file keeps the old set)."""

    def __init__(self, config: AuthConfig, recheck_seconds: float = 1.0) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.file = WatchedFiles([config.token_file] if config.token_file else [], recheck_seconds)
        self._entries: list[TokenEntry] = []
        self._buckets: dict[str, _Bucket] = {}
        self._load(self.file.stamp(), first=True)

    def _parse(self, text: str) -> list[TokenEntry]:
        loaded = yaml.safe_load(text) if text.strip() else None
        if isinstance(loaded, dict):
            try:
                return TokenFile.model_validate(loaded).tokens
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc)) from None
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return [TokenEntry(token=t, name=f"token-{i + 1}") for i, t in enumerate(lines)]

    def _load(self, stamp: Stamp, first: bool = False) -> None:
        self.file.take(stamp)  # a bad file is not read again until it changes
        entries = [TokenEntry(token=t, name=f"config-{i + 1}") for i, t in enumerate(self.config.tokens)]
        if self.config.token_file is not None:
            try:
                entries += self._parse(self.config.token_file.read_text())
            except (OSError, yaml.YAMLError, ValueError) as exc:
                if first:
                    raise ValueError(f"token file {self.config.token_file}: {exc}") from None
                log.error(
                    "token file %s changed but is invalid (%s); keeping the previous tokens",
                    self.config.token_file,
                    exc,
                )
                return
        self._entries = entries
        self._buckets = {
            e.name: _Bucket(e.rate_per_second, max(e.rate_per_second, 1.0))
            for e in entries
            if e.rate_per_second is not None
        }
        if not first:
            log.info("token file re-read: %d tokens", len(entries))

    def find(self, token: str) -> TokenEntry | None:
        with self._lock:
            stamp = self.file.poll()
            if stamp is not None:
                self._load(stamp)
            entries = self._entries
        given = token.encode()
        # compare_digest against every entry: no timing side channel on the token.
        found = [e for e in entries if hmac.compare_digest(given, e.token.encode())]
        return found[0] if found else None

    def within_rate(self, name: str) -> bool:
        bucket = self._buckets.get(name)
        with self._lock:
            return bucket is None or bucket.take()

    @property
    def empty(self) -> bool:
        return not self._entries and self.config.token_file is None


class Authorizer:
    """The check the server interceptor runs before every call (health excepted)."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.tokens = TokenStore(config)
        self.trusted = set(config.trusted_peers)

    @property
    def open(self) -> bool:
        return self.tokens.empty and not self.trusted

    def scope_of(self, method: str, reflection: bool = False) -> str | None:
        if reflection:
            return None if self.config.open_reflection else REFLECTION_SCOPE
        return self.config.method_scopes.get(method, self.config.default_scope)

    def check(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, reflection: bool = False
    ) -> Identity | None:
        """The caller's identity, or Unauthenticated / PermissionDenied / ResourceExhausted."""
        scope = self.scope_of(method, reflection)
        if self.open or scope is None:
            return None
        if self.trusted:
            names = peer_names(context) & self.trusted
            if names:
                identity = Identity(sorted(names)[0], frozenset({ALL_SCOPES}))
                _identity.set(identity)
                return identity
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        entry = self.tokens.find(token) if scheme.lower() == "bearer" and token else None
        if entry is None:
            raise Unauthenticated("missing or invalid bearer token in the 'authorization' metadata")
        identity = Identity(entry.name, frozenset(entry.scopes))
        if not identity.allows(scope):
            raise PermissionDenied(
                f"{method} needs the '{scope}' scope; the token of {entry.name} has "
                f"{', '.join(sorted(entry.scopes))}"
            )
        if not self.tokens.within_rate(entry.name):
            raise ResourceExhausted(
                f"rate limit of {entry.name} ({entry.rate_per_second}/s) reached; retry later"
            )
        _identity.set(identity)
        return identity


class FileSecret:
    """A secret kept in a file (e.g. the gateway's token for the services), re-read when it changes."""

    def __init__(self, path: Path, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self.file = WatchedFiles([path], recheck_seconds)
        self._value = ""
        self.value()
        if not self._value:
            raise ValueError(f"secret file {path} is missing or empty")

    def value(self) -> str:
        stamp = self.file.poll()
        if stamp is not None:
            try:
                self._value = self.path.read_text().strip()
                self.file.take(stamp)
            except OSError as exc:  # offered again at the next look
                log.error("cannot read secret file %s (%s); keeping the previous value", self.path, exc)
        return self._value
