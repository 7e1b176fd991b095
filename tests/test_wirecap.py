"""tests/wirecap.py: what LoopbackCapture records of plain TCP, of TLS, and of a 32 MiB burst."""
from __future__ import annotations

import datetime
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgetune.tests.wirecap import LoopbackCapture


@pytest.fixture(autouse=True)
def _needs_raw_sockets():
    """Skip only where the process cannot open a raw socket at all; as root a PermissionError
    from the library is a failure."""
    try:
        with LoopbackCapture(ports={9}):
            pass
    except PermissionError as e:
        if os.geteuid() == 0:
            raise
        pytest.skip(f"needs root / CAP_NET_RAW: {e}")


def _read_all(conn: socket.socket | ssl.SSLSocket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextmanager
def _server(size: int, wrap: Callable[[socket.socket], socket.socket] = lambda s: s) -> Iterator[tuple[int, list]]:
    """A one-connection TCP server on 127.0.0.1 that reads `size` bytes, answers b"ok" and
    closes. Yields (port, received), `received` holding the bytes once the block exits."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with wrap(conn) as conn:
                received.append(_read_all(conn, size))
                conn.sendall(b"ok")
        except BaseException as e:  # surfaced in the test thread below
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        thread.join(timeout=30)
        listener.close()
    assert not thread.is_alive(), "server did not finish"
    assert not errors, errors


def _send(port: int, data: bytes, wrap: Callable[[socket.socket], socket.socket] = lambda s: s) -> None:
    """Connect, send `data`, and wait for the server's b"ok" (so its bytes have crossed `lo`)."""
    with wrap(socket.create_connection(("127.0.0.1", port), timeout=30)) as conn:
        conn.sendall(data)
        assert _read_all(conn, 2) == b"ok"


def test_plain_tcp_marker_is_seen_once_and_only_on_the_given_ports():
    marker, other, never_sent = os.urandom(64), os.urandom(64), os.urandom(64)
    with _server(64) as (port, got), _server(64) as (other_port, other_got):
        with LoopbackCapture(ports={port}) as cap:
            _send(port, marker)
            _send(other_port, other)
    assert got == [marker] and other_got == [other]

    assert cap.dropped() == 0
    assert cap.contains(marker)
    assert not cap.contains(never_sent)
    assert not cap.contains(other) and other not in cap.payload()  # the port filter held
    streams = cap.streams()
    assert streams and all(port in (sport, dport) for _, sport, _, dport in streams)
    # Each packet counted once: `lo` shows it to the tap twice (sent and received).
    to_server = {key: data for key, data in streams.items() if key[3] == port}
    assert list(to_server.values()) == [marker]
    from_server = [data for key, data in streams.items() if key[1] == port]
    assert from_server == [b"ok"]
    assert cap.payload().count(marker) == 1


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_marker_inside_tls_is_not_on_the_wire(tmp_path):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    marker = os.urandom(64)

    with _server(64, lambda s: server_ctx.wrap_socket(s, server_side=True)) as (port, got):
        with LoopbackCapture(ports={port}) as cap:
            _send(port, marker, lambda s: client_ctx.wrap_socket(s, server_hostname="localhost"))
    assert got == [marker]  # the marker really went through the connection

    assert cap.dropped() == 0
    to_server = b"".join(data for key, data in cap.streams().items() if key[3] == port)
    # The handshake was captured: the client's first bytes are a TLS handshake record (0x16)
    # naming the server, and more than the marker's worth of ciphertext followed.
    assert to_server[:1] == b"\x16" and b"localhost" in to_server
    assert len(to_server) > len(marker)
    assert not cap.contains(marker)
    assert marker not in cap.payload()


def test_32_mib_burst_is_captured_without_drops():
    size = 32 * 1024 * 1024
    data = os.urandom(size)
    with _server(size) as (port, got):
        with LoopbackCapture(ports={port}) as cap:
            _send(port, data)
    assert got == [data]

    assert cap.dropped() == 0
    assert len(cap.payload()) >= size
    to_server = b"".join(d for key, d in cap.streams().items() if key[3] == port)
    assert size <= len(to_server) < 2 * size  # each packet once, not once per tap copy
    assert cap.contains(data[-4096:]) and cap.contains(data[:4096])


@pytest.mark.parametrize("n_ports", [24, 100])  # the most the kernel filter takes; past that Python filters
def test_many_ports(n_ports):
    marker = os.urandom(64)
    with _server(64) as (port, got):
        ports = {port} | set(range(20000, 20000 + n_ports - 1))
        with LoopbackCapture(ports=ports) as cap:
            _send(port, marker)
    assert got == [marker] and cap.contains(marker) and cap.dropped() == 0
