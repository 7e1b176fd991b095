"""A structure-aware mutator for edgetune's frames: decode, change, re-encode (libFuzzer's custom mutator).

Why not atheris-libprotobuf-mutator: it ships only as a source distribution that builds with
Bazel, fetching libprotobuf-mutator, protobuf 3.19's C++ runtime and pybind11_protobuf from
GitHub at build time, and its `native_proto_caster` hands messages across as C++ protobuf
objects: it needs Python's protobuf on the C++ backend of the same version. edgetune runs
protobuf >= 6.31, whose Python messages live in upb; that backend has no C++ message to hand
over. So this module does the same job in Python with google.protobuf's own reflection.

One mutation of an input (a list of frames, see corpus.py) is one of:

- a field of one frame: any field at any depth (a Tensor header's shape, dtype, codec,
  block_size, data_bytes, payload; a chunk's index; an Open's route, codec, methods_json;
  an oneof switched to another member), set to an interesting value for its type;
- a tensor header made self-consistent again after a change (data_bytes, scale_bytes and a
  payload of the length its shape, dtype and codec call for), so inputs reach the code after
  serde's size checks -- the decoders and the node's compute -- instead of stopping there;
- the sequence: a frame inserted from the seeds, deleted, duplicated, swapped, a tensor's
  payload split off into a TensorChunk frame, the sequence cut short;
- libFuzzer's own byte mutations (atheris.Mutate) of one frame or of the whole input, which
  also make frames that do not parse.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from edgetune.tests.fuzz.corpus import UNARY_TYPES, pack, unpack

_INTS = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 4095, 4096,
         65535, 65536, 2**20, 2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1,
         -1, -2, -8, -2**31, -2**63]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"), 2.0**63]
_RANGES = {  # protobuf scalar type -> (min, max)
    FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1), FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
}
# Strings that mean something to edgetune's decoders: dtype, codec and tensor names, adapter
# keys, method configs (well-formed, odd and malformed), gRPC status names.
STRINGS = [
    "", "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "float8_e4m3fn", "hidden", "attention_mask", "grad", "0.0.self_attn.q_proj.lora_A",
    "0.1.self_attn.v_proj.lora_B", "0.0.ia3_l", "0.1.mlp.down_proj.bias", "0.0.prefix_key", "1.1.prefix_value",
    "0.7.self_attn.q_proj.lora_A", "9.0.x", "0.0.", "a.b.c", "-1.0.x", "00.01.x", "0.99999999999999999999.x",
    "fuzz", "edge", "node-0", "127.0.0.1:1", "..", "config.json", "a/b", "\x00", "\u00e9\u6f22",
    '[{"type": "LoraConfig", "fields": {"r": 2}}]', '[{"type": "LoraConfig", "fields": {"r": 0}}]',
    '[{"type": "LoraConfig", "fields": {"r": -3}}]', '[{"type": "LoraConfig", "fields": {"r": 1000000000}}]',
    '[{"type": "LoraConfig", "fields": {"r": "2"}}]', '[{"type": "LoraConfig", "fields": {"dropout": 2.5}}]',
    '[{"type": "LoraConfig", "fields": {"target_modules": "("}}]', '[{"type": "LoraConfig", "fields": {"alpha": NaN}}]',
    '[{"type": "LoraConfig", "fields": {"layers_to_transform": [1e400]}}]',
    '[{"type": "PrefixTuningConfig", "fields": {"num_virtual_tokens": 100000}}]',
    '[{"type": "PrefixTuningConfig", "fields": {"num_virtual_tokens": 0}}]',
    '[{"type": "PromptTuningConfig", "fields": {"num_virtual_tokens": 3}}]',
    '[{"type": "SerialAdapterConfig", "fields": {"bottleneck_size": 4, "activation": "nope"}}]',
    '[{"type": "IA3Config", "fields": {"target_modules": 5}}]', '[{"type": "BitFitConfig", "fields": []}]',
    '[{"type": "LNTuningConfig", "fields": {}}]', "[]", "[1]", "{}", "null", "[[", '[{"type": "Nope"}]',
    "OK", "UNKNOWN", "INTERNAL", "-----BEGIN CERTIFICATE-----\n",
]
_CHARS = "0123456789.-_:/[]{}\",eE \x00\u00e9"

# itemsize of the decoded dtype, and of what each codec puts on the wire
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1}
_CODEC_ITEMSIZE = {2: 4, 3: 2, 4: 2, 5: 1}  # CODEC_FP32, FP16, BF16, INT8
MAX_PAYLOAD = 8192  # the largest payload the size-repair mutation writes (inputs stay small and fast)


class FrameMutator:
    """libFuzzer's custom mutator for one target's inputs.

    `frame_type`: the protobuf class of every record (Down, Up), or None for the unary target,
    whose first record names the type. `pool`: the seeds' records, to splice in whole.
    """

    def __init__(self, frame_type: type | None, pool: list[bytes], byte_mutate: Callable[[bytes, int], bytes]):
        self.frame_type = frame_type
        self.pool = pool
        self.byte_mutate = byte_mutate  # atheris.Mutate: libFuzzer's own mutations of bytes
        self.recent: list[bytes] = []

    # -- libFuzzer's entry point --------------------------------------------------------
    def mutate(self, data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        self._remember(data, rng)
        if rng.random() < 0.05 and len(self.recent) > 1:  # crossover (see _remember)
            out = self.crossover(data, rng.choice(self.recent), rng)
            return out if len(out) <= max_size else data[:max_size]
        records = unpack(data)
        for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1)):  # mostly one change, sometimes a few
            records = self._mutate_once(records, rng, max_size)
        out = pack(records)
        if len(out) > max_size:  # too large: fall back on libFuzzer's byte mutation of the original
            return self.byte_mutate(data, max_size)
        return out

    def _remember(self, data: bytes, rng: random.Random) -> None:
        """Keep a sample of the corpus inputs libFuzzer hands in, to cross over with. (atheris 3.0's
        custom_crossover hook breaks atheris.Mutate -- "Fuzz() must be called before Mutate()" --
        so crossover happens here, inside the mutator.)"""
        if len(self.recent) < 256:
            self.recent.append(data)
        else:
            self.recent[rng.randrange(256)] = data

    def crossover(self, data1: bytes, data2: bytes, rng: random.Random) -> bytes:
        """The first frames of one input, then the last frames of the other (unary: the first's type)."""
        a, b = unpack(data1), unpack(data2)
        head = a[:self._header(a)]
        a, b = a[len(head):], b[self._header(b):]
        return pack(head + a[:rng.randint(0, len(a))] + b[rng.randint(0, len(b)):])

    # -- one change ----------------------------------------------------------------------
    def _header(self, records: list[bytes]) -> int:
        return 1 if self.frame_type is None and records else 0  # unary: the type name stays first

    def _type_of(self, records: list[bytes]) -> type | None:
        if self.frame_type is not None:
            return self.frame_type
        return UNARY_TYPES.get(records[0].decode("utf-8", "replace")) if records else None

    def _mutate_once(self, records: list[bytes], rng: random.Random, max_size: int) -> list[bytes]:
        records = list(records)
        head = self._header(records)
        body = records[head:]
        op = rng.random()
        if self.frame_type is None and (not records or op < 0.03):  # unary: another message type
            name = rng.choice(sorted(UNARY_TYPES)).encode()
            return [name] + (body or [rng.choice(self.pool)])
        frame_type = self._type_of(records)
        if not body or op < 0.08:  # splice in a frame from the seeds
            body.insert(rng.randint(0, len(body)), rng.choice(self.pool))
        elif op < 0.62 and frame_type is not None:
            i = rng.randrange(len(body))
            body[i] = self._mutate_frame(body[i], frame_type, rng)
        elif op < 0.70:
            del body[rng.randrange(len(body))]
        elif op < 0.75:
            i = rng.randrange(len(body))
            body.insert(i, body[i])
        elif op < 0.80 and len(body) > 1:
            i, j = rng.randrange(len(body)), rng.randrange(len(body))
            body[i], body[j] = body[j], body[i]
        elif op < 0.86 and frame_type is not None:
            body = self._split_chunk(body, frame_type, rng)
        elif op < 0.90:
            del body[rng.randint(1, len(body)):]
        elif op < 0.96:
            i = rng.randrange(len(body))
            body[i] = self.byte_mutate(body[i], max(len(body[i]) * 2, 64))
        else:
            return unpack(self.byte_mutate(pack(records), max_size))
        return records[:head] + body

    def _mutate_frame(self, record: bytes, frame_type: type, rng: random.Random) -> bytes:
        try:
            msg = frame_type.FromString(record)
        except DecodeError:
            return self.byte_mutate(record, max(len(record) * 2, 64))
        tensors = _tensor_headers(msg)
        if tensors and rng.random() < 0.3:
            header = rng.choice(tensors)
            if rng.random() < 0.6:
                _mutate_shape_or_type(header, rng)
            fix_sizes(header, rng)
        else:
            sites = _sites(msg)
            if sites:
                _mutate_site(*rng.choice(sites), rng)
        return msg.SerializeToString()

    def _split_chunk(self, body: list[bytes], frame_type: type, rng: random.Random) -> list[bytes]:
        """Move the tail of a tensor's payload into a TensorChunk frame right after its message."""
        i = rng.randrange(len(body))
        try:
            msg = frame_type.FromString(body[i])
        except DecodeError:
            return body
        tensors = _tensor_headers(msg)
        if "chunk" not in frame_type.DESCRIPTOR.fields_by_name or not tensors:
            return body
        index = rng.randrange(len(tensors))
        payload = tensors[index].payload
        if len(payload) < 2:
            return body
        cut = rng.randint(1, len(payload) - 1)
        tensors[index].payload, tail = payload[:cut], payload[cut:]
        chunk = frame_type()
        chunk.chunk.index, chunk.chunk.payload = index, tail
        return body[:i] + [msg.SerializeToString(), chunk.SerializeToString()] + body[i + 1:]


# -- fields ------------------------------------------------------------------------------
def _tensor_headers(msg: Message) -> list[Message]:
    """Every edgetune.v1.Tensor inside `msg`."""
    out = []
    for field, value in msg.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for item in (value if _is_repeated(field) else [value]):
            if item.DESCRIPTOR.full_name == "edgetune.v1.Tensor":
                out.append(item)
            else:
                out.extend(_tensor_headers(item))
    return out


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6 (upb descriptors have no `label`)
    return repeated if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _sites(msg: Message, depth: int = 0) -> list[tuple[Message, FieldDescriptor]]:
    """(message, field) for every field of `msg` and of the messages set inside it."""
    out = []
    for field in msg.DESCRIPTOR.fields:
        out.append((msg, field))
        if field.type != FieldDescriptor.TYPE_MESSAGE or depth > 6:
            continue
        if _is_repeated(field):
            for item in getattr(msg, field.name):
                out.extend(_sites(item, depth + 1))
        elif msg.HasField(field.name):
            out.extend(_sites(getattr(msg, field.name), depth + 1))
    return out


def _mutate_site(msg: Message, field: FieldDescriptor, rng: random.Random) -> None:
    name = field.name
    if _is_repeated(field):
        values = getattr(msg, name)
        op = rng.random()
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if op < 0.3 and len(values):
                del values[rng.randrange(len(values))]
            elif op < 0.5 and len(values):
                values.add().CopyFrom(values[rng.randrange(len(values))])
            elif op < 0.7 or not len(values):
                _mutate_message_fields(values.add(), rng)
            else:
                inner = _sites(values[rng.randrange(len(values))])
                if inner:
                    _mutate_site(*rng.choice(inner), rng)
        else:
            if op < 0.3 and len(values):
                del values[rng.randrange(len(values))]
            elif op < 0.6 or not len(values):
                values.append(_scalar(field, None, rng))
            else:
                i = rng.randrange(len(values))
                values[i] = _scalar(field, values[i], rng)
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        op = rng.random()
        if op < 0.2:
            msg.ClearField(name)
        elif op < 0.35 and field.containing_oneof is not None:
            getattr(msg, name).SetInParent()  # switch the oneof to this member (default contents)
        else:
            _mutate_message_fields(getattr(msg, name), rng)
        return
    if rng.random() < 0.1:
        msg.ClearField(name)
    else:
        setattr(msg, name, _scalar(field, getattr(msg, name), rng))


def _mutate_message_fields(msg: Message, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        sites = [s for s in _sites(msg) if s[1].type != FieldDescriptor.TYPE_MESSAGE or rng.random() < 0.3]
        if not sites:
            return
        _mutate_site(*rng.choice(sites), rng)


def _scalar(field: FieldDescriptor, old, rng: random.Random):
    t = field.type
    if t == FieldDescriptor.TYPE_BOOL:
        return not old if old is not None else rng.random() < 0.5
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice(values) if rng.random() < 0.8 else rng.choice([-1, 6, 99, 2**31 - 1])
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(_FLOATS) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6)
    if t == FieldDescriptor.TYPE_STRING:
        return _string(old or "", rng)
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes(old or b"", rng)
    lo, hi = _RANGES.get(t, (0, 2**32 - 1))
    op = rng.random()
    if op < 0.6:
        value = rng.choice(_INTS)
    elif op < 0.85 and old is not None:
        value = old + rng.choice([-2, -1, 1, 2, 8])
    else:
        value = rng.getrandbits(64) >> rng.randrange(64)
    return min(max(value, lo), hi)


def _string(old: str, rng: random.Random) -> str:
    op = rng.random()
    if op < 0.5 or not old:
        return rng.choice(STRINGS)
    chars = list(old)
    i = rng.randrange(len(chars) + 1)
    if op < 0.7:
        chars.insert(i, rng.choice(_CHARS))
    elif op < 0.85 and chars:
        del chars[min(i, len(chars) - 1)]
    elif chars:
        chars[min(i, len(chars) - 1)] = rng.choice(_CHARS)
    return "".join(chars)


def _bytes(old: bytes, rng: random.Random) -> bytes:
    op = rng.random()
    if op < 0.25:
        return old[:rng.randint(0, len(old))]
    if op < 0.45:
        return old + bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 4, 7, 64])))
    if op < 0.55:
        return b""
    if not old:
        return bytes([rng.getrandbits(8)])
    out = bytearray(old)
    for _ in range(rng.randint(1, 4)):  # a few bytes of the values: NaN, inf, huge, negative zero
        i = rng.randrange(len(out))
        out[i] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x7F, rng.getrandbits(8)])
    return bytes(out)


