"""A node under bad input: every bad request gets a status or an ItemError with a message,
and the node keeps serving other sessions. Real gRPC on loopback, no Ray."""
from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
import torch

from edgetune.nodes.service import NodeLimits
from edgetune.nodes.shard import ShardSession
from edgetune.proto.v1 import node_pb2, node_pb2_grpc, tensor_pb2
from edgetune.runtime.errors import SessionError
from edgetune.runtime.peft import LoraConfig
from edgetune.runtime.peft.adapter import methods_to_json
from edgetune.runtime.security.access import Trust
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import rpc, serde
from edgetune.tests.node_harness import start_route
from edgetune.tests.tiny import make_tiny_folder

D = 32


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_folder("llama", folder)
    local = start_route(folder, [], tmp_path_factory.mktemp("tok"))  # one node with both blocks
    yield local
    local.stop()


class Session:
    """A raw session stream: send wire messages or raw frames, read assembled replies."""

    def __init__(self, local, token=None) -> None:
        self.q: queue.Queue = queue.Queue()
        self.channel = rpc.make_channel(local.route.hops[0].address, Trust.insecure(token or local.token))
        self.call = node_pb2_grpc.NodeStub(self.channel).Session(iter(self.q.get, None), timeout=30)
        self.replies = serde.read_up(self.call)

    def send(self, msg) -> None:
        for frame in serde.down_frames(msg):
            self.q.put(frame)

    def send_raw(self, frame) -> None:
        self.q.put(frame)

    def recv(self):
        return next(self.replies)

    def close(self) -> None:
        self.q.put(None)
        self.channel.close()


def _open(local, **kw) -> wire.Open:
    fields = dict(session_id="s", model=local.route.model, fingerprint=local.route.fingerprint,
                  route=list(local.route.hops), codec="fp32", methods_json=methods_to_json([LoraConfig(r=2)]))
    fields.update(kw)
    return wire.Open(**fields)


def _ready(local, push: bool = True) -> Session:
    """An opened session (holding adapter version 1 unless push=False)."""
    s = Session(local)
    s.send(_open(local))
    assert isinstance(s.recv(), wire.Opened)
    if push:
        s.send(wire.AdapterPush(1, {}))
    return s


def _fwd(version=1, shape=(1, 4, D)):
    return wire.Forward(0, 0, version, True, (0, 0, 0), torch.randn(*shape))


def _assert_healthy(local):
    """A well-formed session still works after the bad ones."""
    s = Session(local)
    s.send(_open(local, session_id="good"))
    assert isinstance(s.recv(), wire.Opened)
    for hop in range(len(local.route.hops)):  # one push per node of the route
        s.send(wire.AdapterPush(1, {}, hops_ahead=hop))
    s.send(_fwd())
    out = s.recv()
    assert isinstance(out, wire.ForwardResult) and out.hidden.shape == (1, 4, D)
    s.close()


def _status(s) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        while True:
            s.recv()
    return err.value


def test_wrong_token_is_unauthenticated(node):
    s = Session(node, token="not-the-token")
    s.send(_open(node))
    e = _status(s)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in e.details().lower()
    s.close()
    _assert_healthy(node)


def test_forward_before_open_is_an_unknown_session(node):
    s = Session(node)
    s.send(_fwd())
    e = _status(s)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "unknown session" in e.details()
    s.close()
    _assert_healthy(node)


def test_other_weights_are_refused(node):
    s = Session(node)
    s.send(_open(node, fingerprint="0" * 64))
    e = _status(s)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in e.details()
    s.close()
    _assert_healthy(node)


def test_truncated_tensor_bytes_end_the_session_with_invalid_argument(node):
    s = _ready(node)
    frame = next(serde.down_frames(_fwd()))
    frame.forward.tensors[0].payload = frame.forward.tensors[0].payload[:-7]
    s.send_raw(frame)
    s.send(_fwd())  # the next message begins while the previous one is incomplete
    e = _status(s)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in e.details()
    s.close()
    _assert_healthy(node)


def test_wrong_dtype_and_shape_and_stale_version_are_item_errors(node):
    s = _ready(node)
    s.send(_fwd(shape=(1, 4, D + 1)))
    err = s.recv()
    assert isinstance(err, wire.ItemError) and err.code == "INVALID_ARGUMENT" and f"(B, T, {D})" in err.message
    s.send(_fwd(version=7))
    err = s.recv()
    assert isinstance(err, wire.ItemError) and err.code == "FAILED_PRECONDITION" and "stale adapter version" in err.message
    s.send(wire.Backward(0, 5, torch.zeros(1, 4, D)))
    err = s.recv()
    assert isinstance(err, wire.ItemError) and "no activations" in err.message
    s.send(_fwd())  # the same session still serves a good request
    assert isinstance(s.recv(), wire.ForwardResult)
    s.close()


