"""The coordinator's gRPC service: thin -- admit the caller, decode, call `Coordinator`, encode.

edgetune's exceptions become gRPC status codes (runtime/wire/rpc.py); anything else
is a bug and becomes INTERNAL with its message, never a crashed coordinator.

Who may call what (mutual TLS; under --insecure everyone may do everything):

    Enroll                      anyone holding a join token (the join port: no certificate yet)
    Join, Renew                 Join: nodes; Renew: nodes and edges, for their own identity
    GetRoute, FetchEdgePart     edges
    Status                      edges, nodes, and the operator (a coordinator-role certificate)
"""
from __future__ import annotations

import logging

from edgetune.coordinator.core import Coordinator
from edgetune.proto.v1 import coordinator_pb2_grpc
from edgetune.runtime.errors import EdgetuneError
from edgetune.runtime.security.access import Gatekeeper
from edgetune.runtime.wire import rpc, serde

log = logging.getLogger("edgetune.coordinator")


def _peer_ip(context) -> str:
    """The caller's IP from gRPC's peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.gate = Gatekeeper(coordinator.trust, coordinator.revoked)

    def Enroll(self, request, context):
        def enroll():
            token_id, secret, name, csr, ips = serde.enroll_request_from_pb(request)
            log.info("%r asks to enroll (from %s)", name, context.peer())
            return serde.enrolled_to_pb(self.coordinator.enroll(token_id, secret, name, csr, ips))
        return self._run(context, enroll)

    def Renew(self, request, context):
        def renew():
            peer = self.gate.admit(context, ("node", "edge"), "Renew")
            csr, ips = serde.renew_request_from_pb(request)
            return serde.enrolled_to_pb(self.coordinator.renew(peer, csr, ips))
        return self._run(context, renew)

    def Join(self, request, context):
        def join():
            peer = self.gate.admit(context, ("node",), "Join (only nodes join the Ray cluster)")
            name = serde.join_request_from_pb(request)
            log.info("node %r asks to join (from %s)", name, context.peer())
            return serde.join_reply_to_pb(self.coordinator.join(name, peer, _peer_ip(context)))
        return self._run(context, join)

    def GetRoute(self, request, context):
        def route():
            self.gate.admit(context, ("edge",), "GetRoute (only edges train)")
            ask = serde.route_request_from_pb(request)
            return serde.route_to_pb(self.coordinator.serve_route(ask.model, list(ask.failed), ask.verify, ask.exclude))
        return self._run(context, route)

    def Status(self, request, context):
        def status():
            self.gate.admit(context, ("edge", "node", "coordinator"), "Status")
            return serde.cluster_status_to_pb(self.coordinator.status())
        return self._run(context, status)

    def FetchEdgePart(self, request, context):
        def part():
            self.gate.admit(context, ("edge",), "FetchEdgePart")
            return self.coordinator.edge_part(serde.edge_part_request_from_pb(request))
        yield from serde.edge_part_frames(self._run(context, part))

    @staticmethod
    def _run(context, fn):
        try:
            return fn()
        except Exception as e:  # every failure becomes a status with a message
            if not isinstance(e, EdgetuneError):
                log.exception("coordinator call failed")
            rpc.abort(context, e)


def serve(coordinator: Coordinator, host: str, port: int, max_workers: int = 32, join_port: int | None = None):
    """Start the coordinator's server (with the health service); returns (server, bound port, bound
    join port or None). The join port (TLS only) asks callers for no certificate: joiners have none."""
    servicer = CoordinatorServicer(coordinator)
    return rpc.start_server(lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
                            coordinator.trust, host, port, "coordinator", max_workers, join_port=join_port)
