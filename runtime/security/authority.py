"""The coordinator's side of trust: its state folder, the CA in it, enrolment, renewal, revocation.

    <state>/ca.pem, ca.key            the cluster CA (key 0600): signs every node's and edge's leaf
    <state>/ray-ca.pem, ray-ca.key    a Ray-only CA: Ray's TLS for nodes, never given to edges
    <state>/tokens.json               join tokens not yet used (hashes only)
    <state>/issued.json               every leaf signed: serial -> name, role, expiry
    <state>/revoked.json              name -> revoked serials (`edgetune revoke NAME`)
    <state>/coordinator.json          where the running coordinator listens (for `token create`)

The folder is the coordinator operator's: whoever can read it can sign certificates. Commands
that change it (`edgetune token create`, `edgetune revoke`) run on the coordinator's host and
the running coordinator picks the change up (revocations within a second).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgetune.runtime.atomic import atomic_write_text
from edgetune.runtime.errors import ConfigError, TrustError
from edgetune.runtime.jsonfile import read_json_object
from edgetune.runtime.security import ca as certs
from edgetune.runtime.security.tokens import JoinToken, TokenStore

log = logging.getLogger("edgetune.security")

LEAF_VALID_S = 30 * 86400.0  # nodes' and edges' certificates; renewed when a third is left
COORDINATOR_NAME = "coordinator"
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def check_identity_name(name: str) -> str:
    """An identity (node or edge) name: 1-63 letters, digits, '.', '_' or '-' (also a DNS label)."""
    if not _NAME.match(name or ""):
        raise ConfigError(f"identity name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting and ending "
                          "with a letter or digit")
    return name


def default_state_dir() -> Path:
    return Path.home() / ".config" / "edgetune" / "coordinator"


def write_secret(path: Path, data: bytes) -> None:
    atomic_write_text(path, data.decode())  # the temporary file is created 0600, then renamed
    os.chmod(path, 0o600)


def _load_or_create_ca(folder: Path, stem: str, label: str) -> certs.Authority:
    cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
    if cert.exists() and key.exists():
        mode = key.stat().st_mode & 0o077
        if mode:
            raise ConfigError(f"{key} is readable by others (mode {oct(key.stat().st_mode & 0o777)}): "
                              f"`chmod 600 {key}`, and consider the CA compromised if others used that access")
        return certs.Authority(cert.read_bytes(), key.read_bytes())
    if cert.exists() or key.exists():
        raise ConfigError(f"{folder}: {stem}.pem and {stem}.key must both exist or both be missing")
    authority = certs.Authority.create(label)
    write_secret(key, authority.key_pem)
    atomic_write_text(cert, authority.cert_pem.decode())
    log.info("created %s in %s (fingerprint sha256:%s)", label, folder, authority.fingerprint)
    return authority


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    role: str


class ClusterAuthority:
    """The state folder of one coordinator; safe to use from several processes at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self.ca = _load_or_create_ca(self.folder, "ca", "edgetune cluster")
        self.ray_ca = _load_or_create_ca(self.folder, "ray-ca", "edgetune Ray-only")
        self.tokens = TokenStore(self.folder / "tokens.json")

    # -- the books ------------------------------------------------------------------------
    @contextmanager
    def _book(self, name: str) -> Iterator[dict]:
        path = self.folder / name
        with open(self.folder / ".books.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                book = read_json_object(path, ConfigError) if path.exists() else {}
                yield book
                atomic_write_text(path, json.dumps(book, indent=1, sort_keys=True))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _record(self, cert_pem: bytes) -> None:
        info = certs.describe(cert_pem)
        with self._book("issued.json") as issued:
            issued[format(info.serial, "x")] = {"name": info.name, "role": info.role,
                                                "not_after": info.not_after.isoformat()}

    def identities(self) -> dict[str, str]:
        """name -> role of every identity ever issued and not revoked."""
        revoked = self.revoked_serials()
        with self._book("issued.json") as issued:
            return {v["name"]: v["role"] for s, v in issued.items() if int(s, 16) not in revoked}

    # -- issuing --------------------------------------------------------------------------
    def create_token(self, role: str, ttl_s: float) -> JoinToken:
        where = self.listening()
        if not where.get("join"):
            raise ConfigError(f"{self.folder}: no coordinator has run with this state folder yet, so there is no "
                              "join address to put in a token; start `edgetune coordinator` first")
        host, port = where["join"].rsplit(":", 1)
        return self.tokens.create(role, ttl_s, host, int(port), self.ca.fingerprint)

    def enroll(self, token_id: str, secret: str, name: str, csr_pem: bytes, ips: Sequence[str]) -> Issued:
        """A certificate for `name`, in the role the token grants; the token is spent."""
        check_identity_name(name)
        if name == COORDINATOR_NAME:
            raise TrustError(f"the name {name!r} is the coordinator's", code="INVALID_ARGUMENT")
        role = self.tokens.redeem(token_id, secret)
        taken = self.identities().get(name)
        if taken is not None:
            raise TrustError(f"an identity called {name!r} ({taken}) exists already: pick another name, or revoke it "
                             f"first on the coordinator's host (`edgetune revoke {name}`)", code="ALREADY_EXISTS")
        cert = self.ca.issue(csr_pem, role, name=name, ips=ips, dns=[peer_host(name)], valid_s=LEAF_VALID_S)
        self._record(cert)
        log.info("enrolled %s %r (addresses %s)", role, name, ", ".join(ips) or "none")
        return Issued(cert, role)

    def renew(self, holder: certs.CertInfo, csr_pem: bytes, ips: Sequence[str]) -> Issued:
        """A fresh certificate for the caller's own name and role (it proved them with its current one)."""
        if holder.serial in self.revoked_serials():
            raise TrustError(f"{holder.role} {holder.name!r} is revoked", code="PERMISSION_DENIED")
        cert = self.ca.issue(csr_pem, holder.role, name=holder.name, ips=ips, dns=[peer_host(holder.name)],
                             valid_s=LEAF_VALID_S)
        self._record(cert)
        return Issued(cert, holder.role)

    def server_keypair(self, ips: Sequence[str], dns: Sequence[str] = ()) -> tuple[bytes, bytes]:
        """The coordinator's own (certificate, key), issued afresh at each start."""
        cert, key = self.ca.issue_keypair(COORDINATOR_NAME, "coordinator", ips=ips,
                                          dns=[peer_host(COORDINATOR_NAME), *dns], valid_s=LEAF_VALID_S)
        self._record(cert)
        return cert, key

    def shard_keypair(self, name: str, ips: Sequence[str]) -> tuple[bytes, bytes]:
        """(certificate, key) a node's shard serves and relays with, naming the node (recorded, so
        revoking the node refuses these too)."""
        cert, key = self.ca.issue_keypair(name, "node", ips=ips, dns=[peer_host(name)], valid_s=LEAF_VALID_S)
        self._record(cert)
        return cert, key

    def ray_keypair(self, name: str, ips: Sequence[str]) -> tuple[bytes, bytes]:
        """(certificate, key) from the Ray-only CA for one Ray process host."""
        return self.ray_ca.issue_keypair(name, "node", ips=["127.0.0.1", *ips], dns=["localhost"],
                                         valid_s=LEAF_VALID_S)

    # -- revocation -----------------------------------------------------------------------
    def revoke(self, name: str) -> list[int]:
        """Refuse every certificate issued to `name` so far; returns their serials."""
        with self._book("issued.json") as issued:
            serials = sorted(int(s, 16) for s, v in issued.items() if v.get("name") == name)
        if not serials:
            known = ", ".join(sorted(self.identities())) or "none"
            raise ConfigError(f"no identity called {name!r} was ever issued here (known: {known})")
        if name == COORDINATOR_NAME:
            raise ConfigError("the coordinator's own certificate cannot be revoked; rotate the state folder instead")
        with self._book("revoked.json") as revoked:
            revoked[name] = sorted(set(revoked.get(name, [])) | {format(s, "x") for s in serials})
        return serials

    def revocations(self) -> tuple[set[str], frozenset[int]]:
        """(revoked names, their revoked serials), from one read of revoked.json."""
        path = self.folder / "revoked.json"
        book = read_json_object(path, ConfigError) if path.exists() else {}
        return set(book), frozenset(int(s, 16) for serials in book.values() for s in serials)

    def revoked_serials(self) -> frozenset[int]:
        return self.revocations()[1]

    def revoked_names(self) -> list[str]:
        return sorted(self.revocations()[0])

    # -- where the coordinator listens ----------------------------------------------------
    def set_listening(self, address: str, join: str) -> None:
        atomic_write_text(self.folder / "coordinator.json", json.dumps({"address": address, "join": join}))

    def listening(self) -> dict[str, str]:
        path = self.folder / "coordinator.json"
        return read_json_object(path, ConfigError) if path.exists() else {}


def peer_host(name: str) -> str:
    """The DNS name a leaf carries for its identity; channels check it (not an address) against
    the name the route or the caller expects, so a certificate vouches for *who*, wherever it runs."""
    return f"{name}.edgetune.invalid"
