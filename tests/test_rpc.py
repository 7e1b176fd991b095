"""edgetune.runtime.wire.rpc: token files, token authentication on every kind of call, health,
and edgetune exceptions -> gRPC status codes, against a real in-process gRPC server."""
from __future__ import annotations

import stat

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgetune.proto.v1 import node_pb2, node_pb2_grpc
from edgetune.runtime import errors
from edgetune.runtime.errors import (
    ConfigError,
    DataError,
    EdgetuneError,
    ModelLoadError,
    SessionError,
    UnsupportedModelError,
    WireError,
)
from edgetune.runtime.security.access import Trust
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import rpc, serde

TOKEN = "s3cret-token"
T = 10.0  # per-call deadline in these tests, seconds


class FakeNode(node_pb2_grpc.NodeServicer):
    """Info answers a fixed NodeInfo (or raises `fail`); Session doubles each Forward's hidden."""

    fail: BaseException | None = None

    def Info(self, request, context):
        if self.fail is not None:
            rpc.abort(context, self.fail)
        return serde.node_info_to_pb(wire.NodeInfo("n1", model="m", start=0, end=3))

    def Session(self, request_iterator, context):
        try:
            for msg in serde.read_down(request_iterator):
                yield from serde.up_frames(wire.ForwardResult(msg.step, msg.micro, msg.hidden * 2), chunk_bytes=64)
        except EdgetuneError as exc:
            rpc.abort(context, exc)


@pytest.fixture(scope="module")
def server():
    node = FakeNode()
    srv = rpc.make_server(4, Trust.insecure(TOKEN))
    node_pb2_grpc.add_NodeServicer_to_server(node, srv)
    rpc.add_health(srv, ["edgetune.v1.Node"])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", node
    srv.stop(None)


@pytest.fixture
def address(server):
    server[1].fail = None
    return server[0]


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- authentication ------------------------------------------------------------------------
def test_call_without_token_is_unauthenticated(address):
    with grpc.insecure_channel(address) as channel:
        code, details = _code(lambda: node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=T))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing 'authorization: Bearer <token>'" in details and "/edgetune.v1.Node/Info" in details


def test_call_with_wrong_token_is_unauthenticated(address):
    with rpc.make_channel(address, Trust.insecure("not-" + TOKEN)) as channel:
        code, details = _code(lambda: node_pb2_grpc.NodeStub(channel).Info(serde.info_request_to_pb(), timeout=T))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong cluster token" in details
    assert TOKEN not in details


def test_hand_made_wrong_scheme_is_unauthenticated(address):
    with grpc.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        code, _ = _code(lambda: stub.Info(node_pb2.InfoRequest(), timeout=T, metadata=[("authorization", TOKEN)]))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_call_with_token_succeeds(address):
    with rpc.make_channel(address, Trust.insecure(TOKEN)) as channel:
        reply = node_pb2_grpc.NodeStub(channel).Info(serde.info_request_to_pb(), timeout=rpc.UNARY_TIMEOUT_S)
    assert serde.node_info_from_pb(reply) == wire.NodeInfo("n1", model="m", start=0, end=3)


def test_health_needs_the_token_and_reports_serving(address):
    with rpc.make_channel(address, Trust.insecure(TOKEN)) as channel:
        assert rpc.check_health(channel) == "SERVING"
        assert rpc.check_health(channel, "edgetune.v1.Node") == "SERVING"
        # Watch is unary -> stream: the token travels on streaming calls too
        first = next(iter(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=T)))
        assert first.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        code, _ = _code(lambda: rpc.check_health(channel))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=T)
        code, _ = _code(lambda: next(iter(watch)))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def _session_frames(hidden: torch.Tensor):
    return serde.down_frames(wire.Forward(1, 0, 0, False, None, hidden), chunk_bytes=64)


def test_bidirectional_stream_with_token(address):
    hidden = torch.randn(1, 4, 16)  # 256 bytes: 4 frames each way
    with rpc.make_channel(address, Trust.insecure(TOKEN)) as channel:
        replies = node_pb2_grpc.NodeStub(channel).Session(_session_frames(hidden), timeout=T)
        (result,) = serde.read_up(replies)
    assert torch.equal(result.hidden, hidden * 2)


