"""The coordinator's gRPC service: thin -- decode, call `Coordinator`, encode.

edgetune's exceptions become gRPC status codes (runtime/wire/rpc.py); anything else
is a bug and becomes INTERNAL with its message, never a crashed coordinator.
"""
from __future__ import annotations

import logging

from edgetune.coordinator.core import Coordinator
from edgetune.proto.v1 import coordinator_pb2_grpc
from edgetune.runtime.errors import EdgetuneError
from edgetune.runtime.wire import rpc, serde

log = logging.getLogger("edgetune.coordinator")


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def Join(self, request, context):
        name = serde.join_request_from_pb(request)
        log.info("node %r asks to join (from %s)", name, context.peer())
        return self._run(context, lambda: serde.join_reply_to_pb(self.coordinator.join(name)))

    def GetRoute(self, request, context):
        model, failed = serde.route_request_from_pb(request)
        return self._run(context, lambda: serde.route_to_pb(self.coordinator.route(model, failed)))

    def Status(self, request, context):
        return self._run(context, lambda: serde.cluster_status_to_pb(self.coordinator.status()))

    def FetchEdgePart(self, request, context):
        model = serde.edge_part_request_from_pb(request)
        part = self._run(context, lambda: self.coordinator.edge_part(model))
        yield from serde.edge_part_frames(part)

    @staticmethod
    def _run(context, fn):
        try:
            return fn()
        except Exception as e:  # every failure becomes a status with a message
            if not isinstance(e, EdgetuneError):
                log.exception("coordinator call failed")
            rpc.abort(context, e)


def serve(coordinator: Coordinator, host: str, port: int, max_workers: int = 32):
    """Start the coordinator's server (with the health service); returns (server, bound port)."""
    servicer = CoordinatorServicer(coordinator)
    return rpc.start_server(lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
                            coordinator.token, host, port, "coordinator", max_workers)
