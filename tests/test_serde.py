"""edgetune.runtime.wire.serde: wire dataclasses <-> protobuf frames, codecs, chunking, hostile input.

References are independent of serde: torch's own .half()/.bfloat16() for the cast codecs,
a numpy blockwise-absmax bound for int8, and hand-built protobuf messages for every
malformed-input case. Every frame crosses a real SerializeToString/FromString.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgetune.proto.v1 import coordinator_pb2, node_pb2, tensor_pb2
from edgetune.runtime.errors import WireError
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import serde


def _over_wire(frames):
    """Each frame serialized and parsed back, as a peer would receive it."""
    return [type(f).FromString(f.SerializeToString()) for f in frames]


def _down(msg, **kw):
    frames = _over_wire(serde.down_frames(msg, **kw))
    (out,) = serde.read_down(frames)
    return out, frames


def _up(msg, **kw):
    frames = _over_wire(serde.up_frames(msg, **kw))
    (out,) = serde.read_up(frames)
    return out, frames


def _assert_tensors_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


HOPS = [wire.Hop("a", "10.0.0.1:7000", 0, 3), wire.Hop("b", "10.0.0.2:7000", 3, 6)]
ADAPTER = {
    "lora.0.self_attn.q_proj.lora_A": torch.randn(4, 16),
    "lora.0.self_attn.q_proj.lora_B": torch.randn(16, 4, dtype=torch.bfloat16),
    "ia3.5.mlp.down_proj.ia3_l": torch.randn(32, dtype=torch.float16),
    "bitfit.1.bias": torch.randn(0),
}


# -- round trips: every message kind ------------------------------------------------------
def test_open_round_trip():
    msg = wire.Open("s1", "smollm2", "ab" * 32, HOPS, codec="int8", methods_json='[{"method": "lora"}]',
                    owner="alice", micro_batch_size=4, seq_len=256, micro_batches=2)
    out, frames = _down(msg)
    assert out == msg and len(frames) == 1


def test_adapter_push_is_exact_whatever_the_activation_codec():
    out, _ = _down(wire.AdapterPush(7, ADAPTER), codec="int8")
    assert out.version == 7
    _assert_tensors_equal(out.tensors, ADAPTER)


def test_adapter_codec_is_lossy_only_when_asked():
    out, _ = _down(wire.AdapterPush(1, ADAPTER), adapter_codec="bf16")
    for k, t in ADAPTER.items():
        assert out.tensors[k].dtype == t.dtype
        assert torch.equal(out.tensors[k], t.bfloat16().to(t.dtype)), k


@pytest.mark.parametrize("dropout_key", [(11, 12), None])
def test_forward_round_trip(dropout_key):
    hidden, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    msg = wire.Forward(3, 1, 9, True, dropout_key, hidden, mask)
    out, _ = _down(msg)
    assert (out.step, out.micro, out.version, out.train, out.dropout_key) == (3, 1, 9, True, dropout_key)
    _assert_tensors_equal({"h": out.hidden, "m": out.attention_mask}, {"h": hidden, "m": mask})
    out, _ = _down(wire.Forward(0, 0, 0, False, None, hidden))
    assert out.attention_mask is None and torch.equal(out.hidden, hidden)


def test_backward_and_end_step_round_trip():
    grad = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    out, _ = _down(wire.Backward(4, 2, grad))
    assert (out.step, out.micro) == (4, 2) and torch.equal(out.grad, grad) and out.input_grad
    assert not _down(wire.Backward(4, 2, grad, input_grad=False))[0].input_grad
    assert _down(wire.EndStep(4, 5))[0] == wire.EndStep(4, 5)


def test_up_messages_round_trip():
    assert _up(wire.Opened(HOPS))[0] == wire.Opened(HOPS)
    hidden = torch.randn(2, 3, 8)
    out, _ = _up(wire.ForwardResult(1, 0, hidden))
    assert (out.step, out.micro) == (1, 0) and torch.equal(out.hidden, hidden)
    out, _ = _up(wire.BackwardResult(1, 1, hidden))
    assert (out.step, out.micro) == (1, 1) and torch.equal(out.grad, hidden)
    assert _up(wire.BackwardResult(1, 1, None))[0] == wire.BackwardResult(1, 1, None)  # not asked for: no tensor
    timings = [wire.StageTiming("a", 0.5, 1.25, 100, 200), wire.StageTiming("b")]
    out, _ = _up(wire.Gradients(2, 3, ADAPTER, timings), codec="int8")
    assert (out.step, out.version, out.timings) == (2, 3, timings)
    _assert_tensors_equal(out.tensors, ADAPTER)
    err = wire.ItemError("FAILED_PRECONDITION", "no activations for step 2 micro 1", "b", 2, 1)
    assert _up(err)[0] == err


# -- codecs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_codec_is_exact(dtype):
    hidden = torch.randn(2, 7, 24).to(dtype)
    out, _ = _down(wire.Backward(0, 0, hidden), codec="fp32")
    assert out.grad.dtype == dtype and torch.equal(out.grad, hidden)


@pytest.mark.parametrize("codec, cast, eps", [("fp16", torch.Tensor.half, 2**-11), ("bf16", torch.Tensor.bfloat16, 2**-8)])
def test_half_codecs_match_torch_conversion(codec, cast, eps):
    hidden = torch.randn(2, 7, 24)
    out, _ = _down(wire.Forward(0, 0, 0, False, None, hidden), codec=codec)
    assert out.hidden.dtype == torch.float32 and out.hidden.shape == hidden.shape
    assert torch.equal(out.hidden, cast(hidden).float())
    # and within the format's precision: relative rounding error at most eps (round to nearest)
    assert ((out.hidden - hidden).abs() <= eps * hidden.abs() + 1e-30).all()


def _int8_bound(x: np.ndarray, block: int) -> np.ndarray:
    """Per-element error bound of blockwise absmax int8: half a quantization step of its block."""
    flat = x.astype(np.float64).reshape(-1)
    n = flat.size
    padded = np.zeros(-(-n // block) * block)
    padded[:n] = flat
    step = np.abs(padded.reshape(-1, block)).max(axis=1) / 127
    return np.repeat(step / 2, block)[:n]


@pytest.mark.parametrize("shape, block", [((2, 5, 64), 64), ((1, 3, 50), 64), ((2, 4, 30), 7), ((1, 1, 5), 1000)])
def test_int8_error_within_half_a_step_per_block(shape, block):
    torch.manual_seed(0)
    hidden = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # blocks of very different magnitudes
    out, _ = _down(wire.Forward(0, 0, 0, False, None, hidden), codec="int8", block_size=block)
    assert out.hidden.dtype == torch.float32 and out.hidden.shape == hidden.shape
    err = (out.hidden.double() - hidden.double()).abs().reshape(-1).numpy()
    bound = _int8_bound(hidden.numpy(), block)
    assert (err <= bound * (1 + 1e-5) + 1e-12).all(), (err - bound).max()


def test_int8_zero_blocks_decode_to_zero_without_nan():
    hidden = torch.zeros(1, 2, 128)
    hidden[0, 1, 64:] = torch.randn(64)  # block 3 nonzero, blocks 0-2 all zero
    out, _ = _down(wire.Backward(0, 0, hidden), codec="int8")
    assert not out.grad.isnan().any()
    assert torch.equal(out.grad[0, 0], torch.zeros(128)) and torch.equal(out.grad[0, 1, :64], torch.zeros(64))


def test_int8_keeps_the_original_dtype_and_masks_stay_exact():
    hidden = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out, _ = _down(wire.Forward(0, 0, 0, False, None, hidden, mask), codec="int8")
    assert out.hidden.dtype == torch.bfloat16
    assert out.attention_mask.dtype == torch.int64 and torch.equal(out.attention_mask, mask)


def test_codec_payload_sizes():
    hidden = torch.randn(4, 32, 512)  # 65536 elements, 256 KiB in fp32
    n = hidden.numel()

    def payload(codec):
        frames = list(serde.down_frames(wire.Backward(0, 0, hidden), codec=codec))
        (t,) = frames[0].backward.tensors
        return t.data_bytes + t.scale_bytes, sum(serde.frame_bytes(f) for f in frames)

    fp32, fp32_wire = payload("fp32")
    assert fp32 == 4 * n
    for codec in ("fp16", "bf16"):
        size, on_wire = payload(codec)
        assert size == fp32 // 2 and on_wire == pytest.approx(fp32_wire / 2, rel=0.01)
    size, on_wire = payload("int8")
    assert size == n + 4 * n // 64  # 0.25x + one fp32 scale per 64 elements
    assert size / fp32 == pytest.approx(0.265625) and on_wire / fp32_wire == pytest.approx(0.265625, rel=0.01)


# -- chunking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_tiny_chunks_reassemble_exactly(codec):
    msgs = [
        wire.AdapterPush(1, ADAPTER),
        wire.Forward(1, 0, 1, True, (5,), torch.randn(2, 9, 16), torch.ones(2, 9, dtype=torch.int64)),
        wire.EndStep(1, 1),
        wire.Backward(1, 0, torch.randn(2, 9, 16)),
    ]
    frames = _over_wire(f for m in msgs for f in serde.down_frames(m, codec=codec, chunk_bytes=100))
    assert len(frames) > 15  # many more frames than messages
    for f in frames:  # no frame carries more than chunk_bytes of payload
        tensors = f.chunk.payload if f.WhichOneof("kind") == "chunk" else b"".join(
            t.payload for t in getattr(getattr(f, f.WhichOneof("kind")), "tensors", []))
        assert len(tensors) <= 100
    out = list(serde.read_down(frames))
    assert [type(m) for m in out] == [type(m) for m in msgs]
    _assert_tensors_equal(out[0].tensors, ADAPTER)
    assert torch.equal(out[1].attention_mask, msgs[1].attention_mask)
    ref_out, _ = _down(msgs[1], codec=codec)  # one big frame decodes to the same values
    assert torch.equal(out[1].hidden, ref_out.hidden)


def test_feed_returns_the_message_only_with_its_last_chunk():
    frames = list(serde.up_frames(wire.ForwardResult(0, 0, torch.randn(1, 4, 64)), chunk_bytes=256))
    assembler = serde.Assembler("up")
    results = [assembler.feed(f) for f in frames]
    assert len(frames) == 4 and results[:-1] == [None] * 3 and isinstance(results[-1], wire.ForwardResult)


def test_pass_through_relays_frames_unopened_with_the_same_checks(monkeypatch):
    """A message picked for pass-through comes back frame by frame as Opaque: the very frames,
    first and last marked, nothing decoded; its sizes and order are checked like any other."""
    push = wire.AdapterPush(3, {"0.1.a": torch.randn(300), "0.1.b": torch.randn(40)}, delta=True, hops_ahead=1)
    frames = _over_wire(serde.down_frames(push, chunk_bytes=256, adapter_codec="int8"))
    frames += _over_wire(serde.down_frames(wire.EndStep(3, 3)))
    decoded = []
    real = serde._decode_tensor
    monkeypatch.setattr(serde, "_decode_tensor", lambda h, p: decoded.append(h.name) or real(h, p))
    assembler = serde.Assembler("down", pass_through=lambda kind, h: kind == "adapter" and h.hops_ahead > 0)
    out = [assembler.feed(f) for f in frames]
    assembler.close()
    opaque, end = out[:-1], out[-1]
    assert len(opaque) == len(frames) - 1 > 2 and all(isinstance(o, serde.Opaque) for o in opaque)
    assert [o.frame for o in opaque] == frames[:-1]
    assert [(o.first, o.last) for o in opaque] == [(True, False)] + [(False, False)] * (len(opaque) - 2) + [(False, True)]
    assert opaque[0].kind == "adapter" and opaque[0].header.hops_ahead == 1 and opaque[0].header.version == 3
    assert decoded == [] and end == wire.EndStep(3, 3)
    # the relayed frames are the message: what the node they are for decodes is what was sent
    relayed = [type(f).FromString(f.SerializeToString()) for f in frames[:-1]]
    relayed[0].adapter.hops_ahead = 0
    (got,) = serde.read_down(relayed)
    assert got.delta and got.hops_ahead == 0 and got.tensors.keys() == push.tensors.keys()
    # hostile input is refused in pass-through too
    assembler = serde.Assembler("down", pass_through=lambda kind, h: True)
    assembler.feed(frames[0])
    with pytest.raises(WireError, match="truncated AdapterPush"):
        assembler.close()
    long_chunk = _chunk(frames[1].chunk.index, frames[1].chunk.payload + bytes(4096))
    with pytest.raises(WireError, match="longer than declared"):
        _feed([frames[0], long_chunk], pass_through=lambda kind, h: True)


def test_edge_part_round_trip_with_split_files():
    files = {"config.json": b'{"a": 1}', "tokenizer.json": bytes(range(256)) * 5, "empty.txt": b""}
    tensors = {"embed_tokens.weight": torch.randn(50, 8, dtype=torch.bfloat16), "norm.weight": torch.randn(8)}
    frames = _over_wire(serde.edge_part_frames(wire.EdgePart(files, tensors), chunk_bytes=100))
    assert sum(f.WhichOneof("kind") == "file" for f in frames) == 1 + 13 + 1
    part = serde.read_edge_part(frames)
    assert part.files == files
    _assert_tensors_equal(part.tensors, tensors)


def test_channel_options_fit_a_frame():
    opts = dict(serde.channel_options())
    assert opts["grpc.max_receive_message_length"] == opts["grpc.max_send_message_length"] > serde.CHUNK_BYTES
    big = list(serde.down_frames(wire.AdapterPush(0, {f"t{i}": torch.randn(1000) for i in range(600)})))
    assert max(serde.frame_bytes(f) for f in big) < opts["grpc.max_receive_message_length"]


# -- unary messages ------------------------------------------------------------------------
def _pb_round_trip(pb):
    return type(pb).FromString(pb.SerializeToString())


def test_unary_round_trips():
    info = wire.NodeInfo("a", "smollm2", "f" * 64, 0, 3, "cuda:0", 2, 17, 123456789, 0.25,
                         [wire.SessionInfo("s1", "alice", 1 << 20), wire.SessionInfo("s2", "bob")], 5 << 30)
    assert serde.node_info_from_pb(_pb_round_trip(serde.node_info_to_pb(info))) == info
    route = wire.Route("smollm2", "f" * 64, HOPS, 6, [wire.ManifestEntry("layers.0.w", "bfloat16", (8, 16), "0" * 64)])
    assert serde.route_from_pb(_pb_round_trip(serde.route_to_pb(route))) == route
    status = wire.ClusterStatus("10.0.0.1:6379", [
        wire.NodeStatus("a", "ray1", "10.0.0.1", True, "cuda", "H100", 80 << 30, 16, 8, 0.01, 1e9, HOPS[:1], info, "bf16", "nf4"),
        wire.NodeStatus("b", alive=False),
    ], ["smollm2"])
    assert serde.cluster_status_from_pb(_pb_round_trip(serde.cluster_status_to_pb(status))) == status
    reply = wire.JoinReply("10.0.0.1:6379", "tok", "token", b"-----BEGIN CERT", b"-----BEGIN KEY", b"-----BEGIN CA")
    assert serde.join_reply_from_pb(_pb_round_trip(serde.join_reply_to_pb(reply))) == reply
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\nMII...\n"
    enroll = serde.enroll_request_to_pb("abcd1234", "s3cret", "gpu-1", pem, ["198.18.0.2"])
    assert serde.enroll_request_from_pb(_pb_round_trip(enroll)) == ("abcd1234", "s3cret", "gpu-1", pem, ["198.18.0.2"])
    assert serde.renew_request_from_pb(_pb_round_trip(serde.renew_request_to_pb(pem, []))) == (pem, [])
    enrolled = wire.Enrolled(pem, pem, "10.0.0.1:7700")
    assert serde.enrolled_from_pb(_pb_round_trip(serde.enrolled_to_pb(enrolled))) == enrolled
    assert serde.join_request_from_pb(_pb_round_trip(serde.join_request_to_pb("node-7"))) == "node-7"
    got = serde.route_request_from_pb(_pb_round_trip(serde.route_request_to_pb("smollm2", ["10.0.0.2:7000"])))
    assert got == wire.RouteRequest("smollm2", ("10.0.0.2:7000",))
    request = serde.route_request_to_pb("smollm2", [], verify=True, exclude=["node-1"])
    assert serde.route_request_from_pb(_pb_round_trip(request)) == wire.RouteRequest("smollm2", (), True, ("node-1",))
    assert serde.edge_part_request_from_pb(_pb_round_trip(serde.edge_part_request_to_pb("smollm2"))) == "smollm2"


# -- hostile input -------------------------------------------------------------------------
def _tensor(name="hidden", dtype="float32", shape=(1, 2, 4), codec=tensor_pb2.CODEC_RAW, itemsize=4, **kw):
    n = math.prod(shape)
    fields = dict(name=name, dtype=dtype, shape=list(shape), codec=codec, data_bytes=n * itemsize)
    fields.update(kw)
    fields.setdefault("payload", bytes(fields["data_bytes"] + fields.get("scale_bytes", 0)))
    return tensor_pb2.Tensor(**fields)


def _mask(shape, **kw):
    return _tensor(name="attention_mask", dtype="int64", shape=shape, itemsize=8, **kw)


def _chunk(index, payload):
    return node_pb2.Down(chunk=tensor_pb2.TensorChunk(index=index, payload=payload))


def _forward(*tensors):
    return node_pb2.Down(forward=node_pb2.Forward(step=1, tensors=list(tensors)))


def _feed(frames, kind="down", **limits):
    assembler = serde.Assembler(kind, **limits)
    out = [assembler.feed(type(f).FromString(f.SerializeToString())) for f in frames]
    assembler.close()
    return out


def test_hand_built_frames_decode():  # the baseline the hostile cases below deviate from
    (msg,) = _feed([_forward(_tensor())])
    assert torch.equal(msg.hidden, torch.zeros(1, 2, 4))
    first = _forward(_tensor(payload=bytes(10)))
    (_, msg) = _feed([first, _chunk(0, bytes(22))])
    assert msg.hidden.shape == (1, 2, 4)


HOSTILE = {
    "unknown dtype": ([_forward(_tensor(dtype="complex64"))], "unknown dtype 'complex64'"),
    "unknown codec": ([_forward(_tensor(codec=42))], "unknown codec 42"),
    "negative shape": ([_forward(_tensor(shape=(1, -2, 4), data_bytes=0))], r"invalid shape \[1, -2, 4\]"),
    "absurd rank": ([_forward(_tensor(shape=(1,) * 40))], "invalid shape"),
    "absurd size": ([_forward(_tensor(shape=(1 << 40, 1 << 40, 4), data_bytes=0))], "over the limit"),
    "bytes vs elements": ([_forward(_tensor(data_bytes=31, payload=b""))], "declares data_bytes=31 .* take 32"),
    "scales vs elements": ([_forward(_tensor(codec=tensor_pb2.CODEC_INT8, itemsize=1, block_size=4, scale_bytes=4))],
                           "declares .*scale_bytes=4.* take 8 and 8"),
    "int8 block 0": ([_forward(_tensor(codec=tensor_pb2.CODEC_INT8, itemsize=1, block_size=0))], "block_size is 0"),
    "block_size on fp16": ([_forward(_tensor(codec=tensor_pb2.CODEC_FP16, itemsize=2, block_size=64))], "only for CODEC_INT8"),
    "codec vs dtype": ([_forward(_tensor(dtype="int64", codec=tensor_pb2.CODEC_INT8, itemsize=1, block_size=64, scale_bytes=4))],
                       "codec int8 is not allowed for dtype int64"),
    "payload too long": ([_forward(_tensor(payload=bytes(33)))], "33 bytes is longer than the 32 declared"),
    "chunk too long": ([_forward(_tensor(payload=bytes(30))), _chunk(0, bytes(3))],
                       "payload longer than declared"),
    "unknown chunk index": ([_forward(_tensor(payload=b"")), _chunk(5, b"x")],
                            "tensor index 5, but the message has 1"),
    "chunk out of order": ([_forward(_tensor(payload=b""), _mask(shape=(1, 2), payload=b"")),
                            _chunk(1, b"x")], "tensor 0 is still incomplete"),
    "empty chunk": ([_forward(_tensor(payload=b"")), _chunk(0, b"")], "empty chunk"),
    "chunk without message": ([_chunk(0, b"x")], "no message being assembled"),
    "truncated by next message": ([_forward(_tensor(payload=bytes(8))), node_pb2.Down(end_step=node_pb2.EndStep())],
                                  r"truncated Forward: .*'hidden'.* has 8 of 32 bytes when the next message \(end_step\) began"),
    "truncated by stream end": ([_forward(_tensor(payload=bytes(8)))], "truncated Forward: .* 8 of 32 bytes when the stream ended"),
    "nothing set": ([node_pb2.Down()], "Down frame with nothing set"),
    "wrong frame type": ([node_pb2.Up(opened=node_pb2.Opened())], "expected a Down frame, got Up"),
    "missing hidden": ([_forward()], r"Forward needs tensors \['hidden'\].*missing \['hidden'\]"),
    "unexpected tensor": ([_forward(_tensor(), _tensor(name="extra"))], r"unexpected \['extra'\]"),
    "duplicate name": ([_forward(_tensor(), _tensor())], "duplicate name 'hidden'"),
    "empty name": ([_forward(_tensor(name=""))], "empty name"),
    "hidden rank": ([_forward(_tensor(shape=(2, 4)))], r"Forward.hidden must be a float \(B, T, D\)"),
    "mask shape": ([_forward(_tensor(), _mask(shape=(1, 3)))],
                   r"attention_mask must be an integer \(B, T\) = \[1, 2\]"),
    "open codec raw": ([node_pb2.Down(open=node_pb2.Open(session_id="s", codec=tensor_pb2.CODEC_RAW))], "not an activation codec"),
    "open without session": ([node_pb2.Down(open=node_pb2.Open(codec=tensor_pb2.CODEC_FP32))], "empty session_id"),
    "hop backwards": ([node_pb2.Down(open=node_pb2.Open(session_id="s", codec=tensor_pb2.CODEC_FP32,
                                                        route=[node_pb2.Hop(name="a", start=5, end=2)]))], "start after end"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_down_frames_raise_wire_error(case):
    frames, message = HOSTILE[case]
    with pytest.raises(WireError, match=message):
        _feed(frames)


def test_size_limits_are_enforced_before_chunks_arrive():
    first = _forward(_tensor(shape=(1, 64, 64), payload=b""))  # 16 KiB declared, nothing sent yet
    with pytest.raises(WireError, match="16384 bytes, over the limit of 1000"):
        _feed([first], max_tensor_bytes=1000)
    # each tensor is under the message limit, their sum (8000 + 320 bytes) is not
    with pytest.raises(WireError, match="8320 bytes in all, over the limit of 8000"):
        _feed([_forward(_tensor(shape=(1, 40, 50)), _mask(shape=(1, 40)))],
              max_message_bytes=8000)


def test_hostile_up_frames_raise_wire_error():
    with pytest.raises(WireError, match="Up frame with nothing set"):
        _feed([node_pb2.Up()], kind="up")
    with pytest.raises(WireError, match="ItemError code 99 is not a gRPC status code"):
        _feed([node_pb2.Up(error=node_pb2.ItemError(code=99))], kind="up")
    with pytest.raises(WireError, match=r"Gradients: tensor 1 has a duplicate name 'x'"):
        _feed([node_pb2.Up(gradients=node_pb2.Gradients(tensors=[_tensor(name="x"), _tensor(name="x")]))], kind="up")


def test_hostile_edge_part_frames_raise_wire_error():
    def feed(*frames):
        return serde.read_edge_part(_over_wire(frames))

    def file(name):
        return coordinator_pb2.EdgePartFrame(file=coordinator_pb2.File(name=name, content=b"x"))

    def tensor(**kw):
        return coordinator_pb2.EdgePartFrame(tensor=_tensor(name="w", **kw))
    with pytest.raises(WireError, match=r"'\.\./\.bashrc' is not a plain file name"):
        feed(file("../.bashrc"))
    with pytest.raises(WireError, match="file 'a' sent twice"):
        feed(file("a"), file("b"), file("a"))
    with pytest.raises(WireError, match="after the tensors began"):
        feed(tensor(), file("a"))
    with pytest.raises(WireError, match="tensor 'w' sent twice"):
        feed(tensor(), tensor())
    with pytest.raises(WireError, match="truncated EdgePart: .* 4 of 32 bytes when the stream ended"):
        feed(tensor(payload=bytes(4)))
    with pytest.raises(WireError, match="truncated EdgePart: .* when a file frame arrived"):
        feed(tensor(payload=bytes(4)), file("a"))
    with pytest.raises(WireError, match="EdgePartFrame frame with nothing set"):
        feed(coordinator_pb2.EdgePartFrame())


def test_hostile_unary_messages_raise_wire_error():
    with pytest.raises(WireError, match=r"hops \['b'\] run blocks beyond its 4 layers"):
        serde.route_from_pb(coordinator_pb2.Route(model="m", num_layers=4, hops=[node_pb2.Hop(name="b", start=0, end=6)]))
    with pytest.raises(WireError, match="negative dimension"):
        serde.route_from_pb(coordinator_pb2.Route(manifest=[coordinator_pb2.ManifestEntry(name="w", shape=[-1])]))
    with pytest.raises(WireError, match="empty node name"):
        serde.join_request_from_pb(coordinator_pb2.JoinRequest())
    with pytest.raises(WireError, match="empty model name"):
        serde.route_request_from_pb(coordinator_pb2.RouteRequest())
    with pytest.raises(WireError, match="start after end"):
        serde.node_info_from_pb(node_pb2.NodeInfo(start=3, end=1))
    with pytest.raises(WireError, match="needs a token id"):
        serde.enroll_request_from_pb(coordinator_pb2.EnrollRequest(name="x", csr_pem=b"-----BEGIN X"))
    with pytest.raises(WireError, match="PEM block"):
        serde.renew_request_from_pb(coordinator_pb2.RenewRequest(csr_pem=b"-----BEGIN " + b"x" * serde.MAX_PEM_BYTES))
    with pytest.raises(WireError, match="PEM block"):
        serde.renew_request_from_pb(coordinator_pb2.RenewRequest(csr_pem=b"not pem"))
    with pytest.raises(WireError, match="64 IP addresses"):
        serde.renew_request_from_pb(coordinator_pb2.RenewRequest(csr_pem=b"-----BEGIN X", ips=["1.2.3.4"] * 65))


def test_bad_outgoing_messages_raise_wire_error():
    with pytest.raises(WireError, match="unknown codec 'fp8'"):
        serde.down_frames(wire.Backward(0, 0, torch.zeros(1, 1, 1)), codec="fp8")
    with pytest.raises(WireError, match="Opened cannot travel in a Down frame"):
        serde.down_frames(wire.Opened([]))
    with pytest.raises(WireError, match="not a grpc.StatusCode name"):
        serde.up_frames(wire.ItemError("NOPE", "x"))
    with pytest.raises(WireError, match="must travel raw"):
        serde.down_frames(wire.AdapterPush(0, {"ids": torch.arange(3)}), adapter_codec="int8")
    with pytest.raises(WireError, match="dtype torch.complex64"):
        serde.down_frames(wire.AdapterPush(0, {"c": torch.zeros(2, dtype=torch.complex64)}))


def test_empty_tensors_with_huge_dimensions_raise_wire_error():
    """Found by fuzzing (tests/fuzz, issue 14): a dimension of 0 made the others free of payload, and
    torch's reshape of the empty tensor raised RuntimeError (numel or stride overflow) instead."""
    gradients = node_pb2.Up(gradients=node_pb2.Gradients(
        tensors=[_tensor(name="10.ia3_l", dtype="int8", shape=(0, 32, (1 << 63) - 1), itemsize=1)]))
    with pytest.raises(WireError, match=r"shape \[0, 32, 9223372036854775807\] of int8 spans .* over the limit"):
        _feed([gradients], kind="up")
    part = coordinator_pb2.EdgePartFrame(tensor=_tensor(name="\x00", shape=(4, 1 << 62, 0), codec=tensor_pb2.CODEC_FP32))
    with pytest.raises(WireError, match="over the limit"):
        serde.read_edge_part(_over_wire([part]))
    (msg,) = _feed([_forward(_tensor(shape=(0, 3, 4)))])  # an empty tensor of a sane shape still decodes
    assert msg.hidden.shape == (0, 3, 4)
