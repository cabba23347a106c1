"""Bearer-token authentication: each token belongs to a tenant."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc

from .errors import Unauthenticated

TOKENS_ENV = "LOSSD_AUTH_TOKENS"
NO_TENANT = ""  # the tenant of every call when authentication is off


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """`TOKEN TENANT` pairs, one per line (or separated by commas); '#' starts a comment."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{source}, entry {number}: expected 'TOKEN TENANT', got {len(parts)} field(s)"
            )
        token, tenant = parts
        tokens[token] = tenant
    if not tokens:
        raise ValueError(f"{source}: no tokens")
    return tokens


def load_tokens(path: str | None) -> dict[str, str] | None:
    """Tokens from `path`, else from $LOSSD_AUTH_TOKENS; None when neither is set."""
    if path:
        return parse_tokens(Path(path).read_text(), path)
    if os.environ.get(TOKENS_ENV):
        return parse_tokens(os.environ[TOKENS_ENV], f"${TOKENS_ENV}")
    return None


class Authenticator:
    """Maps a call's `authorization: Bearer TOKEN` metadata to its tenant.

    Without tokens, authentication is off and every call belongs to one tenant.
    """

    def __init__(self, tokens: dict[str, str] | None) -> None:
        # Keep only digests, so that lookups do not compare secrets byte by byte.
        self._tenants = None if tokens is None else {_digest(t): n for t, n in tokens.items()}

    @property
    def enabled(self) -> bool:
        return self._tenants is not None

    def tenant(self, context: grpc.ServicerContext) -> str:
        """The caller's tenant; Unauthenticated for a missing or unknown token."""
        if self._tenants is None:
            return NO_TENANT
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing token: send 'authorization: Bearer TOKEN'")
        tenant = self._tenants.get(_digest(token.strip()))
        if tenant is None:
            raise Unauthenticated("unknown token")
        return tenant


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
