"""Seed inputs for the fuzz targets, and the one input format they share.

An input is a list of records, each a varint length and that many bytes (protobuf's own
length-delimited encoding, as a `repeated bytes` field would hold them without the tags):

    down, up   one serialized Down / Up frame per record: the frames of one session stream
    unary      the message type's name (e.g. b"RouteRequest"), then one serialized message
               (b"EdgePartFrame": any number of them, the frames of one FetchEdgePart stream)

Seeds are the frames serde itself builds for representative messages of every kind (every
codec, chunked and whole, each PEFT method's adapter tensors for the tiny model's blocks), made
deterministically at start: no binary files in git. `write_seeds(target, folder)` puts them where
libFuzzer reads its corpus.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from google.protobuf.message import DecodeError

from edgetune.proto.v1 import coordinator_pb2, node_pb2
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import serde

TARGETS = ("down", "up", "unary")
MAX_RECORDS = 64  # records past this are ignored: a session of a few dozen frames says all a longer one does

# The unary messages a coordinator, node or edge decodes, by the name an input's first record gives.
UNARY_TYPES: dict[str, type] = {
    "JoinRequest": coordinator_pb2.JoinRequest, "RouteRequest": coordinator_pb2.RouteRequest,
    "EnrollRequest": coordinator_pb2.EnrollRequest, "RenewRequest": coordinator_pb2.RenewRequest,
    "EdgePartRequest": coordinator_pb2.EdgePartRequest, "NodeInfo": node_pb2.NodeInfo,
    "Route": coordinator_pb2.Route, "ClusterStatus": coordinator_pb2.ClusterStatus,
    "JoinReply": coordinator_pb2.JoinReply, "EnrollReply": coordinator_pb2.EnrollReply, "Hop": node_pb2.Hop,
    "EdgePartFrame": coordinator_pb2.EdgePartFrame,
}


# -- the input format ------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pack(records: Iterable[bytes]) -> bytes:
    return b"".join(_varint(len(r)) + r for r in records)


def unpack(data: bytes) -> list[bytes]:
    """The records of an input; a truncated or malformed tail is dropped (the stream ends there)."""
    records, i = [], 0
    while i < len(data) and len(records) < MAX_RECORDS:
        n, shift = 0, 0
        while i < len(data) and shift < 35:
            byte = data[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            return records
        if i + n > len(data):
            return records
        records.append(data[i:i + n])
        i += n
    return records


# -- seeds -----------------------------------------------------------------------------
class NodeFacts:
    """What a well-formed session of the tiny node needs to say (its model, weights and blocks)."""

    def __init__(self, shard) -> None:
        self.model = shard.model
        self.fingerprint = shard.fingerprint
        self.part = shard.part
        self.hop = wire.Hop(shard.name, "127.0.0.1:1", shard.start, shard.end)


def _methods():
    from edgetune.runtime.peft import (
        BitFitConfig,
        IA3Config,
        LNTuningConfig,
        LoraConfig,
        ParallelAdapterConfig,
        PrefixTuningConfig,
        SerialAdapterConfig,
    )

    return [
        [LoraConfig(r=2)], [LoraConfig(r=2, dropout=0.1, use_dora=True, target_modules="all-linear")],
        [IA3Config()], [BitFitConfig()], [PrefixTuningConfig(num_virtual_tokens=2)],
        [SerialAdapterConfig(bottleneck_size=4)], [ParallelAdapterConfig(bottleneck_size=4)], [LNTuningConfig()],
        [PrefixTuningConfig(num_virtual_tokens=2), ParallelAdapterConfig(bottleneck_size=4)],  # MAM
    ]


def _adapter(methods, part, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Each method's tensors for the part's blocks, keyed as AdapterPush keys them."""
    out = {}
    for k, method in enumerate(methods):
        for block in part.layers:
            for name, t in method.init_block(part.config, block, gen).items():
                out[f"{k}.{block.layer_idx}.{name}"] = t + 0.01 * torch.randn(t.shape, generator=gen)
    return out


