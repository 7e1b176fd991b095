"""Protobuf <-> Python for edgetune's wire: the one module that touches `*_pb2` messages.

Nodes, the coordinator and the edge speak in `edgetune.runtime.wire.messages` dataclasses and
torch tensors; this module turns them into the frames of proto/v1 and back, and
checks everything that arrives (remote input is hostile until proven otherwise: every
problem raises `WireError` saying what was wrong, never an assert or an IndexError).

Tensors on the wire (`edgetune.v1.Tensor`): the torch dtype name of the decoded
tensor, its shape, a codec, and a payload = data ++ scales, little-endian.

    codec  data                                   scales               for
    raw    the tensor's own dtype (exact)         -                    everything by default
    fp32   float32                                -                    activations and their
    fp16   float16       (0.5x fp32)              -                    gradients: Forward.hidden,
    bf16   bfloat16      (0.5x fp32)              -                    ForwardResult.hidden,
    int8   round(x / scale) as int8 (0.25x fp32)  fp32 absmax/127 per  Backward.grad,
                                                  block_size elements  BackwardResult.grad

Adapter tensors (AdapterPush, Gradients) travel raw unless the caller passes a lossy
`adapter_codec`; integer tensors (attention_mask) and the edge part always travel raw;
StageOutput.hidden always travels fp32 (a verifier compares it exactly).
Decoding returns a tensor of the original dtype and shape.

Chunking: a logical message whose payloads exceed one frame is sent as several frames
of one stream. The first frame is the message itself with every Tensor's header and
the first part of the payloads (at most `chunk_bytes` in all); TensorChunk frames then
carry the rest, tensor by tensor in order, at most `chunk_bytes` each. `Assembler`
rebuilds the message and returns it when its last chunk arrived:

    asm = Assembler("down")
    for frame in request_iterator:
        msg = asm.feed(frame)          # a wire.DownMessage, or None while chunks are due
        if msg is not None:
            handle(msg)
    asm.close()                        # WireError if the stream ended mid-message

`channel_options()` raises gRPC's message limits to a bit above one frame so every
frame fits, and no further: an oversized frame is refused by gRPC itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import numpy as np
import torch

from edgetune.proto.v1 import coordinator_pb2, node_pb2, tensor_pb2
from edgetune.runtime.errors import WireError
from edgetune.runtime.wire import messages as wire

CHUNK_BYTES = 1 << 20  # payload bytes per stream frame
MAX_FRAME_BYTES = 8 << 20  # gRPC message limit: one frame = CHUNK_BYTES + headers, with room to spare
MAX_TENSOR_BYTES = 2 << 30  # the largest tensor a receiver accepts (decoded or encoded)
MAX_MESSAGE_BYTES = 4 << 30  # the largest sum of one message's tensor payloads
INT8_BLOCK_SIZE = 64  # elements per int8 scale
MAX_RANK = 16  # more dimensions than this is not a tensor edgetune sends

Frame = node_pb2.Down | node_pb2.Up | coordinator_pb2.EdgePartFrame


def channel_options(max_message_bytes: int = MAX_FRAME_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options that let every frame through (and nothing much larger).

    gRPC's default receive limit (4 MiB) is below what a frame may reach with many tensor
    headers; 8 MiB leaves room for CHUNK_BYTES of payload plus headers.
    """
    if max_message_bytes <= CHUNK_BYTES:
        raise ValueError(f"max_message_bytes={max_message_bytes} must exceed one frame's payload ({CHUNK_BYTES})")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def frame_bytes(frame: Frame) -> int:
    """Serialized size of one frame: what it costs on the wire (before HTTP/2 framing)."""
    return frame.ByteSize()


# -- tensors ---------------------------------------------------------------------------
class _DType(NamedTuple):
    torch: torch.dtype
    le: str  # little-endian numpy dtype of the same width that carries its bits


_DTYPES = {
    "float32": _DType(torch.float32, "<f4"),
    "float64": _DType(torch.float64, "<f8"),
    "float16": _DType(torch.float16, "<f2"),
    "bfloat16": _DType(torch.bfloat16, "<i2"),  # numpy has no bfloat16: its bits travel as int16
    "int64": _DType(torch.int64, "<i8"),
    "int32": _DType(torch.int32, "<i4"),
    "int16": _DType(torch.int16, "<i2"),
    "int8": _DType(torch.int8, "i1"),
    "uint8": _DType(torch.uint8, "u1"),
}
_DTYPE_NAMES = {spec.torch: name for name, spec in _DTYPES.items()}
_CODEC_ENUMS = {
    "raw": tensor_pb2.CODEC_RAW,
    "fp32": tensor_pb2.CODEC_FP32,
    "fp16": tensor_pb2.CODEC_FP16,
    "bf16": tensor_pb2.CODEC_BF16,
    "int8": tensor_pb2.CODEC_INT8,
}
_CODEC_NAMES = {enum: name for name, enum in _CODEC_ENUMS.items()}
_CAST_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # codec -> data dtype


def _dtype_name(tensor: torch.Tensor, name: str) -> str:
    dtype = _DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire cannot carry; "
                        f"use one of {', '.join(_DTYPES)}")
    return dtype


def _check_codec(codec: str, allowed: Iterable[str]) -> str:
    if codec not in allowed:
        raise WireError(f"unknown codec {codec!r}: choose one of {', '.join(allowed)}")
    return codec


