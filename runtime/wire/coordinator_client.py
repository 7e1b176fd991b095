"""The edge's (and `edgetune node`/`status`'s) client for the coordinator service.

Every call carries the shared token and a deadline. gRPC failures become
edgetune errors whose message names the coordinator and what went wrong.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import grpc

from edgetune.proto.v1 import coordinator_pb2_grpc
from edgetune.runtime.errors import EdgetuneError
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

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.channel = rpc.make_channel(address, token)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def join(self, name: str) -> wire.JoinReply:
        reply = self._call("Join", self.stub.Join, serde.join_request_to_pb(name), rpc.UNARY_TIMEOUT_S)
        return serde.join_reply_from_pb(reply)

    def get_route(self, model: str, failed: list[str] | None = None, timeout_s: float = ROUTE_TIMEOUT_S) -> wire.Route:
        request = serde.route_request_to_pb(model, failed or [])
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
            hint = " (is `edgetune coordinator` running there, and the port open?)"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            hint = " (use the coordinator's token file: --token-file)"
        return CoordinatorError(f"coordinator {self.address}: {what} failed: {code.name}: {e.details()}{hint}", code.name)


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