def test_wrong_dtype_ends_the_session_with_invalid_argument(node):
    s = _ready(node)
    frame = next(serde.down_frames(_fwd()))  # hidden states as int64, hand-built: serde refuses to send them
    ints = torch.arange(4 * D, dtype=torch.int64)
    header = frame.forward.tensors[0]
    header.dtype, header.codec, header.data_bytes = "int64", tensor_pb2.CODEC_RAW, ints.numel() * 8
    header.payload = ints.numpy().tobytes()
    s.send_raw(frame)
    e = _status(s)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be a float" in e.details()
    s.close()
    _assert_healthy(node)


def test_adapter_tensor_for_no_block_is_refused(node):
    s = _ready(node, push=False)
    s.send(wire.AdapterPush(1, {"0.99.self_attn.q_proj.lora_A": torch.zeros(2, D)}))
    err = s.recv()
    assert isinstance(err, wire.ItemError) and "names no method/block" in err.message
    s.close()


def test_oversized_frame_is_rejected_by_the_message_limit(node):
    s = _ready(node, push=False)
    big = node_pb2.Down()
    big.chunk.index = 0
    big.chunk.payload = b"\0" * (serde.MAX_FRAME_BYTES + 1024)
    s.send_raw(big)
    e = _status(s)
    assert e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED)
    s.close()
    _assert_healthy(node)


def test_malformed_methods_are_refused(node):
    s = Session(node)
    s.send(_open(node, methods_json='[{"type": "Nope", "fields": {}}]'))
    e = _status(s)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed PEFT method" in e.details()
    s.close()


def test_info_and_health(node):
    from edgetune.proto.v1 import node_pb2

    with rpc.make_channel(node.route.hops[0].address, node.trust) as channel:
        info = serde.node_info_from_pb(node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=5))
        assert (info.start, info.end, info.fingerprint) == (0, 2, node.route.fingerprint)
        assert info.loaded_bytes == sum(p.numel() * 4 for p in node.shards[0].part.parameters())
        assert rpc.check_health(channel) == "SERVING"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chain")
    make_tiny_folder("llama", folder)
    local = start_route(folder, [1], tmp_path_factory.mktemp("tok-chain"))  # node-0 [0, 1), node-1 [1, 2)
    yield local
    local.stop()


def _lora(layer: int) -> dict[str, torch.Tensor]:
    return {f"0.{layer}.self_attn.q_proj.lora_A": torch.randn(2, D), f"0.{layer}.self_attn.q_proj.lora_B": torch.randn(D, 2)}


def test_a_later_nodes_push_passes_the_first_node_unopened(chain, monkeypatch):
    """node-1's adapter tensors cross node-0 as frames: decoded once, by node-1, which then serves them."""
    decoded = []
    real = serde._decode_tensor
    monkeypatch.setattr(serde, "_decode_tensor", lambda h, p: decoded.append(h.name) or real(h, p))
    s = _ready(chain, push=False)
    s.send(wire.AdapterPush(1, _lora(1), hops_ahead=1))
    s.send(wire.AdapterPush(1, _lora(0)))
    s.send(_fwd())
    out = s.recv()
    assert isinstance(out, wire.ForwardResult) and out.hidden.shape == (1, 4, D)
    names = sorted(n for n in decoded if n.startswith("0."))
    assert names == sorted([*_lora(0), *_lora(1)])  # each once: node-0 never decoded node-1's
    s.close()


def test_pushes_addressed_wrongly_are_refused(chain):
    s = _ready(chain, push=False)
    s.send(wire.AdapterPush(1, _lora(1)))  # node-1's tensors, addressed to node-0
    err = s.recv()
    assert isinstance(err, wire.ItemError) and err.code == "INVALID_ARGUMENT" and "serves [0, 1)" in err.message
    s.send(wire.AdapterPush(1, _lora(1), hops_ahead=2))  # past the last node
    e = _status(s)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "past node" in e.details()
    s.close()
    _assert_healthy(chain)


