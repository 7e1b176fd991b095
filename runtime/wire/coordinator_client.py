"""The edge's (and `edgetune node`/`status`'s) client for the coordinator service.

Every call has a deadline and goes over mutual TLS with the caller's certificate (or, under
--insecure, carries the shared token). gRPC failures become edgetune errors whose message names
the coordinator and what went wrong. `join_cluster` turns a join string into credentials.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc

from edgetune.proto.v1 import coordinator_pb2_grpc
from edgetune.runtime.errors import EdgetuneError
from edgetune.runtime.security import ca as certs
from edgetune.runtime.security.access import Trust
from edgetune.runtime.security.authority import COORDINATOR_NAME
from edgetune.runtime.security.credentials import Credentials, fetch_pinned_ca
from edgetune.runtime.security.tokens import JoinToken
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import rpc, serde

log = logging.getLogger("edgetune.client")

# GetRoute may place shards and load blocks first: minutes on a cold cluster.
ROUTE_TIMEOUT_S = 600.0
EDGE_PART_TIMEOUT_S = 600.0


class CoordinatorError(EdgetuneError):
    """The coordinator refused a request or could not be reached."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class CoordinatorClient:
    """Calls to `edgetune coordinator` at `address` (HOST:PORT)."""

    def __init__(self, address: str, trust: Trust) -> None:
        self.address = address
        self.channel = rpc.make_channel(address, trust, peer=COORDINATOR_NAME)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def enroll(self, join: JoinToken, name: str, csr_pem: bytes, ips: Sequence[str]) -> wire.Enrolled:
        request = serde.enroll_request_to_pb(join.token_id, join.secret, name, csr_pem, ips)
        return serde.enrolled_from_pb(self._call("Enroll", self.stub.Enroll, request, rpc.UNARY_TIMEOUT_S))

    def renew(self, csr_pem: bytes, ips: Sequence[str]) -> wire.Enrolled:
        request = serde.renew_request_to_pb(csr_pem, ips)
        return serde.enrolled_from_pb(self._call("Renew", self.stub.Renew, request, rpc.UNARY_TIMEOUT_S))

    def join(self, name: str) -> wire.JoinReply:
        reply = self._call("Join", self.stub.Join, serde.join_request_to_pb(name), rpc.UNARY_TIMEOUT_S)
        return serde.join_reply_from_pb(reply)

    def get_route(self, model: str, failed: list[str] | None = None, timeout_s: float = ROUTE_TIMEOUT_S,
                  verify: bool = False, exclude: Sequence[str] = ()) -> wire.Route:
        """A route for `model`; `verify`: with a verifier replica of each stage (Route.verifiers);
        `exclude`: node names the edge banned, which the route must not use."""
        request = serde.route_request_to_pb(model, failed or [], verify, exclude)
        return serde.route_from_pb(self._call("GetRoute", self.stub.GetRoute, request, timeout_s))

    def status(self) -> wire.ClusterStatus:
        return serde.cluster_status_from_pb(self._call("Status", self.stub.Status, serde.status_request_to_pb(),
                                                       rpc.UNARY_TIMEOUT_S))

    def fetch_edge_part(self, model: str, timeout_s: float = EDGE_PART_TIMEOUT_S) -> wire.EdgePart:
        """Config, tokenizer, embeddings, final norm and LM head of `model`, from the cluster."""
        frames = self._call("FetchEdgePart", self.stub.FetchEdgePart, serde.edge_part_request_to_pb(model), timeout_s)
        try:
            return serde.read_edge_part(frames)
        except grpc.RpcError as e:
            raise self._error("FetchEdgePart", e) from None

    def close(self) -> None:
        self.channel.close()

    def _call(self, what: str, method, request, timeout_s: float):
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.RpcError) -> CoordinatorError:
        code = e.code()
        hint = ""
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = (" (is `edgetune coordinator` running there, and the port open? With TLS: does it run the CA your "
                    "credentials were issued by? A coordinator with a new state folder needs a new --join)")
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            hint = " (join with --join STRING from `edgetune token create`; under --insecure, pass its --token-file)"
        return CoordinatorError(f"coordinator {self.address}: {what} failed: {code.name}: {e.details()}{hint}", code.name)


