"""How a process speaks gRPC (`Trust`), who called (`Peer`), and whether they may (`Gatekeeper`).

Two modes:

- mutual TLS (the default): every channel presents this process's certificate and checks the
  peer's against the cluster CA; a server learns the caller's name, role and serial from the
  certificate the TLS handshake verified, and `Gatekeeper.admit` checks role and revocation;
- `--insecure` (loopback development only): plaintext with a shared bearer token, checked by
  `runtime/wire/rpc.py`'s interceptor; every caller is the anonymous `INSECURE_PEER`, allowed
  everything, and every session is anyone's.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from edgetune.runtime.errors import ConfigError, TrustError
from edgetune.runtime.security import ca as certs


@dataclass(frozen=True)
class Trust:
    """This process's side of every gRPC connection: its CA, certificate and key, or a token."""

    ca_pem: bytes = b""
    cert_pem: bytes = b""
    key_pem: bytes = field(default=b"", repr=False)
    token: str = field(default="", repr=False)  # --insecure only

    def __post_init__(self) -> None:
        if bool(self.cert_pem) != bool(self.key_pem):
            raise ConfigError("a certificate needs its key, and a key its certificate")
        if self.cert_pem and not self.ca_pem:
            raise ConfigError("mutual TLS needs the CA certificate beside this process's certificate")
        if not self.secure and not self.token:
            raise ConfigError("--insecure needs the cluster's shared token")

    @classmethod
    def insecure(cls, token: str) -> Trust:
        return cls(token=token)

    @classmethod
    def mutual(cls, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> Trust:
        return cls(ca_pem, cert_pem, key_pem)

    @classmethod
    def verify_only(cls, ca_pem: bytes) -> Trust:
        """TLS that checks the server against `ca_pem` but shows no certificate: a joiner's."""
        return cls(ca_pem)

    @property
    def secure(self) -> bool:
        return bool(self.ca_pem)

    @property
    def me(self) -> certs.CertInfo | None:
        return certs.describe(self.cert_pem) if self.secure else None


@dataclass(frozen=True)
class Peer:
    name: str
    role: str
    serial: int = 0
    ips: tuple[str, ...] = ()  # the addresses its certificate names


INSECURE_PEER = Peer("", "insecure")


@lru_cache(maxsize=1024)
def _peer_from_pem(pem: bytes) -> Peer:
    info = certs.describe(pem)
    return Peer(info.name, info.role, info.serial, info.ips)


def peer_of(context) -> Peer | None:
    """The verified client certificate's identity on a gRPC server call, or None without one."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return _peer_from_pem(bytes(pems[0])) if pems else None


class Revocations:
    """The serials refused cluster-wide; replaced whole when the coordinator's list changes."""

    def __init__(self, serials: Iterable[int] = ()) -> None:
        self._serials = frozenset(serials)
        self._lock = threading.Lock()
        self._listeners: list = []

    def __contains__(self, serial: int) -> bool:
        return serial in self._serials

    @property
    def serials(self) -> frozenset[int]:
        return self._serials

    def update(self, serials: Iterable[int]) -> None:
        with self._lock:
            self._serials = frozenset(serials)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(self._serials)

    def on_change(self, listener) -> None:
        """Call `listener(serials)` after every update (e.g. to cancel a revoked peer's streams)."""
        with self._lock:
            self._listeners.append(listener)


class Gatekeeper:
    """Decides, per call, whether the caller may do what it asks."""

    def __init__(self, trust: Trust, revoked: Revocations | None = None) -> None:
        self.trust = trust
        self.revoked = revoked or Revocations()

    def admit(self, context, roles: tuple[str, ...], what: str) -> Peer:
        """The caller, if its role is one of `roles` and it is not revoked; TrustError otherwise."""
        if not self.trust.secure:
            return INSECURE_PEER
        peer = peer_of(context)
        if peer is None:
            raise TrustError(f"{what}: present a client certificate (join with `edgetune node --join` or "
                             "`edgetune finetune --join`)", code="UNAUTHENTICATED")
        if peer.serial in self.revoked:
            raise TrustError(f"{what}: {peer.role} {peer.name!r} is revoked", code="PERMISSION_DENIED")
        if peer.role not in roles:
            raise TrustError(f"{what}: a {peer.role} may not do this (only: {', '.join(roles)})",
                             code="PERMISSION_DENIED")
        return peer