def test_input_gradients_come_back_only_when_asked_for(chain):
    """The edge needs dL/d(input) only for prompt tuning: a Backward that does not ask gets a
    BackwardResult without a tensor, through both nodes (node-0 still gets node-1's)."""
    s = _ready(chain, push=False)
    for hop in (1, 0):
        s.send(wire.AdapterPush(1, _lora(hop), hops_ahead=hop))
    for micro, wanted in enumerate((False, True)):
        s.send(wire.Forward(0, micro, 1, True, (0, 0, micro), torch.randn(1, 4, D)))
        out = s.recv()
        assert isinstance(out, wire.ForwardResult)
        s.send(wire.Backward(0, micro, torch.randn_like(out.hidden), input_grad=wanted))
        back = s.recv()
        assert isinstance(back, wire.BackwardResult) and back.micro == micro
        assert (back.grad is None) == (not wanted)
        if wanted:
            assert back.grad.shape == (1, 4, D) and back.grad.abs().sum() > 0
    s.close()


def test_a_forward_that_overtakes_its_push_waits_for_it(chain):
    """The edge sends node-1's push after the first forward, so node-0's output may reach node-1
    before node-1's push does: node-1 holds it until its push is there, and the result is the
    same as with the push first."""
    torch.manual_seed(0)
    lora0, lora1, hidden = _lora(0), _lora(1), torch.randn(1, 4, D)
    outs = []
    for push_first in (True, False):
        s = _ready(chain, push=False)
        s.send(wire.AdapterPush(1, lora0))
        if push_first:
            s.send(wire.AdapterPush(1, lora1, hops_ahead=1))
        s.send(wire.Forward(0, 0, 1, True, (0, 0, 0), hidden))
        if not push_first:
            s.send(wire.AdapterPush(1, lora1, hops_ahead=1))
        out = s.recv()
        assert isinstance(out, wire.ForwardResult)
        outs.append(out.hidden)
        s.close()
    assert torch.equal(outs[0], outs[1])


def test_forwards_waiting_for_a_push_that_never_comes_are_bounded(node):
    from edgetune.nodes.service import MAX_PARKED

    s = _ready(node)  # holds version 1
    for micro in range(MAX_PARKED + 1):  # version 2 is never pushed
        s.send(wire.Forward(0, micro, 2, True, (0, 0, micro), torch.randn(1, 4, D)))
    err = s.recv()
    assert isinstance(err, wire.ItemError) and err.micro == MAX_PARKED and "wait for adapter version 2" in err.message
    s.send(wire.AdapterPush(2, {}))  # the push arrives after all: the waiting ones run
    results = [s.recv() for _ in range(MAX_PARKED)]
    assert sorted(r.micro for r in results if isinstance(r, wire.ForwardResult)) == list(range(MAX_PARKED))
    s.close()
    _assert_healthy(node)


def test_an_end_step_for_another_version_is_not_taken_for_lost_activations(node):
    s = _ready(node)  # holds version 1
    s.send(wire.EndStep(0, 5))
    err = s.recv()
    assert isinstance(err, wire.ItemError) and err.code == "ABORTED" and "EndStep for adapter version 5" in err.message
    s.send(_fwd())  # the session still serves
    assert isinstance(s.recv(), wire.ForwardResult)
    s.close()


# -- overload: more sessions or frames than a node accepts -------------------------------------
LIMITS = NodeLimits(max_sessions=2, max_pending=8, max_pending_bytes=128 << 10)


@pytest.fixture
def capped(tiny_dir, tmp_path):
    """A fresh node (both blocks) that accepts 2 sessions, each with 8 messages or 128 KiB queued."""
    local = start_route(tiny_dir("llama"), [], tmp_path, limits=LIMITS)
    yield local
    local.stop()


def _opened(local, session_id: str) -> Session:
    s = Session(local)
    s.send(_open(local, session_id=session_id))
    assert isinstance(s.recv(), wire.Opened)
    return s