def _session(facts: NodeFacts, methods, gen: torch.Generator, codec: str = "fp32", adapter_codec: str = "raw",
             chunk_bytes: int = serde.CHUNK_BYTES, hops: int = 1, mask: bool = True) -> list[bytes]:
    """The Down frames of one training step through the tiny node: open, push, forward, backward, end."""
    from edgetune.runtime.peft.adapter import methods_to_json

    route = [facts.hop] + [wire.Hop(f"node-{i}", "127.0.0.1:1", facts.hop.end, facts.hop.end) for i in range(1, hops)]
    B, T, D = 2, 3, facts.part.config.hidden_size
    hidden = torch.randn(B, T, D, generator=gen)
    attention = torch.tensor([[1, 1, 1], [0, 1, 1]]) if mask else None
    adapter = _adapter(methods, facts.part, gen)
    messages = [
        wire.Open(session_id="fuzz", model=facts.model, fingerprint=facts.fingerprint, route=route, codec=codec,
                  methods_json=methods_to_json(methods), adapter_codec=adapter_codec, owner="edge",
                  micro_batch_size=B, seq_len=T, micro_batches=2),
        *[wire.AdapterPush(1, {}, hops_ahead=h) for h in range(1, hops)],
        wire.AdapterPush(1, adapter),
        _forward(0, 0, 1, True, (7, 0, 0), hidden, attention),
        wire.Backward(step=0, micro=0, grad=torch.randn(B, T, D, generator=gen)),
        wire.EndStep(step=0, version=1),
    ]
    if adapter_codec != "raw":  # a delta on the replica, then a forward of the new version
        delta = {k: 0.01 * torch.randn(t.shape, generator=gen) for k, t in adapter.items()}
        messages[-1:-1] = [wire.AdapterPush(2, delta, delta=True), _forward(1, 0, 2, False, None, hidden)]
    return _frames(messages, serde.down_frames, codec, adapter_codec, chunk_bytes)


def _forward(step, micro, version, train, dropout_key, hidden, attention_mask=None) -> wire.Forward:
    return wire.Forward(step=step, micro=micro, version=version, train=train, dropout_key=dropout_key, hidden=hidden,
                        attention_mask=attention_mask)


def _frames(messages, encode, codec: str, adapter_codec: str, chunk_bytes: int) -> list[bytes]:
    ac = None if adapter_codec == "raw" else adapter_codec
    return [f.SerializeToString() for m in messages for f in encode(m, codec, chunk_bytes, adapter_codec=ac)]


def down_seeds(facts: NodeFacts) -> list[list[bytes]]:
    gen = torch.Generator().manual_seed(0)
    methods = _methods()
    seeds = [_session(facts, m, gen) for m in methods]
    seeds += [
        _session(facts, methods[0], gen, codec="int8", adapter_codec="int8"),
        _session(facts, methods[0], gen, codec="bf16", adapter_codec="bf16", chunk_bytes=48),
        _session(facts, methods[2], gen, codec="fp16", chunk_bytes=100, mask=False),
        _session(facts, methods[0], gen, hops=2),  # a route past this node: relayed push and messages
    ]
    # A forward that overtakes its push (parked); a backward that wants no input gradient and an end
    # of step for another version, with no session opened.
    s = _session(facts, methods[0], gen)
    D = facts.part.config.hidden_size
    parked = serde.down_frames(_forward(0, 1, 2, True, (1, 2, 3), torch.randn(1, 2, D, generator=gen)))
    seeds.append(s[:1] + [f.SerializeToString() for f in parked] + s[1:])
    seeds.append(_frames([wire.Backward(step=0, micro=0, grad=torch.randn(2, 3, D, generator=gen), input_grad=False),
                          wire.EndStep(step=0, version=9)],
                         serde.down_frames, "fp32", "raw", serde.CHUNK_BYTES))
    return seeds


def up_seeds() -> list[list[bytes]]:
    gen = torch.Generator().manual_seed(1)
    hops = [wire.Hop("node-0", "", 0, 1), wire.Hop("node-1", "10.0.0.2:7000", 1, 2)]
    grads = {"0.0.self_attn.q_proj.lora_A": torch.randn(2, 32, generator=gen),
             "0.1.self_attn.v_proj.lora_B": torch.randn(16, 2, generator=gen),
             "1.0.ia3_l": torch.randn(0, generator=gen)}
    messages = [
        wire.Opened(hops),
        wire.ForwardResult(0, 0, torch.randn(2, 3, 32, generator=gen)),
        wire.BackwardResult(0, 0, torch.randn(2, 3, 32, generator=gen)),
        wire.BackwardResult(0, 1, None),
        wire.Gradients(0, 1, grads, [wire.StageTiming("node-0", 0.5, 0.25, 1000, 2000)]),
        wire.ItemError("FAILED_PRECONDITION", "no activations", "node-1", 0, 1),
    ]
    seeds = []
    for codec, adapter_codec, chunk in (("fp32", "raw", serde.CHUNK_BYTES), ("int8", "int8", 64),
                                        ("fp16", "bf16", 40), ("bf16", "raw", 200)):
        seeds.append(_frames(messages, serde.up_frames, codec, adapter_codec, chunk))
    seeds += [_frames([m], serde.up_frames, "fp32", "raw", 128) for m in messages]
    return seeds


_CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nMIIBfuzz\n-----END CERTIFICATE REQUEST-----\n"
_CERT = b"-----BEGIN CERTIFICATE-----\nMIIBfuzz\n-----END CERTIFICATE-----\n"


def unary_seeds() -> list[list[bytes]]:
    gen = torch.Generator().manual_seed(2)
    hops = [wire.Hop("node-0", "10.0.0.1:7000", 0, 1), wire.Hop("node-1", "10.0.0.2:7000", 1, 2)]
    manifest = [wire.ManifestEntry("model.layers.0.mlp.up_proj.weight", "float32", (64, 32), "ab" * 32)]
    info = wire.NodeInfo(name="node-0", model="tiny", fingerprint="ab" * 32, start=0, end=2, device="cpu", sessions=1,
                         cached_activations=3, loaded_bytes=4096, busy_fraction=0.5,
                         open_sessions=[wire.SessionInfo("s", "edge", 1 << 20)], free_bytes=1 << 30)
    node = wire.NodeStatus(name="node-0", ray_node_id="ray-id", host="10.0.0.1", memory_bytes=1 << 30, cpus=2, threads=1,
                           block_time_s=0.01, bandwidth_bytes_per_s=1e8, stages=hops[:1], info=info, dtype="fp32",
                           quantize="none", kernels="eager")
    status = wire.ClusterStatus("10.0.0.1:6379", [node], ["tiny"])
    part = wire.EdgePart({"config.json": b'{"a": 1}', "tokenizer.json": b"{}" * 40},
                         {"embed": torch.randn(4, 8, generator=gen), "ids": torch.arange(5)})
    one = {
        "JoinRequest": serde.join_request_to_pb("node-0"),
        "RouteRequest": serde.route_request_to_pb("tiny", ["10.0.0.2:7000"]),
        "EnrollRequest": serde.enroll_request_to_pb("tok", "secret", "node-0", _CSR, ["10.0.0.1", "::1"]),
        "RenewRequest": serde.renew_request_to_pb(_CSR, ["10.0.0.1"]),
        "EdgePartRequest": serde.edge_part_request_to_pb("tiny"),
        "NodeInfo": serde.node_info_to_pb(info),
        "Route": serde.route_to_pb(wire.Route("tiny", "ab" * 32, hops, 2, manifest)),
        "ClusterStatus": serde.cluster_status_to_pb(status),
        "JoinReply": serde.join_reply_to_pb(wire.JoinReply("10.0.0.1:6379", "t", "token", _CERT, _CERT, _CERT)),
        "EnrollReply": serde.enrolled_to_pb(wire.Enrolled(_CERT, _CERT, "10.0.0.1:7700")),
        "Hop": serde.hop_to_pb(hops[1]),
    }
    seeds = [[name.encode(), pb.SerializeToString()] for name, pb in one.items()]
    for chunk in (serde.CHUNK_BYTES, 16):
        seeds.append([b"EdgePartFrame", *(f.SerializeToString() for f in serde.edge_part_frames(part, chunk))])
    return seeds


def seeds(target: str, facts: NodeFacts | None = None) -> list[bytes]:
    """The seed inputs of `target` (down needs the node's facts)."""
    if target == "down":
        sessions = down_seeds(facts)
    elif target == "up":
        sessions = up_seeds()
    elif target == "unary":
        sessions = unary_seeds()
    else:
        raise ValueError(f"unknown fuzz target {target!r}: one of {TARGETS}")
    return [pack(s) for s in sessions]


def write_seeds(target: str, folder: Path, facts: NodeFacts | None = None) -> int:
    """Write `target`'s seeds into `folder` (named by content, as libFuzzer names inputs); returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = seeds(target, facts)
    for data in inputs:
        (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    return len(inputs)


def frames_of(target: str, data: bytes) -> Iterator:
    """The protobuf frames of a down/up input, parsed as gRPC would; a frame that does not parse ends them."""
    frame_type = node_pb2.Down if target == "down" else node_pb2.Up
    for record in unpack(data):
        try:
            yield frame_type.FromString(record)
        except DecodeError:  # gRPC would end the stream here
            return
