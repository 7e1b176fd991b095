"""Trust without Ray: the CA, join strings, the coordinator's books, enrolment over a real join port,
roles on the coordinator's service, and credentials on disk (runtime/security, coordinator/service)."""
from __future__ import annotations

import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from edgetune.runtime.errors import ConfigError, TrustError
from edgetune.runtime.security import ca as certs
from edgetune.runtime.security.access import Trust
from edgetune.runtime.security.authority import ClusterAuthority, peer_host
from edgetune.runtime.security.credentials import Credentials, fetch_pinned_ca
from edgetune.runtime.security.tokens import JoinToken, TokenStore
from edgetune.runtime.wire.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    credentials_for,
    join_cluster,
    renew_if_due,
)


# -- certificates ---------------------------------------------------------------------------
def test_a_leaf_names_its_identity_role_and_addresses_and_verifies_only_against_its_ca():
    ca, other = certs.Authority.create("a"), certs.Authority.create("b")
    key = certs.new_key()
    pem = ca.issue(certs.make_csr(key, "gpu-1"), "node", ips=["198.18.0.2"], dns=[peer_host("gpu-1")], valid_s=60)
    info = certs.describe(pem)
    assert (info.name, info.role, info.ips) == ("gpu-1", "node", ("198.18.0.2",))
    assert 0 < info.remaining_s() <= 60
    leaf = x509.load_pem_x509_certificate(pem)
    assert ca.signed(leaf) and not other.signed(leaf)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # the CSR's key, not a new one
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [peer_host("gpu-1")]


def test_the_ca_vouches_for_the_name_and_role_it_chooses_not_the_csr_s():
    ca = certs.Authority.create("a")
    csr = certs.make_csr(certs.new_key(), "coordinator")  # asks to be someone else
    assert certs.describe(ca.issue(csr, "edge", name="alice", valid_s=60)).name == "alice"
    with pytest.raises(ConfigError, match="unknown role"):
        ca.issue(csr, "admin", valid_s=60)


def test_a_csr_whose_signature_does_not_match_its_key_is_refused():
    key, thief = certs.new_key(), certs.new_key()
    forged = (x509.CertificateSigningRequestBuilder()
              .subject_name(x509.load_pem_x509_csr(certs.make_csr(key, "x")).subject)
              .sign(thief, hashes.SHA256()))
    # splice the thief's signature onto a request carrying `key`: parse fails or the signature check does
    der = bytearray(forged.public_bytes(certs.serialization.Encoding.DER))
    der[-5] ^= 0xFF
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + __import__("base64").encodebytes(bytes(der)) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(TrustError):
        certs.Authority.create("a").issue(pem, "node", valid_s=60)
    with pytest.raises(TrustError, match="not readable"):
        certs.Authority.create("a").issue(b"not a csr", "node", valid_s=60)


def test_a_certificate_without_an_edgetune_role_is_no_identity():
    ca = certs.Authority.create("a")
    with pytest.raises(TrustError, match="names no edgetune identity"):
        certs.describe(ca.cert_pem)