def _opened_when_free(local, session_id: str, deadline_s: float = 5.0) -> Session:
    """A session opened once the node has room (the server forgets a closed session a moment after it ends)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return _opened(local, session_id)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _serves(s: Session) -> None:
    s.send(wire.AdapterPush(1, {}))
    s.send(_fwd())
    out = s.recv()
    assert isinstance(out, wire.ForwardResult) and out.hidden.shape == (1, 4, D)


def test_a_session_beyond_the_cap_is_refused_while_unary_calls_still_answer(capped):
    held = [_opened(capped, f"held-{i}") for i in range(LIMITS.max_sessions)]
    extra = Session(capped)
    extra.send(_open(capped, session_id="extra"))
    e = _status(extra)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "holds 2 sessions" in e.details() and "max_sessions=2" in e.details() and "retry" in e.details()
    extra.close()
    with rpc.make_channel(capped.route.hops[0].address, capped.trust) as channel:  # a thread is left for these
        assert rpc.check_health(channel) == "SERVING"
        info = serde.node_info_from_pb(node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=5))
        assert info.sessions == LIMITS.max_sessions
    held[0].close()  # ends its stream
    held[1].call.cancel()  # goes away mid-session
    held[1].channel.close()
    fresh = [_opened_when_free(capped, f"fresh-{i}") for i in range(LIMITS.max_sessions)]  # both places came back
    _serves(fresh[0])
    for s in fresh:
        s.close()


@pytest.mark.parametrize("tokens, over", [(4, "messages wait for its compute (at most 8)"),
                                          (256, "MiB wait in its queues")])
def test_a_session_sending_faster_than_the_node_computes_ends_and_others_go_on(capped, monkeypatch, tokens, over):
    """The node's compute for session "flood" is held: its forwards pile up until a limit ends it
    (8 small messages, or 128 KiB of 32 KiB forwards); session "other" keeps being served meanwhile."""
    release = threading.Event()
    forward = ShardSession.forward

    def held_for_flood(self, msg):
        if self.session_id == "flood":  # then fails: no torch left running when the test's node stops
            release.wait(10)
            raise SessionError("held by the test", code="ABORTED")
        return forward(self, msg)

    monkeypatch.setattr(ShardSession, "forward", held_for_flood)
    try:
        other = _opened(capped, "other")
        flood = _opened(capped, "flood")
        flood.send(wire.AdapterPush(1, {}))
        for micro in range(LIMITS.max_pending + 2):
            flood.send(wire.Forward(0, micro, 1, True, (0, 0, micro), torch.randn(1, tokens, D)))
        e = _status(flood)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and over in e.details()
        assert "sends faster than the node computes" in e.details()
        _serves(other)  # while the flood's compute is still held
    finally:
        release.set()
    flood.close()
    other.close()
    after = _opened_when_free(capped, "after")  # the ended session gave its place back
    _serves(after)
    after.close()


# -- found by fuzzing (tests/fuzz, issue 14) ----------------------------------------------------
def _fitting(methods: str):
    """A push per case of test_an_adapter_that_does_not_fit_its_methods_is_refused."""
    from edgetune.runtime.peft import PrefixTuningConfig, SerialAdapterConfig

    return {
        "lora": [LoraConfig(r=2)], "prefix": [PrefixTuningConfig(num_virtual_tokens=2)],
        "serial": [SerialAdapterConfig(bottleneck_size=4)],
    }[methods]


@pytest.mark.parametrize("methods, push, refused_by, message", [
    # the fuzzer's input renamed q_proj.lora_B: the forward raised KeyError (INTERNAL)
    ("lora", {"0.0.self_attn.q_proj.lora_A": torch.zeros(2, D)}, "forward", "lacks 'self_attn.q_proj.lora_B'"),
    ("lora", {"0.0.self_attn.q_9roj.lora_B": torch.zeros(D, 2)}, "push", "'0.0.self_attn.q_9roj.lora_B' of shape"),
    # a rank the config does not have: torch's shape mismatch in forward (INTERNAL)
    ("lora", {"0.0.self_attn.q_proj.lora_A": torch.zeros(3, D), "0.0.self_attn.q_proj.lora_B": torch.zeros(D, 3)},
     "push", "of shape (3, 32) (expected (2, 32))"),
    # the fuzzer's input pushed LoRA tensors to a prefix-tuning session: KeyError 'prefix_key' (INTERNAL)
    ("prefix", {}, "push", "'0.0.prefix_key' missing"),
    # ... and half a serial adapter: KeyError 'attn_adapter.up.bias' (INTERNAL)
    ("serial", {"0.0.attn_adapter.down.weight": torch.zeros(4, D), "0.0.attn_adapter.down.bias": torch.zeros(4)},
     "forward", "lacks 'attn_adapter.up.weight'"),
])
def test_an_adapter_that_does_not_fit_its_methods_is_refused(node, methods, push, refused_by, message):
    s = Session(node)
    s.send(_open(node, methods_json=methods_to_json(_fitting(methods))))
    assert isinstance(s.recv(), wire.Opened)
    s.send(wire.AdapterPush(1, push))
    if refused_by == "forward":
        s.send(_fwd())
    err = s.recv()
    assert isinstance(err, wire.ItemError) and err.code == "INVALID_ARGUMENT" and message in err.message, err
    s.close()
    _assert_healthy(node)


def test_a_relayed_push_before_open_is_refused(node):
    """Found by fuzzing: the reader waited for the worker to handle an Open, the worker for a first
    message -- a session that never ended."""
    frames = list(serde.down_frames(wire.AdapterPush(1, {}, hops_ahead=1)))
    with rpc.make_channel(node.route.hops[0].address, Trust.insecure(node.token)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(node_pb2_grpc.NodeStub(channel).Session(iter(frames), timeout=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "before the session's Open" in err.value.details()
