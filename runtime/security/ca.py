"""Keys, certificates and the certificate authority that signs them (the `cryptography` package).

Every key is ECDSA P-256: small, fast to make and to verify, and what every TLS stack speaks.
A leaf certificate names one identity: its subject's common name is the identity's name, its
organisational unit the role (`ROLES`), and its subject alternative names the host names and IP
addresses the holder serves on. Leaves are good for both TLS sides (server and client auth):
a node serves the previous hop and calls the next one with the same certificate.

    >>> ca = Authority.create("my cluster")
    >>> key = new_key()
    >>> cert = ca.issue(make_csr(key, "gpu-1"), role="node", ips=["198.18.0.2"], valid_s=86400)
    >>> describe(cert).name, describe(cert).role
    ('gpu-1', 'node')
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgetune.runtime.errors import ConfigError, TrustError

ROLES = ("coordinator", "node", "edge")
CA_VALID_S = 10 * 365 * 86400.0  # the CA outlives every leaf it signs; rotating it means re-joining everyone
CLOCK_SKEW_S = 300.0  # a leaf is valid from 5 minutes before it was made: hosts' clocks differ


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what}: not a readable private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{what}: expected an EC private key, found {type(key).__name__}")
    return key


def load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ConfigError(f"{what}: not a readable PEM certificate ({e})") from None


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem_bytes: bytes) -> str:
    """The SHA-256 of the certificate's DER bytes, in hex: what a join string pins."""
    cert = load_cert(cert_pem_bytes, "certificate")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A certificate signing request for `name`, signed by `key` (proof the asker holds it)."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertInfo:
    """What a leaf certificate says about its holder."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime  # UTC
    ips: tuple[str, ...] = ()

    def remaining_s(self, now: dt.datetime | None = None) -> float:
        return (self.not_after - (now or _now())).total_seconds()


def describe(cert: x509.Certificate | bytes) -> CertInfo:
    """Name, role, serial and expiry of a leaf (a parsed certificate or its PEM)."""
    if isinstance(cert, bytes):
        cert = load_cert(cert, "certificate")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) != 1 or len(roles) != 1 or roles[0].value not in ROLES:
        raise TrustError(f"certificate {cert.subject.rfc4514_string()!r} names no edgetune identity and role",
                         code="UNAUTHENTICATED")
    try:
        ips = tuple(str(a) for a in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        ips = ()
    return CertInfo(str(names[0].value), str(roles[0].value), cert.serial_number, cert.not_valid_after_utc, ips)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _san(dns: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns) if d]
    for ip in dict.fromkeys(ips):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ConfigError(f"{ip!r} is not an IP address (a certificate's IP names must be addresses)") from None
    return x509.SubjectAlternativeName(entries)


@dataclass
class Authority:
    """A certificate authority: its key and self-signed certificate (both PEM)."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def create(cls, label: str) -> Authority:
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgetune"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{label} CA {secrets.token_hex(4)}")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW_S))
                .not_valid_after(now + dt.timedelta(seconds=CA_VALID_S))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert_pem(cert), key_pem(key))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    def issue(self, csr_pem: bytes, role: str, *, ips: Sequence[str] = (), dns: Sequence[str] = (),
              valid_s: float, name: str | None = None) -> bytes:
        """A leaf certificate (PEM) for the CSR's key. `name` (default: the CSR's common name) and
        `role` are what the CA vouches for -- never taken from the CSR's other fields."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise TrustError(f"the certificate request is not readable PEM ({e})", code="INVALID_ARGUMENT") from None
        if not csr.is_signature_valid:
            raise TrustError("the certificate request's signature does not match its key", code="INVALID_ARGUMENT")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
            raise TrustError("the certificate request must carry an EC key", code="INVALID_ARGUMENT")
        if name is None:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if len(cns) != 1:
                raise TrustError("the certificate request names no identity", code="INVALID_ARGUMENT")
            name = str(cns[0].value)
        return self._sign(csr.public_key(), name, role, ips, dns, valid_s)

    def issue_keypair(self, name: str, role: str, *, ips: Sequence[str] = (), dns: Sequence[str] = (),
                      valid_s: float) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a holder the CA makes the key for (its own server, Ray)."""
        key = new_key()
        return self._sign(key.public_key(), name, role, ips, dns, valid_s), key_pem(key)

    def _sign(self, public_key, name: str, role: str, ips, dns, valid_s: float) -> bytes:
        ca_cert = load_cert(self.cert_pem, "CA certificate")
        ca_key = load_key(self.key_pem, "CA key")
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgetune"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW_S))
                   .not_valid_after(now + dt.timedelta(seconds=valid_s))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if ips or dns:
            builder = builder.add_extension(_san(dns, ips), critical=False)
        return cert_pem(builder.sign(ca_key, hashes.SHA256()))

    def signed(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed `cert` (its signature checks out against the CA's key)."""
        ca_cert = load_cert(self.cert_pem, "CA certificate")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True