def _to_bytes(tensor: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor's values, row-major."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    name = _dtype_name(flat, "")
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().astype(_DTYPES[name].le, copy=False).tobytes()


def _from_bytes(buf: bytearray, offset: int, count: int, dtype: str) -> torch.Tensor:
    """`count` values of `dtype` from `buf` at `offset`, as a flat tensor (shares `buf` when aligned)."""
    spec = _DTYPES[dtype]
    values = np.frombuffer(buf, dtype=spec.le, count=count, offset=offset)
    values = values.astype(values.dtype.newbyteorder("="), copy=False)
    if offset % values.dtype.itemsize:
        values = values.copy()  # keep torch on aligned memory
    out = torch.from_numpy(values)
    return out.view(torch.bfloat16) if dtype == "bfloat16" else out


def _int8_encode(tensor: torch.Tensor, block_size: int) -> tuple[bytes, bytes]:
    """Blockwise absmax int8: (int8 values, one fp32 scale per block) as bytes."""
    flat = tensor.detach().to("cpu", torch.float32).reshape(-1)  # (n,)
    n = flat.numel()
    blocks, nblocks = _as_blocks(flat, block_size)  # (nblocks, bs)
    scale = blocks.abs().amax(dim=1) / 127  # (nblocks,)
    # An all-zero block has scale 0: divide it by 1 instead, so its values stay 0, not NaN.
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
    return _to_bytes(q.reshape(-1)[:n]), _to_bytes(scale)


def _int8_decode(buf: bytearray, n: int, block_size: int) -> torch.Tensor:
    q = _from_bytes(buf, 0, n, "int8").to(torch.float32)  # (n,)
    blocks, nblocks = _as_blocks(q, block_size)  # (nblocks, bs)
    scale = _from_bytes(buf, n, nblocks, "float32")  # (nblocks,)
    return (blocks * scale[:, None]).reshape(-1)[:n]


def _as_blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """Zero-pad a flat tensor to whole blocks: ((nblocks, bs), nblocks).

    A block_size larger than the tensor means one block; padding to the element count
    instead of to block_size keeps a hostile block_size from allocating more than 2x.
    """
    n = flat.numel()
    nblocks = -(-n // block_size)
    bs = min(block_size, max(n, 1))
    padded = torch.nn.functional.pad(flat, (0, nblocks * bs - n))
    return padded.view(nblocks, bs), nblocks


def _encode_tensor(name: str, tensor: torch.Tensor, codec: str, block_size: int) -> tuple[tensor_pb2.Tensor, bytes]:
    """A tensor's header (payload left empty) and its full payload (data ++ scales)."""
    dtype = _dtype_name(tensor, name)
    if codec != "raw" and not tensor.is_floating_point():
        raise WireError(f"codec {codec!r} is for float tensors; {name!r} is {dtype} and must travel raw")
    scales = b""
    if codec == "raw":
        data = _to_bytes(tensor)
    elif codec == "int8":
        if block_size <= 0:
            raise WireError(f"int8 block_size must be positive, got {block_size}")
        data, scales = _int8_encode(tensor, block_size)
    else:
        data = _to_bytes(tensor.to(_DTYPES[_CAST_DTYPES[codec]].torch))
    header = tensor_pb2.Tensor(
        name=name, dtype=dtype, shape=list(tensor.shape), codec=_CODEC_ENUMS[codec],
        block_size=block_size if codec == "int8" else 0, data_bytes=len(data), scale_bytes=len(scales),
    )
    return header, data + scales


def _payload_bytes(header: tensor_pb2.Tensor, where: str, max_tensor_bytes: int) -> int:
    """Check a received tensor header; return the length its full payload must have."""
    dtype = _DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError(f"{where}: unknown dtype {header.dtype!r} (known: {', '.join(_DTYPES)})")
    codec = _CODEC_NAMES.get(header.codec)
    if codec is None:
        raise WireError(f"{where}: unknown codec {header.codec} (known: {', '.join(_CODEC_NAMES.values())})")
    if codec != "raw" and not dtype.torch.is_floating_point:
        raise WireError(f"{where}: codec {codec} is not allowed for dtype {header.dtype} (integer tensors travel raw)")
    shape = list(header.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise WireError(f"{where}: invalid shape {shape} (dimensions must be >= 0, at most {MAX_RANK} of them)")
    n = math.prod(shape)
    # An empty dimension makes any other one free on the wire, but torch still has to stride over them
    # (shape [0, 2**40, 2**40] overflows it): every dimension counts as at least 1 against the limit.
    decoded = math.prod(max(d, 1) for d in shape) * dtype.torch.itemsize
    if decoded > max_tensor_bytes:
        raise WireError(f"{where}: shape {shape} of {header.dtype} spans {decoded} bytes, over the limit of "
                        f"{max_tensor_bytes} (an empty dimension counts as 1)")
    data_dtype = header.dtype if codec == "raw" else "int8" if codec == "int8" else _CAST_DTYPES[codec]
    data, scales = n * _DTYPES[data_dtype].torch.itemsize, 0
    if codec == "int8":
        if header.block_size == 0:
            raise WireError(f"{where}: int8 block_size is 0")
        scales = 4 * -(-n // header.block_size)
    elif header.block_size:
        raise WireError(f"{where}: block_size {header.block_size} is only for CODEC_INT8, not {codec}")
    if (header.data_bytes, header.scale_bytes) != (data, scales):
        raise WireError(f"{where}: declares data_bytes={header.data_bytes} scale_bytes={header.scale_bytes}, "
                        f"but {n} elements of {header.dtype} in codec {codec} take {data} and {scales}")
    if data + scales > max_tensor_bytes:
        raise WireError(f"{where}: payload of {data + scales} bytes is over the limit of {max_tensor_bytes}")
    return data + scales


def _decode_tensor(header: tensor_pb2.Tensor, payload: bytearray) -> torch.Tensor:
    """The tensor of a header checked by `_payload_bytes` and its complete payload."""
    n = math.prod(header.shape)
    codec = _CODEC_NAMES[header.codec]
    if codec == "raw":
        flat = _from_bytes(payload, 0, n, header.dtype)
    elif codec == "int8":
        flat = _int8_decode(payload, n, header.block_size)
    else:
        flat = _from_bytes(payload, 0, n, _CAST_DTYPES[codec])
    return flat.to(_DTYPES[header.dtype].torch).reshape(tuple(header.shape))


class _Payloads:
    """The payloads of one message's tensors while their TensorChunk frames arrive."""

    def __init__(self, headers: Iterable[tensor_pb2.Tensor], what: str, max_tensor_bytes: int, max_message_bytes: int,
                 keep: bool = True):
        self.what = what
        self.keep = keep  # False: count the bytes of a message relayed unopened, keep none
        self.headers = list(headers)
        names = set()
        for i, h in enumerate(self.headers):
            if not h.name or h.name in names:
                raise WireError(f"{what}: tensor {i} has {'an empty' if not h.name else 'a duplicate'} name {h.name!r}")
            names.add(h.name)
        self.totals = [_payload_bytes(h, self._where(i), max_tensor_bytes) for i, h in enumerate(self.headers)]
        if sum(self.totals) > max_message_bytes:
            raise WireError(f"{what}: tensors of {sum(self.totals)} bytes in all, over the limit of {max_message_bytes}")
        self.parts = [bytearray(h.payload) if keep else bytearray() for h in self.headers]
        self.have = [len(h.payload) for h in self.headers]
        for i, (have, total) in enumerate(zip(self.have, self.totals)):
            if have > total:
                raise WireError(f"{self._where(i)}: payload of {have} bytes is longer than the {total} declared")

    def _where(self, i: int) -> str:
        return f"{self.what} tensor {i} ({self.headers[i].name!r})"

    def next_index(self) -> int | None:
        """The tensor whose payload is still incomplete, first in order; None when all are complete."""
        return next((i for i, (h, t) in enumerate(zip(self.have, self.totals)) if h < t), None)

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        due = self.next_index()
        if chunk.index >= len(self.headers):
            raise WireError(f"{self.what}: chunk for tensor index {chunk.index}, but the message has {len(self.headers)} tensors")
        if chunk.index != due:
            raise WireError(f"{self.what}: chunk for tensor {chunk.index} while tensor {due} "
                            "is still incomplete (chunks come in order)")
        if not chunk.payload:
            raise WireError(f"{self._where(due)}: empty chunk")
        have, total = self.have[due], self.totals[due]
        if have + len(chunk.payload) > total:
            raise WireError(f"{self._where(due)}: payload longer than declared "
                            f"({have + len(chunk.payload)} > {total} bytes)")
        self.have[due] += len(chunk.payload)
        if self.keep:
            self.parts[due] += chunk.payload

    def missing(self) -> str:
        """What is still due, for a truncation message."""
        i = self.next_index()
        return f"{self._where(i)} has {self.have[i]} of {self.totals[i]} bytes"

    def decode(self) -> wire.Tensors:
        return {h.name: _decode_tensor(h, part) for h, part in zip(self.headers, self.parts)}


def _chunked(first: Frame, headers: list[tensor_pb2.Tensor], payloads: list[bytes], chunk_bytes: int,
             chunk_frame: Callable[[tensor_pb2.TensorChunk], Frame]) -> Iterator[Frame]:
    """Yield `first` carrying up to `chunk_bytes` of the payloads, then TensorChunk frames for the rest."""
    budget, sent = chunk_bytes, []
    for header, payload in zip(headers, payloads):
        take = min(len(payload), budget)
        header.payload = payload[:take]
        budget -= take
        sent.append(take)
    yield first
    for index, (payload, start) in enumerate(zip(payloads, sent)):
        for offset in range(start, len(payload), chunk_bytes):
            yield chunk_frame(tensor_pb2.TensorChunk(index=index, payload=payload[offset:offset + chunk_bytes]))


# -- session messages: encoding ----------------------------------------------------------
@dataclass(frozen=True)
class _Encoding:
    """How one message's tensors are encoded; collects their payloads in order."""

    activation: str  # codec of hidden states and their gradients
    adapter: str  # codec of adapter tensors and gradients ("raw" = exact)
    block_size: int

    def tensors(self, named: Iterable[tuple[str, torch.Tensor, str]], payloads: list[bytes]) -> list[tensor_pb2.Tensor]:
        headers = []
        for name, tensor, codec in named:
            header, payload = _encode_tensor(name, tensor, codec, self.block_size)
            headers.append(header)
            payloads.append(payload)
        return headers

    def adapter_tensors(self, tensors: wire.Tensors, payloads: list[bytes]) -> list[tensor_pb2.Tensor]:
        return self.tensors(((k, v, self.adapter) for k, v in tensors.items()), payloads)


def _open_to_pb(m: wire.Open, enc: _Encoding, payloads: list[bytes]) -> node_pb2.Open:
    return node_pb2.Open(session_id=m.session_id, model=m.model, fingerprint=m.fingerprint,
                         route=[hop_to_pb(h) for h in m.route],
                         codec=_CODEC_ENUMS[_check_codec(m.codec, wire.CODECS)], methods_json=m.methods_json,
                         adapter_codec=_CODEC_ENUMS[_check_codec(m.adapter_codec, wire.ADAPTER_CODECS)],
                         owner=m.owner, micro_batch_size=m.micro_batch_size, seq_len=m.seq_len,
                         micro_batches=m.micro_batches, constants_digest=m.constants_digest)


def _adapter_to_pb(m: wire.AdapterPush, enc: _Encoding, payloads: list[bytes]) -> node_pb2.AdapterPush:
    return node_pb2.AdapterPush(version=m.version, tensors=enc.adapter_tensors(m.tensors, payloads), delta=m.delta,
                                hops_ahead=m.hops_ahead)


def _forward_to_pb(m: wire.Forward, enc: _Encoding, payloads: list[bytes]) -> node_pb2.Forward:
    named = [("hidden", m.hidden, enc.activation)]
    if m.attention_mask is not None:
        named.append(("attention_mask", m.attention_mask, "raw"))
    return node_pb2.Forward(step=m.step, micro=m.micro, version=m.version, train=m.train,
                            dropout_key=list(m.dropout_key or ()), tensors=enc.tensors(named, payloads),
                            echo=m.echo, recompute=m.recompute)


def _backward_to_pb(m: wire.Backward, enc: _Encoding, payloads: list[bytes]) -> node_pb2.Backward:
    return node_pb2.Backward(step=m.step, micro=m.micro, tensors=enc.tensors([("grad", m.grad, enc.activation)], payloads),
                             no_input_grad=not m.input_grad)


def _end_step_to_pb(m: wire.EndStep, enc: _Encoding, payloads: list[bytes]) -> node_pb2.EndStep:
    return node_pb2.EndStep(step=m.step, version=m.version)


def _opened_to_pb(m: wire.Opened, enc: _Encoding, payloads: list[bytes]) -> node_pb2.Opened:
    return node_pb2.Opened(route=[hop_to_pb(h) for h in m.route])


def _forward_result_to_pb(m: wire.ForwardResult, enc: _Encoding, payloads: list[bytes]) -> node_pb2.ForwardResult:
    tensors = enc.tensors([("hidden", m.hidden, enc.activation)], payloads)
    return node_pb2.ForwardResult(step=m.step, micro=m.micro, tensors=tensors)


def _stage_output_to_pb(m: wire.StageOutput, enc: _Encoding, payloads: list[bytes]) -> node_pb2.StageOutput:
    # exact whatever the session's codec: the edge compares it with a verifier's recomputation
    tensors = enc.tensors([("hidden", m.hidden, "fp32")], payloads)
    return node_pb2.StageOutput(step=m.step, micro=m.micro, node=m.node, tensors=tensors)


def _backward_result_to_pb(m: wire.BackwardResult, enc: _Encoding, payloads: list[bytes]) -> node_pb2.BackwardResult:
    named = [] if m.grad is None else [("grad", m.grad, enc.activation)]
    return node_pb2.BackwardResult(step=m.step, micro=m.micro, tensors=enc.tensors(named, payloads))


def _gradients_to_pb(m: wire.Gradients, enc: _Encoding, payloads: list[bytes]) -> node_pb2.Gradients:
    timings = [node_pb2.StageTiming(name=t.name, forward_s=t.forward_s, backward_s=t.backward_s,
                                    bytes_in=t.bytes_in, bytes_out=t.bytes_out) for t in m.timings]
    return node_pb2.Gradients(step=m.step, version=m.version, tensors=enc.adapter_tensors(m.tensors, payloads), timings=timings)


_STATUS_BY_NAME = {code.name: code for code in grpc.StatusCode}
_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _item_error_to_pb(m: wire.ItemError, enc: _Encoding, payloads: list[bytes]) -> node_pb2.ItemError:
    code = _STATUS_BY_NAME.get(m.code)
    if code is None:
        raise WireError(f"ItemError code {m.code!r} is not a grpc.StatusCode name")
    return node_pb2.ItemError(code=code.value[0], message=m.message, node=m.node, step=m.step, micro=m.micro)


_DOWN_ENCODERS = {
    wire.Open: ("open", _open_to_pb), wire.AdapterPush: ("adapter", _adapter_to_pb),
    wire.Forward: ("forward", _forward_to_pb), wire.Backward: ("backward", _backward_to_pb),
    wire.EndStep: ("end_step", _end_step_to_pb),
}
_UP_ENCODERS = {
    wire.Opened: ("opened", _opened_to_pb), wire.ForwardResult: ("forward", _forward_result_to_pb),
    wire.StageOutput: ("stage_output", _stage_output_to_pb),
    wire.BackwardResult: ("backward", _backward_result_to_pb), wire.Gradients: ("gradients", _gradients_to_pb),
    wire.ItemError: ("error", _item_error_to_pb),
}


def _frames(msg, encoders: dict, frame_type: type, codec: str, adapter_codec: str | None, block_size: int,
            chunk_bytes: int) -> Iterator[Frame]:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    entry = encoders.get(type(msg))
    if entry is None:
        raise WireError(f"{type(msg).__name__} cannot travel in a {frame_type.__name__} frame")
    field, encode = entry
    enc = _Encoding(_check_codec(codec, wire.CODECS),
                    "raw" if adapter_codec is None else _check_codec(adapter_codec, wire.CODECS), block_size)
    payloads: list[bytes] = []
    frame = frame_type(**{field: encode(msg, enc, payloads)})
    inner = getattr(frame, field)
    headers = list(inner.tensors) if "tensors" in inner.DESCRIPTOR.fields_by_name else []
    return _chunked(frame, headers, payloads, chunk_bytes, lambda c: frame_type(chunk=c))


def roundtrip(tensor: torch.Tensor, codec: str, block_size: int = INT8_BLOCK_SIZE) -> torch.Tensor:
    """What `tensor` decodes to after travelling with `codec` (raw: itself): the edge and a node
    compute a replica's update, and a node its gradients' error feedback, with it."""
    if codec == "raw":
        return tensor
    header, payload = _encode_tensor("t", tensor, _check_codec(codec, ("raw", *wire.CODECS)), block_size)
    return _decode_tensor(header, bytearray(payload)).to(tensor.device)


def down_frames(msg: wire.DownMessage, codec: str = "fp32", chunk_bytes: int = CHUNK_BYTES, *,
                adapter_codec: str | None = None, block_size: int = INT8_BLOCK_SIZE) -> Iterator[node_pb2.Down]:
    """The Down frames of one message: the message, then TensorChunk frames if it is large.

    `codec` encodes Forward.hidden and Backward.grad; adapter tensors travel exactly unless
    `adapter_codec` is given; `block_size` is the int8 codecs' elements per scale.
    """
    return _frames(msg, _DOWN_ENCODERS, node_pb2.Down, codec, adapter_codec, block_size, chunk_bytes)


def up_frames(msg: wire.UpMessage, codec: str = "fp32", chunk_bytes: int = CHUNK_BYTES, *,
              adapter_codec: str | None = None, block_size: int = INT8_BLOCK_SIZE) -> Iterator[node_pb2.Up]:
    """The Up frames of one message; `codec` encodes ForwardResult.hidden and BackwardResult.grad.

    Adapter gradients travel exactly unless `adapter_codec` is given.
    """
    return _frames(msg, _UP_ENCODERS, node_pb2.Up, codec, adapter_codec, block_size, chunk_bytes)


# -- session messages: decoding ----------------------------------------------------------
def _named(tensors: wire.Tensors, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [n for n in required if n not in tensors]
    unexpected = [n for n in tensors if n not in required and n not in optional]
    if missing or unexpected:
        raise WireError(f"{what} needs tensors {list(required)} (optional {list(optional)}); "
                        f"missing {missing}, unexpected {unexpected}")


def _activation(tensors: wire.Tensors, name: str, what: str) -> torch.Tensor:
    t = tensors[name]
    if t.dim() != 3 or not t.is_floating_point():
        raise WireError(f"{what}.{name} must be a float (B, T, D) tensor, got {t.dtype} of shape {list(t.shape)}")
    return t


def _open_codec(enum: int) -> str:
    codec = _CODEC_NAMES.get(enum)
    if codec not in wire.CODECS:
        raise WireError(f"Open.codec {enum} is not an activation codec ({', '.join(wire.CODECS)})")
    return codec


def _open_from_pb(pb: node_pb2.Open, tensors: wire.Tensors) -> wire.Open:
    if not pb.session_id:
        raise WireError("Open has an empty session_id")
    return wire.Open(session_id=pb.session_id, model=pb.model, fingerprint=pb.fingerprint,
                     route=[hop_from_pb(h) for h in pb.route], codec=_open_codec(pb.codec), methods_json=pb.methods_json,
                     adapter_codec=_open_adapter_codec(pb.adapter_codec), owner=pb.owner,
                     micro_batch_size=pb.micro_batch_size, seq_len=pb.seq_len, micro_batches=pb.micro_batches,
                     constants_digest=pb.constants_digest)


def _open_adapter_codec(enum: int) -> str:
    if enum == tensor_pb2.CODEC_UNSPECIFIED:  # a sender that predates adapter codecs
        return "raw"
    codec = _CODEC_NAMES.get(enum)
    if codec not in wire.ADAPTER_CODECS:
        raise WireError(f"Open.adapter_codec {enum} is not an adapter codec ({', '.join(wire.ADAPTER_CODECS)})")
    return codec


def _adapter_from_pb(pb: node_pb2.AdapterPush, tensors: wire.Tensors) -> wire.AdapterPush:
    return wire.AdapterPush(version=pb.version, tensors=tensors, delta=pb.delta, hops_ahead=pb.hops_ahead)


def _forward_from_pb(pb: node_pb2.Forward, tensors: wire.Tensors) -> wire.Forward:
    _named(tensors, "Forward", ("hidden",), ("attention_mask",))
    hidden = _activation(tensors, "hidden", "Forward")
    mask = tensors.get("attention_mask")
    if mask is not None and (mask.is_floating_point() or tuple(mask.shape) != tuple(hidden.shape[:2])):
        raise WireError(f"Forward.attention_mask must be an integer (B, T) = {list(hidden.shape[:2])} tensor, "
                        f"got {mask.dtype} of shape {list(mask.shape)}")
    return wire.Forward(step=pb.step, micro=pb.micro, version=pb.version, train=pb.train,
                        dropout_key=tuple(pb.dropout_key) or None, hidden=hidden, attention_mask=mask,
                        echo=pb.echo, recompute=pb.recompute)


def _backward_from_pb(pb: node_pb2.Backward, tensors: wire.Tensors) -> wire.Backward:
    _named(tensors, "Backward", ("grad",))
    return wire.Backward(step=pb.step, micro=pb.micro, grad=_activation(tensors, "grad", "Backward"),
                         input_grad=not pb.no_input_grad)


def _end_step_from_pb(pb: node_pb2.EndStep, tensors: wire.Tensors) -> wire.EndStep:
    return wire.EndStep(step=pb.step, version=pb.version)


def _opened_from_pb(pb: node_pb2.Opened, tensors: wire.Tensors) -> wire.Opened:
    return wire.Opened(route=[hop_from_pb(h) for h in pb.route])


def _forward_result_from_pb(pb: node_pb2.ForwardResult, tensors: wire.Tensors) -> wire.ForwardResult:
    _named(tensors, "ForwardResult", ("hidden",))
    return wire.ForwardResult(step=pb.step, micro=pb.micro, hidden=_activation(tensors, "hidden", "ForwardResult"))


def _stage_output_from_pb(pb: node_pb2.StageOutput, tensors: wire.Tensors) -> wire.StageOutput:
    _named(tensors, "StageOutput", ("hidden",))
    return wire.StageOutput(step=pb.step, micro=pb.micro, node=pb.node, hidden=_activation(tensors, "hidden", "StageOutput"))


def _backward_result_from_pb(pb: node_pb2.BackwardResult, tensors: wire.Tensors) -> wire.BackwardResult:
    _named(tensors, "BackwardResult", (), ("grad",))
    grad = _activation(tensors, "grad", "BackwardResult") if "grad" in tensors else None
    return wire.BackwardResult(step=pb.step, micro=pb.micro, grad=grad)


def _gradients_from_pb(pb: node_pb2.Gradients, tensors: wire.Tensors) -> wire.Gradients:
    timings = [wire.StageTiming(name=t.name, forward_s=t.forward_s, backward_s=t.backward_s,
                                bytes_in=t.bytes_in, bytes_out=t.bytes_out) for t in pb.timings]
    return wire.Gradients(step=pb.step, version=pb.version, tensors=tensors, timings=timings)


def _item_error_from_pb(pb: node_pb2.ItemError, tensors: wire.Tensors) -> wire.ItemError:
    code = _STATUS_BY_VALUE.get(pb.code)
    if code is None:
        raise WireError(f"ItemError code {pb.code} is not a gRPC status code")
    return wire.ItemError(code=code.name, message=pb.message, node=pb.node, step=pb.step, micro=pb.micro)


_KINDS = {
    "down": (node_pb2.Down, {
        "open": _open_from_pb, "adapter": _adapter_from_pb, "forward": _forward_from_pb,
        "backward": _backward_from_pb, "end_step": _end_step_from_pb,
    }),
    "up": (node_pb2.Up, {
        "opened": _opened_from_pb, "forward": _forward_result_from_pb, "backward": _backward_result_from_pb,
        "gradients": _gradients_from_pb, "error": _item_error_from_pb, "stage_output": _stage_output_from_pb,
    }),
}


def _frame_kind(frame, frame_type: type) -> str:
    """The oneof field set in a frame, after checking the frame is of the expected type."""
    if not isinstance(frame, frame_type):
        raise WireError(f"expected a {frame_type.__name__} frame, got {type(frame).__name__}")
    kind = frame.WhichOneof("kind")
    if kind is None:
        raise WireError(f"{frame_type.__name__} frame with nothing set")
    return kind


class Opaque(NamedTuple):
    """One frame of a message an `Assembler` passes through unopened (its tensors never decoded)."""

    frame: node_pb2.Down | node_pb2.Up  # to relay as it is (the caller may edit the first frame's header)
    kind: str  # the message's oneof field, e.g. "adapter"
    header: object  # the message's protobuf (the first frame's; its payload bytes are not to be read)
    first: bool
    last: bool


class Assembler:
    """Rebuilds the messages of one Down or Up stream from its frames.

    `feed(frame)` returns the complete wire message when its last frame arrived, else
    None; `close()` at the end of the stream raises WireError if a message was cut short.

    `pass_through(kind, header)` picks messages to relay unopened: each of their frames comes
    back from `feed` as an `Opaque`, after the same checks of sizes and order as any frame,
    and nothing of their payloads is kept or decoded.
    """

    def __init__(self, kind: str, *, max_tensor_bytes: int = MAX_TENSOR_BYTES, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 pass_through: Callable[[str, object], bool] | None = None):
        if kind not in _KINDS:
            raise ValueError(f"Assembler kind must be one of {list(_KINDS)}, got {kind!r}")
        self._frame_type, self._decoders = _KINDS[kind]
        self._max_tensor_bytes, self._max_message_bytes = max_tensor_bytes, max_message_bytes
        self._pass_through = pass_through
        self._pending: tuple[str, object, _Payloads] | None = None  # (oneof field, inner message, payloads)

    def feed(self, frame: node_pb2.Down | node_pb2.Up) -> wire.DownMessage | wire.UpMessage | Opaque | None:
        kind = _frame_kind(frame, self._frame_type)
        first = kind != "chunk"
        if not first:
            if self._pending is None:
                raise WireError(f"a chunk frame (tensor {frame.chunk.index}) arrived with no message being assembled")
            self._pending[2].add(frame.chunk)
        else:
            if self._pending is not None:
                raise WireError(f"truncated {self._pending[1].DESCRIPTOR.name}: {self._pending[2].missing()} "
                                f"when the next message ({kind}) began")
            inner = getattr(frame, kind)
            headers = inner.tensors if "tensors" in inner.DESCRIPTOR.fields_by_name else ()
            keep = self._pass_through is None or not self._pass_through(kind, inner)
            payloads = _Payloads(headers, inner.DESCRIPTOR.name, self._max_tensor_bytes, self._max_message_bytes, keep)
            self._pending = (kind, inner, payloads)
        kind, inner, payloads = self._pending
        last = payloads.next_index() is None
        if last:
            self._pending = None
        if not payloads.keep:
            return Opaque(frame, kind, inner, first, last)
        return self._decoders[kind](inner, payloads.decode()) if last else None

    def close(self) -> None:
        """Call at the end of the stream: raises WireError if a message is still incomplete."""
        if self._pending is not None:
            raise WireError(f"truncated {self._pending[1].DESCRIPTOR.name}: {self._pending[2].missing()} when the stream ended")


def _read(frames: Iterable[Frame], kind: str, **limits: int) -> Iterator:
    assembler = Assembler(kind, **limits)
    for frame in frames:
        msg = assembler.feed(frame)
        if msg is not None:
            yield msg
    assembler.close()


def read_down(frames: Iterable[node_pb2.Down], **limits: int) -> Iterator[wire.DownMessage]:
    """The messages of a Down stream, e.g. a servicer's request iterator (limits: see Assembler)."""
    return _read(frames, "down", **limits)


def read_up(frames: Iterable[node_pb2.Up], **limits: int) -> Iterator[wire.UpMessage]:
    """The messages of an Up stream, e.g. the response iterator of Node.Session."""
    return _read(frames, "up", **limits)


# -- the edge part ------------------------------------------------------------------------
def _check_file_name(name: str) -> str:
    # The edge writes these files into a folder: a name must not reach outside it.
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise WireError(f"EdgePart file name {name!r} is not a plain file name")
    return name


def edge_part_frames(part: wire.EdgePart, chunk_bytes: int = CHUNK_BYTES) -> Iterator[coordinator_pb2.EdgePartFrame]:
    """The frames of an edge part: files first, then each tensor (raw, exact) and its chunks.

    A file larger than `chunk_bytes` travels as consecutive File frames of the same name.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for name, content in part.files.items():
        _check_file_name(name)
        for offset in range(0, max(len(content), 1), chunk_bytes):
            piece = content[offset:offset + chunk_bytes]
            yield coordinator_pb2.EdgePartFrame(file=coordinator_pb2.File(name=name, content=piece))
    for name, tensor in part.tensors.items():
        header, payload = _encode_tensor(name, tensor, "raw", 0)
        frame = coordinator_pb2.EdgePartFrame(tensor=header)
        yield from _chunked(frame, [frame.tensor], [payload], chunk_bytes, lambda c: coordinator_pb2.EdgePartFrame(chunk=c))


class EdgePartAssembler:
    """Rebuilds a wire.EdgePart from its frames; `finish()` at the end of the stream returns it."""

    def __init__(self, *, max_tensor_bytes: int = MAX_TENSOR_BYTES):
        self._max_tensor_bytes = max_tensor_bytes
        self._files: dict[str, bytearray] = {}
        self._last_file: str | None = None
        self._tensors: wire.Tensors = {}
        self._pending: _Payloads | None = None

    def feed(self, frame: coordinator_pb2.EdgePartFrame) -> None:
        kind = _frame_kind(frame, coordinator_pb2.EdgePartFrame)
        if kind == "chunk":
            if self._pending is None:
                raise WireError(f"an EdgePart chunk frame (tensor {frame.chunk.index}) arrived with no tensor being assembled")
            self._pending.add(frame.chunk)
        elif self._pending is not None:
            raise WireError(f"truncated EdgePart: {self._pending.missing()} when a {kind} frame arrived")
        elif kind == "file":
            self._add_file(frame.file)
        else:
            if frame.tensor.name in self._tensors:
                raise WireError(f"EdgePart: tensor {frame.tensor.name!r} sent twice")
            self._pending = _Payloads([frame.tensor], "EdgePart", self._max_tensor_bytes, self._max_tensor_bytes)
        if self._pending is not None and self._pending.next_index() is None:
            self._tensors.update(self._pending.decode())
            self._pending = None

    def _add_file(self, file: coordinator_pb2.File) -> None:
        name = _check_file_name(file.name)
        if self._tensors:
            raise WireError(f"EdgePart: file {name!r} after the tensors began (files come first)")
        if name in self._files and name != self._last_file:
            raise WireError(f"EdgePart: file {name!r} sent twice")
        content = self._files.setdefault(name, bytearray())
        if len(content) + len(file.content) > self._max_tensor_bytes:
            raise WireError(f"EdgePart: file {name!r} is over the limit of {self._max_tensor_bytes} bytes")
        content += file.content
        self._last_file = name

    def finish(self) -> wire.EdgePart:
        """The edge part; raises WireError if the stream ended inside a tensor."""
        if self._pending is not None:
            raise WireError(f"truncated EdgePart: {self._pending.missing()} when the stream ended")
        return wire.EdgePart(files={k: bytes(v) for k, v in self._files.items()}, tensors=dict(self._tensors))


def read_edge_part(frames: Iterable[coordinator_pb2.EdgePartFrame], **limits: int) -> wire.EdgePart:
    """The edge part of a FetchEdgePart response stream."""
    assembler = EdgePartAssembler(**limits)
    for frame in frames:
        assembler.feed(frame)
    return assembler.finish()


# -- unary messages -----------------------------------------------------------------------
def hop_to_pb(hop: wire.Hop) -> node_pb2.Hop:
    return node_pb2.Hop(name=hop.name, address=hop.address, start=hop.start, end=hop.end, dtype=hop.dtype,
                        quantize=hop.quantize)


_HOP_DTYPES = ("", "fp32", "bf16", "fp16")
_HOP_QUANTIZE = ("", "none", "int8", "nf4")


def hop_from_pb(pb: node_pb2.Hop) -> wire.Hop:
    if pb.start > pb.end:
        raise WireError(f"hop {pb.name!r} has blocks [{pb.start}, {pb.end}): start after end")
    if pb.dtype not in _HOP_DTYPES or pb.quantize not in _HOP_QUANTIZE:
        raise WireError(f"hop {pb.name!r} says its blocks are {pb.dtype!r} / {pb.quantize!r}: expected a dtype in "
                        f"{_HOP_DTYPES[1:]} and a quantization in {_HOP_QUANTIZE[1:]} (or nothing)")
    return wire.Hop(name=pb.name, address=pb.address, start=pb.start, end=pb.end, dtype=pb.dtype, quantize=pb.quantize)


_NODE_INFO_FIELDS = ("name", "model", "fingerprint", "start", "end", "device", "sessions",
                     "cached_activations", "loaded_bytes", "busy_fraction")


def node_info_to_pb(info: wire.NodeInfo) -> node_pb2.NodeInfo:
    return node_pb2.NodeInfo(**{f: getattr(info, f) for f in _NODE_INFO_FIELDS}, free_bytes=info.free_bytes,
                             open_sessions=[node_pb2.SessionInfo(session_id=s.session_id, owner=s.owner,
                                                                 reserved_bytes=s.reserved_bytes)
                                            for s in info.open_sessions])


def node_info_from_pb(pb: node_pb2.NodeInfo) -> wire.NodeInfo:
    if pb.start > pb.end:
        raise WireError(f"NodeInfo {pb.name!r} serves blocks [{pb.start}, {pb.end}): start after end")
    return wire.NodeInfo(**{f: getattr(pb, f) for f in _NODE_INFO_FIELDS}, free_bytes=pb.free_bytes,
                         open_sessions=[wire.SessionInfo(s.session_id, s.owner, s.reserved_bytes) for s in pb.open_sessions])


def info_request_to_pb() -> node_pb2.InfoRequest:
    return node_pb2.InfoRequest()


def route_to_pb(route: wire.Route) -> coordinator_pb2.Route:
    manifest = [coordinator_pb2.ManifestEntry(name=e.name, dtype=e.dtype, shape=list(e.shape), sha256=e.sha256)
                for e in route.manifest]
    return coordinator_pb2.Route(model=route.model, fingerprint=route.fingerprint, hops=[hop_to_pb(h) for h in route.hops],
                                 num_layers=route.num_layers, manifest=manifest,
                                 verifiers=[hop_to_pb(h) for h in route.verifiers])


def route_from_pb(pb: coordinator_pb2.Route) -> wire.Route:
    hops = [hop_from_pb(h) for h in pb.hops]
    verifiers = [hop_from_pb(h) for h in pb.verifiers]
    beyond = [h.name for h in hops + verifiers if h.end > pb.num_layers]
    if beyond:
        raise WireError(f"Route for {pb.model!r}: hops {beyond} run blocks beyond its {pb.num_layers} layers")
    manifest = []
    for e in pb.manifest:
        if any(d < 0 for d in e.shape):
            raise WireError(f"Route manifest entry {e.name!r} has a negative dimension in {list(e.shape)}")
        manifest.append(wire.ManifestEntry(name=e.name, dtype=e.dtype, shape=tuple(e.shape), sha256=e.sha256))
    return wire.Route(model=pb.model, fingerprint=pb.fingerprint, hops=hops, num_layers=pb.num_layers, manifest=manifest,
                      verifiers=verifiers)


def route_request_to_pb(model: str, failed: Iterable[str] = (), verify: bool = False,
                        exclude: Iterable[str] = ()) -> coordinator_pb2.RouteRequest:
    return coordinator_pb2.RouteRequest(model=model, failed=list(failed), verify=verify, exclude=list(exclude))


def route_request_from_pb(pb: coordinator_pb2.RouteRequest) -> wire.RouteRequest:
    """The model, addresses the edge could not reach, whether it verifies, node names it banned."""
    if not pb.model:
        raise WireError("RouteRequest has an empty model name")
    return wire.RouteRequest(pb.model, tuple(pb.failed), pb.verify, tuple(pb.exclude))


_NODE_STATUS_FIELDS = ("name", "ray_node_id", "host", "alive", "device", "gpu_name", "memory_bytes",
                       "cpus", "threads", "block_time_s", "bandwidth_bytes_per_s", "dtype",
                       "quantize", "kernels", "banned_s")


def _node_status_to_pb(s: wire.NodeStatus) -> coordinator_pb2.NodeStatus:
    pb = coordinator_pb2.NodeStatus(**{f: getattr(s, f) for f in _NODE_STATUS_FIELDS},
                                    stages=[hop_to_pb(h) for h in s.stages])
    if s.info is not None:
        pb.info.CopyFrom(node_info_to_pb(s.info))
    return pb


def _node_status_from_pb(pb: coordinator_pb2.NodeStatus) -> wire.NodeStatus:
    info = node_info_from_pb(pb.info) if pb.HasField("info") else None
    return wire.NodeStatus(**{f: getattr(pb, f) for f in _NODE_STATUS_FIELDS},
                           stages=[hop_from_pb(h) for h in pb.stages], info=info)


def cluster_status_to_pb(status: wire.ClusterStatus) -> coordinator_pb2.ClusterStatus:
    return coordinator_pb2.ClusterStatus(ray_address=status.ray_address, nodes=[_node_status_to_pb(n) for n in status.nodes],
                                         models=list(status.models))


def cluster_status_from_pb(pb: coordinator_pb2.ClusterStatus) -> wire.ClusterStatus:
    return wire.ClusterStatus(ray_address=pb.ray_address, nodes=[_node_status_from_pb(n) for n in pb.nodes],
                              models=list(pb.models))


def status_request_to_pb() -> coordinator_pb2.StatusRequest:
    return coordinator_pb2.StatusRequest()


def join_request_to_pb(name: str) -> coordinator_pb2.JoinRequest:
    return coordinator_pb2.JoinRequest(name=name)


def join_request_from_pb(pb: coordinator_pb2.JoinRequest) -> str:
    """The joining node's name."""
    if not pb.name:
        raise WireError("JoinRequest has an empty node name")
    return pb.name


def join_reply_to_pb(reply: wire.JoinReply) -> coordinator_pb2.JoinReply:
    return coordinator_pb2.JoinReply(ray_address=reply.ray_address, ray_auth_token=reply.ray_auth_token,
                                     ray_auth_mode=reply.ray_auth_mode, ray_tls_cert=reply.ray_tls_cert,
                                     ray_tls_key=reply.ray_tls_key, ray_tls_ca=reply.ray_tls_ca)


def join_reply_from_pb(pb: coordinator_pb2.JoinReply) -> wire.JoinReply:
    if not pb.ray_address:
        raise WireError("JoinReply has an empty ray_address")
    return wire.JoinReply(ray_address=pb.ray_address, ray_auth_token=pb.ray_auth_token, ray_auth_mode=pb.ray_auth_mode,
                          ray_tls_cert=pb.ray_tls_cert, ray_tls_key=pb.ray_tls_key, ray_tls_ca=pb.ray_tls_ca)


MAX_PEM_BYTES = 16 << 10  # a certificate or request is ~1 KB; anything near this is not one


def enroll_request_to_pb(token_id: str, secret: str, name: str, csr_pem: bytes,
                         ips: Iterable[str]) -> coordinator_pb2.EnrollRequest:
    return coordinator_pb2.EnrollRequest(token_id=token_id, secret=secret, name=name, csr_pem=csr_pem, ips=list(ips))


def enroll_request_from_pb(pb: coordinator_pb2.EnrollRequest) -> tuple[str, str, str, bytes, list[str]]:
    """(token id, secret, name, CSR, IPs)."""
    if not (pb.token_id and pb.secret and pb.name and pb.csr_pem):
        raise WireError("EnrollRequest needs a token id, its secret, a name and a certificate request")
    return pb.token_id, pb.secret, pb.name, _pem(pb.csr_pem, "csr_pem"), _ips(pb.ips)


def renew_request_to_pb(csr_pem: bytes, ips: Iterable[str]) -> coordinator_pb2.RenewRequest:
    return coordinator_pb2.RenewRequest(csr_pem=csr_pem, ips=list(ips))


def renew_request_from_pb(pb: coordinator_pb2.RenewRequest) -> tuple[bytes, list[str]]:
    return _pem(pb.csr_pem, "csr_pem"), _ips(pb.ips)


def enrolled_to_pb(m: wire.Enrolled) -> coordinator_pb2.EnrollReply:
    return coordinator_pb2.EnrollReply(cert_pem=m.cert_pem, ca_pem=m.ca_pem, coordinator=m.coordinator)


def enrolled_from_pb(pb: coordinator_pb2.EnrollReply) -> wire.Enrolled:
    return wire.Enrolled(_pem(pb.cert_pem, "cert_pem"), _pem(pb.ca_pem, "ca_pem"), pb.coordinator)


def _pem(data: bytes, what: str) -> bytes:
    if not data or len(data) > MAX_PEM_BYTES or not data.lstrip().startswith(b"-----BEGIN "):
        raise WireError(f"{what}: expected a PEM block of at most {MAX_PEM_BYTES} bytes")
    return bytes(data)


def _ips(ips: Iterable[str]) -> list[str]:
    out = list(ips)
    if len(out) > 64 or any(len(ip) > 64 for ip in out):
        raise WireError("at most 64 IP addresses, each of at most 64 characters")
    return out


def edge_part_request_to_pb(model: str) -> coordinator_pb2.EdgePartRequest:
    return coordinator_pb2.EdgePartRequest(model=model)


def edge_part_request_from_pb(pb: coordinator_pb2.EdgePartRequest) -> str:
    """The model whose edge part is asked for."""
    if not pb.model:
        raise WireError("EdgePartRequest has an empty model name")
    return pb.model
