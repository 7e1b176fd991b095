"""A node's or an edge's credentials on disk, and the pinned fetch of the CA that starts a join.

    <folder>/key.pem       this identity's private key (0600): made here, never sent anywhere
    <folder>/cert.pem      its certificate, signed by the cluster CA
    <folder>/ca.pem        the cluster CA, checked against the join string's fingerprint
    <folder>/identity.json the coordinator's address, name and role, for later runs

Default folders: ~/.config/edgetune/node and ~/.config/edgetune/edge (`--credentials DIR`).
"""
from __future__ import annotations

import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from edgetune.runtime.atomic import atomic_write_text
from edgetune.runtime.errors import ConfigError, TrustError
from edgetune.runtime.jsonfile import read_json_object
from edgetune.runtime.security import ca as certs
from edgetune.runtime.security.access import Trust
from edgetune.runtime.security.authority import LEAF_VALID_S
from edgetune.runtime.security.tokens import JoinToken

RENEW_LEFT_S = LEAF_VALID_S / 3  # renew once two thirds of a certificate's life are gone
FETCH_TIMEOUT_S = 10.0


def default_credentials_dir(role: str) -> Path:
    return Path.home() / ".config" / "edgetune" / role


@dataclass(frozen=True)
class Credentials:
    folder: Path
    coordinator: str  # HOST:PORT of the coordinator's mutual-TLS port
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def info(self) -> certs.CertInfo:
        return certs.describe(self.cert_pem)

    def trust(self) -> Trust:
        return Trust.mutual(self.ca_pem, self.cert_pem, self.key_pem)

    def needs_renewal(self) -> bool:
        return self.info.remaining_s() < RENEW_LEFT_S

    @classmethod
    def load(cls, folder: Path, role: str) -> Credentials:
        folder = Path(folder).expanduser()
        files = {n: folder / n for n in ("ca.pem", "cert.pem", "key.pem", "identity.json")}
        missing = [n for n, p in files.items() if not p.exists()]
        if missing:
            raise ConfigError(f"no {role} credentials in {folder} (missing {', '.join(missing)}): join once with "
                              f"--join STRING (`edgetune token create --role {role}` on the coordinator's host prints "
                              "one), or pass --credentials DIR, or --insecure for loopback development")
        if files["key.pem"].stat().st_mode & 0o077:
            raise ConfigError(f"{files['key.pem']} is readable by others: `chmod 600 {files['key.pem']}`")
        meta = read_json_object(files["identity.json"], ConfigError, "join again with --join")
        creds = cls(folder, str(meta.get("coordinator", "")), files["ca.pem"].read_bytes(),
                    files["cert.pem"].read_bytes(), files["key.pem"].read_bytes())
        info = creds.info
        if info.role != role:
            raise ConfigError(f"{folder} holds a {info.role}'s credentials ({info.name!r}), not a {role}'s: "
                              "pass the right --credentials folder")
        if info.remaining_s() <= 0:
            raise ConfigError(f"the certificate in {folder} ({info.name!r}) expired on {info.not_after:%Y-%m-%d}: "
                              "join again with a new --join string")
        certs.load_key(creds.key_pem, str(files["key.pem"]))
        return creds

    def save(self) -> Credentials:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_text(self.folder / "key.pem", self.key_pem.decode())
        os.chmod(self.folder / "key.pem", 0o600)
        atomic_write_text(self.folder / "ca.pem", self.ca_pem.decode())
        atomic_write_text(self.folder / "cert.pem", self.cert_pem.decode())
        info = self.info
        atomic_write_text(self.folder / "identity.json", json.dumps(
            {"coordinator": self.coordinator, "name": info.name, "role": info.role}, indent=1))
        return self


def local_addresses() -> list[str]:
    """This host's IP addresses (loopback included, link-local left out): a certificate's IP names."""
    import ipaddress

    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = a.address.split("%", 1)[0]
            try:
                if ipaddress.ip_address(ip).is_link_local:
                    continue
            except ValueError:
                continue
            out.append(ip)
    return sorted(set(out))


def fetch_pinned_ca(join: JoinToken, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """The CA certificate (PEM) the coordinator's join port shows in its TLS chain, if its SHA-256
    is the one the join string pins; TrustError (nothing secret sent yet) otherwise.

    The handshake is unverified on purpose -- the pin is the check; no application data is sent.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    host = join.host.strip("[]")
    try:
        with socket.create_connection((host, join.port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=None) as tls:
            # public as SSLSocket.get_unverified_chain from Python 3.13; the same method before
            chain = tls.get_unverified_chain() if hasattr(tls, "get_unverified_chain") \
                else tls._sslobj.get_unverified_chain()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot reach the coordinator's join port {join.address}: {e}") from None
    seen = []
    for entry in chain or []:
        # 3.13's public method gives DER bytes; the older private one _ssl.Certificate objects (PEM by default)
        pem = (ssl.DER_cert_to_PEM_cert(entry) if isinstance(entry, bytes) else entry.public_bytes()).encode()
        fp = certs.fingerprint(pem)
        if fp == join.ca_fingerprint:
            return pem
        seen.append(fp)
    raise TrustError(f"the server at {join.address} did not show the CA the join string pins "
                     f"(sha256:{join.ca_fingerprint[:16]}..., it showed {', '.join(f[:16] + '...' for f in seen) or 'none'}): "
                     "refusing to send the join secret; check the address and the string", code="UNAUTHENTICATED")