# -- tensor headers ----------------------------------------------------------------------
def _mutate_shape_or_type(header: Message, rng: random.Random) -> None:
    op = rng.random()
    shape = list(header.shape)
    if op < 0.5:
        if shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] = rng.choice([0, 0, 1, 2, 3, 4, 5, 31, 32, 33, 64, 128, 4096, 2**20,
                                                           2**31, 2**62, -1])
        elif rng.random() < 0.5:
            shape.insert(rng.randint(0, len(shape)), rng.choice([0, 1, 2, 32]))
        elif shape:
            del shape[rng.randrange(len(shape))]
        header.ClearField("shape")
        header.shape.extend(shape)
    elif op < 0.75:
        header.dtype = rng.choice(list(_ITEMSIZE) + ["bool", "complex64", ""])
    else:
        header.codec = rng.choice([1, 1, 2, 3, 4, 5, 0, 9])
        header.block_size = rng.choice([0, 1, 3, 64, 1024, 2**31, 2**32 - 1]) if header.codec == 5 else 0


def fix_sizes(header: Message, rng: random.Random) -> None:
    """Make data_bytes, scale_bytes and the payload agree with the header's shape, dtype and codec
    (as a well-behaved sender would), when that fits in MAX_PAYLOAD; else leave them as they are."""
    itemsize = _ITEMSIZE.get(header.dtype)
    if itemsize is None or any(d < 0 for d in header.shape):
        return
    n = 1
    for d in header.shape:
        n *= d
    data = n * (itemsize if header.codec == 1 else _CODEC_ITEMSIZE.get(header.codec, itemsize))
    scales = 4 * -(-n // header.block_size) if header.codec == 5 and header.block_size else 0
    if data + scales > MAX_PAYLOAD:
        return
    header.data_bytes, header.scale_bytes = data, scales
    payload = bytes(header.payload)[:data + scales]
    payload += bytes(rng.getrandbits(8) for _ in range(data + scales - len(payload)))
    if header.dtype in ("float32", "float16", "bfloat16", "float64") and rng.random() < 0.5:
        payload = bytes(b & 0x3F if i % itemsize == itemsize - 1 else b for i, b in enumerate(payload))  # finite
    header.payload = payload