# -- join strings ---------------------------------------------------------------------------------
def test_join_string_round_trips_and_malformed_ones_say_what_is_expected(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("node", 60, "198.18.0.1", 7701, "ab" * 32)
    assert JoinToken.parse(str(token)) == token and token.secret not in repr(token)
    assert JoinToken.parse(str(token).replace("198.18.0.1", "[::1]")).host == "[::1]"
    text = str(token)
    for bad in ("", text[:-1], text.replace("sha256:", "md5:"), text.replace("@", "#"), "edgetune-join:x.y@h:1/sha256:0",
                text.replace(":7701", ":99999")):
        with pytest.raises(ConfigError, match="join string"):
            JoinToken.parse(bad)


def test_a_token_is_good_once_before_it_expires_and_only_with_its_secret(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("edge", 60, "h", 1, "0" * 64)
    with pytest.raises(TrustError, match="refused"):
        store.redeem(token.token_id, token.secret[:-1] + ("A" if token.secret[-1] != "A" else "B"))
    assert store.redeem(token.token_id, token.secret) == "edge"
    with pytest.raises(TrustError, match="refused"):
        store.redeem(token.token_id, token.secret)  # spent
    short = store.create("node", 0.05, "h", 1, "0" * 64)
    time.sleep(0.1)
    with pytest.raises(TrustError, match="refused"):
        store.redeem(short.token_id, short.secret)
    assert token.secret not in (tmp_path / "tokens.json").read_text()  # only hashes are stored
    with pytest.raises(ConfigError, match="role"):
        store.create("coordinator", 60, "h", 1, "0" * 64)


# -- the coordinator's books ----------------------------------------------------------------------
def test_state_folder_keeps_keys_private_and_reloads_the_same_ca(tmp_path):
    a = ClusterAuthority(tmp_path / "state")
    for name in ("ca.key", "ray-ca.key"):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert ClusterAuthority(tmp_path / "state").ca.fingerprint == a.ca.fingerprint
    assert a.ray_ca.fingerprint != a.ca.fingerprint  # Ray's CA is another one
    (tmp_path / "state" / "ca.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        ClusterAuthority(tmp_path / "state")


def test_names_are_unique_until_revoked_and_revoking_refuses_every_certificate_of_the_name(tmp_path):
    a = ClusterAuthority(tmp_path)
    a.set_listening("127.0.0.1:1", "127.0.0.1:2")
    first = a.enroll(*_redeemable(a, "node"), "gpu-1", certs.make_csr(certs.new_key(), "gpu-1"), [])
    shard_cert, _ = a.shard_keypair("gpu-1", ["127.0.0.1"])
    with pytest.raises(TrustError, match="exists already") as e:
        a.enroll(*_redeemable(a, "node"), "gpu-1", certs.make_csr(certs.new_key(), "gpu-1"), [])
    assert e.value.code == "ALREADY_EXISTS"
    serials = a.revoke("gpu-1")
    assert set(serials) == {certs.describe(first.cert_pem).serial, certs.describe(shard_cert).serial}
    assert a.revoked_serials() == frozenset(serials) and a.revoked_names() == ["gpu-1"]
    again = a.enroll(*_redeemable(a, "node"), "gpu-1", certs.make_csr(certs.new_key(), "gpu-1"), [])
    assert certs.describe(again.cert_pem).serial not in a.revoked_serials()  # a new key, a new certificate
    with pytest.raises(ConfigError, match="no identity called 'nobody'"):
        a.revoke("nobody")


def test_a_token_needs_a_coordinator_that_has_listened(tmp_path):
    with pytest.raises(ConfigError, match="start `edgetune coordinator` first"):
        ClusterAuthority(tmp_path).create_token("node", 60)


def _redeemable(a: ClusterAuthority, role: str) -> tuple[str, str]:
    token = a.create_token(role, 60)
    return token.token_id, token.secret


# -- enrolment over a real join port --------------------------------------------------------------
@pytest.fixture
def coordinator(tmp_path):
    """A coordinator's gRPC service (no Ray: trust calls only) on a mutual-TLS port and a join port."""
    from edgetune.coordinator.core import Coordinator
    from edgetune.coordinator.service import serve

    authority = ClusterAuthority(tmp_path / "state")
    cert, key = authority.server_keypair(["127.0.0.1"])
    core = Coordinator(Trust.mutual(authority.ca.cert_pem, cert, key), "ray:0", authority=authority)
    server, port, join_port = serve(core, "127.0.0.1", 0, join_port=0)
    core.address = f"127.0.0.1:{port}"
    authority.set_listening(core.address, f"127.0.0.1:{join_port}")
    yield core, authority
    server.stop(None)


def test_joining_pins_the_ca_and_yields_stored_credentials_that_call_with_their_role(coordinator, tmp_path):
    core, authority = coordinator
    folder = tmp_path / "edge"
    creds = join_cluster(str(authority.create_token("edge", 60)), folder, "alice", "edge", ["127.0.0.1"])
    assert (creds.info.name, creds.info.role, creds.coordinator) == ("alice", "edge", core.address)
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
    loaded = Credentials.load(folder, "edge")
    assert loaded.cert_pem == creds.cert_pem and loaded.coordinator == core.address
    assert certs.fingerprint(loaded.ca_pem) == authority.ca.fingerprint
    with pytest.raises(ConfigError, match="not a node's"):
        Credentials.load(folder, "node")
    client = CoordinatorClient(core.address, creds.trust())
    try:
        with pytest.raises(CoordinatorError) as e:  # an edge may not join Ray
            client.join("alice")
        assert e.value.code == "PERMISSION_DENIED"
        renewed = client.renew(certs.make_csr(certs.new_key(), "mallory"), [])
        assert (certs.describe(renewed.cert_pem).name, certs.describe(renewed.cert_pem).role) == ("alice", "edge")
    finally:
        client.close()


def test_running_the_same_join_twice_joins_once(coordinator, tmp_path):
    _, authority = coordinator
    join = str(authority.create_token("node", 60))
    first = credentials_for("node", tmp_path / "n", join, "gpu-1")
    again = credentials_for("node", tmp_path / "n", join, "gpu-1")  # the token is spent: no second enrolment
    assert again.cert_pem == first.cert_pem


def test_a_wrong_pin_stops_the_join_before_the_secret_is_sent(coordinator, tmp_path):
    _, authority = coordinator
    token = authority.create_token("edge", 60)
    forged = JoinToken(token.token_id, token.secret, token.host, token.port, "0" * 64)
    with pytest.raises(TrustError, match="refusing to send the join secret"):
        join_cluster(str(forged), tmp_path / "e", "eve", "edge")
    assert [t for t, _, _ in authority.tokens.pending()] == [token.token_id]  # still unused
    assert fetch_pinned_ca(token) == authority.ca.cert_pem


def test_a_node_token_does_not_make_an_edge(coordinator, tmp_path):
    _, authority = coordinator
    with pytest.raises(CoordinatorError, match="for a node, not a edge"):
        join_cluster(str(authority.create_token("node", 60)), tmp_path / "e", "bob", "edge")


def test_calls_without_a_certificate_may_only_enroll(coordinator):
    core, authority = coordinator
    join_address = authority.listening()["join"]
    client = CoordinatorClient(join_address, Trust.verify_only(authority.ca.cert_pem))
    try:
        for call in (lambda: client.get_route("m"), client.status, lambda: client.join("x")):
            with pytest.raises(CoordinatorError) as e:
                call()
            assert e.value.code == "UNAUTHENTICATED"
    finally:
        client.close()
    # and the mutual-TLS port does not even finish a handshake without one
    client = CoordinatorClient(core.address, Trust.verify_only(authority.ca.cert_pem))
    try:
        with pytest.raises(CoordinatorError) as e:
            client.status()
        assert e.value.code == "UNAVAILABLE"
    finally:
        client.close()


def test_a_certificate_from_another_ca_is_refused_and_roles_decide_the_calls(coordinator, tmp_path):
    core, authority = coordinator
    other = certs.Authority.create("other")
    cert, key = other.issue_keypair("alice", "edge", valid_s=60)
    client = CoordinatorClient(core.address, Trust.mutual(authority.ca.cert_pem, cert, key))
    with pytest.raises(CoordinatorError) as e:
        client.status()
    client.close()
    assert e.value.code == "UNAVAILABLE"  # the handshake fails
    node = join_cluster(str(authority.create_token("node", 60)), tmp_path / "n", "gpu-1", "node")
    client = CoordinatorClient(core.address, node.trust())
    try:
        with pytest.raises(CoordinatorError) as e:
            client.get_route("m")
        assert e.value.code == "PERMISSION_DENIED" and "only edges" in str(e.value)
        with pytest.raises(CoordinatorError) as e:
            client.join("gpu-2")  # only under its own name
        assert e.value.code == "PERMISSION_DENIED"
    finally:
        client.close()


def test_a_revoked_identity_is_refused_on_its_next_call(coordinator, tmp_path):
    core, authority = coordinator
    creds = join_cluster(str(authority.create_token("edge", 60)), tmp_path / "e", "alice", "edge")
    client = CoordinatorClient(core.address, creds.trust())
    try:
        client.renew(certs.make_csr(certs.new_key(), "alice"), [])
        authority.revoke("alice")
        assert core.check_revocations()  # what the coordinator's loop does twice a second
        with pytest.raises(CoordinatorError) as e:
            client.renew(certs.make_csr(certs.new_key(), "alice"), [])
        assert e.value.code == "PERMISSION_DENIED" and "revoked" in str(e.value)
    finally:
        client.close()


def test_credentials_are_renewed_once_two_thirds_of_their_life_are_gone(coordinator, tmp_path, monkeypatch):
    from edgetune.runtime.security import credentials

    _, authority = coordinator
    creds = join_cluster(str(authority.create_token("node", 60)), tmp_path / "n", "gpu-1", "node")
    assert renew_if_due(creds) is creds
    monkeypatch.setattr(credentials, "RENEW_LEFT_S", 10 * 365 * 86400.0)  # as if it were nearly expired
    renewed = renew_if_due(creds)
    assert renewed.cert_pem != creds.cert_pem and renewed.key_pem != creds.key_pem
    assert Credentials.load(tmp_path / "n", "node").cert_pem == renewed.cert_pem
    assert certs.describe(renewed.cert_pem).name == "gpu-1"


def test_trust_refuses_half_configurations():
    ca = certs.Authority.create("a")
    cert, key = ca.issue_keypair("x", "edge", valid_s=60)
    with pytest.raises(ConfigError):
        Trust(ca.cert_pem, cert, b"")
    with pytest.raises(ConfigError):
        Trust(b"", cert, key)
    with pytest.raises(ConfigError):
        Trust()
    assert "PRIVATE" not in repr(Trust.mutual(ca.cert_pem, cert, key))