def test_bidirectional_stream_without_token_is_unauthenticated(address):
    with grpc.insecure_channel(address) as channel:
        replies = node_pb2_grpc.NodeStub(channel).Session(_session_frames(torch.zeros(1, 1, 4)), timeout=T)
        code, _ = _code(lambda: list(replies))
    assert code == grpc.StatusCode.UNAUTHENTICATED


# -- errors -> status codes ------------------------------------------------------------------
def test_servicer_errors_reach_the_client_as_status_codes(address, server):
    with rpc.make_channel(address, Trust.insecure(TOKEN)) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        server[1].fail = SessionError("unknown session 's1'", "NOT_FOUND")
        assert _code(lambda: stub.Info(node_pb2.InfoRequest(), timeout=T)) == (grpc.StatusCode.NOT_FOUND, "unknown session 's1'")
        server[1].fail = RuntimeError("boom")
        assert _code(lambda: stub.Info(node_pb2.InfoRequest(), timeout=T)) == (grpc.StatusCode.INTERNAL, "RuntimeError: boom")
        replies = stub.Session(iter([node_pb2.Down()]), timeout=T)  # a malformed frame
        code, details = _code(lambda: list(replies))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Down frame with nothing set" in details


@pytest.mark.parametrize("exc, code", [
    (WireError("x"), "INVALID_ARGUMENT"),
    (ConfigError("x"), "INVALID_ARGUMENT"),
    (DataError("x"), "INVALID_ARGUMENT"),
    (UnsupportedModelError("x"), "FAILED_PRECONDITION"),
    (ModelLoadError("x"), "FAILED_PRECONDITION"),
    (SessionError("stale adapter version 3, have 4"), "FAILED_PRECONDITION"),
    (SessionError("unknown session", code="NOT_FOUND"), "NOT_FOUND"),
    (MemoryError(), "RESOURCE_EXHAUSTED"),
    (KeyError("k"), "INTERNAL"),
])
def test_status_code_for(exc, code):
    assert rpc.status_code_for(exc) == grpc.StatusCode[code]


def test_session_error_codes_are_grpc_status_names():
    assert errors.GRPC_STATUS_NAMES == {c.name for c in grpc.StatusCode}
    with pytest.raises(ValueError, match="gRPC status name"):
        SessionError("x", code="NOPE")
    with pytest.raises(ValueError, match="other than OK"):
        SessionError("x", code="OK")


def test_abort_passes_code_and_message():
    class Context:
        def abort(self, code, message):
            self.got = (code, message)
            raise grpc.RpcError()

    context = Context()
    with pytest.raises(grpc.RpcError):
        rpc.abort(context, DataError("record 3 of train.jsonl has no 'messages'"))
    assert context.got == (grpc.StatusCode.INVALID_ARGUMENT, "record 3 of train.jsonl has no 'messages'")


def test_timeouts_have_units_and_are_positive():
    timeouts = {k: v for k, v in vars(rpc).items() if k.endswith("_TIMEOUT_S")}
    assert {"UNARY_TIMEOUT_S", "SESSION_TIMEOUT_S"} <= set(timeouts)
    assert all(isinstance(v, float) and v > 0 for v in timeouts.values())


# -- the token file ---------------------------------------------------------------------------
def test_token_file_round_trip(tmp_path):
    path = tmp_path / "cfg" / "edgetune" / "token"
    token = rpc.write_token(path)
    assert len(token) >= 43 and rpc.load_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rpc.write_token(path) != token  # a fresh one each time
    path.chmod(0o644)
    rpc.write_token(path, "given")
    assert rpc.load_token(path) == "given" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_token_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"no cluster token at {tmp_path / 'missing'}: copy the coordinator's"):
        rpc.load_token(tmp_path / "missing")
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="token file .*empty is empty"):
        rpc.load_token(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read the cluster token at"):
        rpc.load_token(tmp_path)  # a folder
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read the cluster token"):
        rpc.load_token(tmp_path / "binary")
    with pytest.raises(ConfigError, match="non-empty"):
        rpc.write_token(tmp_path / "t", "")


def test_default_token_path_is_under_home():
    assert rpc.default_token_path().parts[-3:] == (".config", "edgetune", "token")


def test_empty_token_is_refused_for_servers_and_channels():
    with pytest.raises(ConfigError):
        rpc.make_server(1, Trust.insecure(""))
    with pytest.raises(ConfigError):
        rpc.make_channel("127.0.0.1:1", Trust(token=""))