def join_cluster(join: str, folder: Path, name: str, role: str, ips: Sequence[str] = ()) -> Credentials:
    """Redeem a join string for credentials in `folder` (kept for later runs).

    1. Fetch the CA from the coordinator's join port and check it against the string's pin
       (nothing secret is sent before this);
    2. over TLS verified with that CA, send the token and a CSR for a key made here;
    3. store key, certificate, CA and the coordinator's address.
    """
    token = JoinToken.parse(join)
    ca_pem = fetch_pinned_ca(token)
    key = certs.new_key()
    client = CoordinatorClient(token.address, Trust.verify_only(ca_pem))
    try:
        enrolled = client.enroll(token, name, certs.make_csr(key, name), ips)
    finally:
        client.close()
    got = certs.describe(enrolled.cert_pem)
    if got.role != role:
        raise CoordinatorError(f"the join string is for a {got.role}, not a {role}: ask for "
                               f"`edgetune token create --role {role}`", "PERMISSION_DENIED")
    if enrolled.ca_pem.strip() != ca_pem.strip():
        raise CoordinatorError("the coordinator answered with another CA than the pinned one", "UNAUTHENTICATED")
    log.info("joined as %s %r; credentials in %s", got.role, got.name, folder)
    return Credentials(Path(folder).expanduser(), enrolled.coordinator, ca_pem, enrolled.cert_pem, certs.key_pem(key)).save()


def credentials_for(role: str, folder: str | Path | None, join: str = "", name: str = "",
                    ips: Sequence[str] = ()) -> Credentials:
    """This process's credentials as `role`: joined now with `join` (unless `folder` already holds
    credentials from the same CA: running the same command twice joins once), else loaded from
    `folder` (default ~/.config/edgetune/<role>) and renewed when due."""
    from edgetune.runtime.security.credentials import default_credentials_dir

    folder = Path(folder).expanduser() if folder else default_credentials_dir(role)
    if join:
        token = JoinToken.parse(join)
        if (folder / "cert.pem").exists():
            held = Credentials.load(folder, role)
            if certs.fingerprint(held.ca_pem) == token.ca_fingerprint:
                log.info("%s already holds %s %r's credentials from this cluster: not joining again", folder,
                         role, held.info.name)
                return renew_if_due(held, ips)
        return join_cluster(join, folder, name, role, ips)
    return renew_if_due(Credentials.load(folder, role), ips)


def renew_if_due(creds: Credentials, ips: Sequence[str] = ()) -> Credentials:
    """The same credentials, or renewed ones (new key) once two thirds of the certificate's life are gone."""
    if not creds.needs_renewal():
        return creds
    key = certs.new_key()
    client = CoordinatorClient(creds.coordinator, creds.trust())
    try:
        enrolled = client.renew(certs.make_csr(key, creds.info.name), ips)
    finally:
        client.close()
    log.info("renewed the certificate of %r (valid until %s)", creds.info.name, certs.describe(enrolled.cert_pem).not_after)
    return Credentials(creds.folder, creds.coordinator, creds.ca_pem, enrolled.cert_pem, certs.key_pem(key)).save()


def save_edge_part(part: wire.EdgePart, folder: Path) -> Path:
    """Write a fetched edge part as a loadable Hugging Face folder (edge tensors only), atomically."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        for name, content in part.files.items():
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise EdgetuneError(f"edge part: refusing file name {name!r} from the coordinator")
            (tmp / name).write_bytes(content)
        save_file({n: t.contiguous() for n, t in part.tensors.items()}, str(tmp / "model.safetensors"))
        try:
            tmp.rename(folder)
        except OSError:  # another process fetched it first -- or something else is in the way
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "model.safetensors").exists():
                raise EdgetuneError(f"cannot store the model's edge part in {folder}: the folder exists "
                                    "without a model.safetensors; remove it and retry") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
