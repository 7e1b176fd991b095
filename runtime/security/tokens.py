"""One-time join strings, and the coordinator's store of the tokens it handed out.

A join string carries everything a joiner needs and nothing it must trust blindly:

    edgetune-join:<id>.<secret>@<host>:<port>/sha256:<fingerprint>

- `<host>:<port>`: the coordinator's join port (TLS, no client certificate yet),
- `<fingerprint>`: SHA-256 of the CA certificate; the joiner checks the CA it is shown against
  it *before* sending the secret (the kubeadm pattern), so a machine in the middle learns nothing,
- `<id>.<secret>`: redeemed once, before it expires, for a certificate of the token's role.

The store keeps only a hash of each secret, in a 0600 file beside the CA, updated under a lock
so `edgetune token create` (another process) and the coordinator never lose each other's writes.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.runtime.atomic import atomic_write_text
from edgetune.runtime.errors import ConfigError, TrustError
from edgetune.runtime.jsonfile import read_json_object

PREFIX = "edgetune-join:"
JOIN_ROLES = ("node", "edge")  # the coordinator's own certificate is never joined for
_JOIN_RE = re.compile(r"edgetune-join:([a-z0-9]{8})\.([A-Za-z0-9_-]{32,64})@(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})"
                      r"/sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: str = field(repr=False)
    host: str
    port: int
    ca_fingerprint: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{PREFIX}{self.token_id}.{self.secret}@{self.host}:{self.port}/sha256:{self.ca_fingerprint}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        m = _JOIN_RE.fullmatch(text.strip())
        if m is None:
            raise ConfigError("not a join string: expected edgetune-join:ID.SECRET@HOST:PORT/sha256:FINGERPRINT, as "
                              "`edgetune token create` prints it on the coordinator's host")
        token_id, secret, host, port, fp = m.groups()
        if not 0 < int(port) < 65536:
            raise ConfigError(f"join string: port {port} is out of range")
        return cls(token_id, secret, host, int(port), fp)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """tokens.json in the coordinator's state folder: id -> {sha256 of secret, role, expiry}."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                tokens = read_json_object(self.path, ConfigError, "delete it to forget every unused token") \
                    if self.path.exists() else {}
                yield tokens
                atomic_write_text(self.path, json.dumps(tokens, indent=1, sort_keys=True))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def create(self, role: str, ttl_s: float, host: str, port: int, ca_fingerprint: str) -> JoinToken:
        if role not in JOIN_ROLES:
            raise ConfigError(f"a join token's role is one of {', '.join(JOIN_ROLES)}, not {role!r}")
        if not ttl_s > 0:
            raise ConfigError(f"a join token's lifetime must be positive, got {ttl_s} s")
        token = JoinToken(secrets.token_hex(4), secrets.token_urlsafe(32), host, port, ca_fingerprint)
        now = time.time()
        with self._locked() as tokens:
            for tid in [t for t, v in tokens.items() if v.get("expires", 0) < now]:
                del tokens[tid]  # expired ones are of no use to anyone
            tokens[token.token_id] = {"sha256": _digest(token.secret), "role": role, "expires": now + ttl_s}
        return token

    def redeem(self, token_id: str, secret: str) -> str:
        """The token's role; the token is gone afterwards. TrustError (UNAUTHENTICATED) when it is
        unknown, used, expired or the secret is wrong -- the caller learns no more than that."""
        with self._locked() as tokens:
            entry = tokens.get(token_id)
            ok = (isinstance(entry, dict) and hmac.compare_digest(str(entry.get("sha256", "")), _digest(secret))
                  and float(entry.get("expires", 0)) > time.time())
            if not ok:
                raise TrustError("join token refused: unknown, already used, expired or wrong secret; ask the "
                                 "coordinator's operator for a new one (`edgetune token create`)",
                                 code="UNAUTHENTICATED")
            del tokens[token_id]
            return str(entry["role"])

    def pending(self) -> list[tuple[str, str, float]]:
        """(id, role, expiry) of the tokens not yet used and not expired."""
        now = time.time()
        with self._locked() as tokens:
            return sorted((t, str(v.get("role")), float(v.get("expires", 0))) for t, v in tokens.items()
                          if float(v.get("expires", 0)) > now)
