"""A real node server fed fuzzed sessions over gRPC: it must end each one with a status that says
what was wrong, and keep serving.

`live_check(n)` starts one node (tests/node_harness.start_route: Shard + NodeServicer + gRPC,
--insecure) over the tiny model, then, n times: builds a Down frame sequence the way the fuzzer
does (a seed session of corpus.py changed by 1-4 of the mutator's mutations), sends it on a raw
Session stream, half-closes, reads until the stream ends; then runs a well-formed session (Open,
push, Forward -> ForwardResult) to see the node still serves.

Bad, and reported: a stream that ends with UNKNOWN or INTERNAL (an exception edgetune did not
turn into a status of its own), one that does not end within `stream_timeout_s` of its last frame,
a node that no longer serves a well-formed session, sessions the node still holds at the end.

Only frames that parse are sent: gRPC itself refuses one that does not, with INTERNAL "Exception
deserializing request!", before any edgetune code runs. Every hop after the first of an Open's
route is pointed at a closed port on loopback, so the node never dials out.
"""
from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import torch

from edgetune.proto.v1 import node_pb2, node_pb2_grpc
from edgetune.runtime.security.access import Trust
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import rpc, serde
from edgetune.tests.fuzz import corpus
from edgetune.tests.fuzz.model import write_tiny_folder
from edgetune.tests.fuzz.mutator import FrameMutator

BAD_STATUSES = ("UNKNOWN", "INTERNAL")
NOWHERE = "127.0.0.1:1"  # where the later hops of a fuzzed route point: a closed port


def random_bytes_mutator(rng: random.Random):
    """A byte mutator for FrameMutator outside atheris (atheris.Mutate works only inside atheris.Fuzz):
    flip, insert, delete and truncate bytes."""

    def mutate(data: bytes, max_size: int) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(out) + 1)
            if op < 0.4 and out:
                out[min(i, len(out) - 1)] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                out.insert(i, rng.getrandbits(8))
            elif op < 0.9 and out:
                del out[min(i, len(out) - 1)]
            else:
                del out[i:]
        return bytes(out[:max_size])

    return mutate


def fuzzed_sessions(facts: corpus.NodeFacts, n: int, seed: int) -> list[bytes]:
    """`n` inputs of the down target: seed sessions with 1-4 mutations each (deterministic for `seed`)."""
    rng = random.Random(seed)
    seeds = corpus.seeds("down", facts)
    pool = [r for data in seeds for r in corpus.unpack(data)]
    mutator = FrameMutator(node_pb2.Down, pool, random_bytes_mutator(rng))
    inputs = []
    for _ in range(n):
        data = rng.choice(seeds)
        for _ in range(rng.randint(1, 4)):
            data = mutator.mutate(data, 1 << 16, rng.getrandbits(32))
        inputs.append(data)
    return inputs


def _sendable(data: bytes) -> list[node_pb2.Down]:
    frames = list(corpus.frames_of("down", data))
    for frame in frames:
        if frame.WhichOneof("kind") == "open":
            for hop in frame.open.route[1:]:
                hop.address = NOWHERE
    return frames


def _stream(channel, frames: list[node_pb2.Down], timeout_s: float) -> tuple[str, str]:
    """Send the frames, half-close, read every reply: the status the stream ended with, and its details."""
    try:
        for _ in node_pb2_grpc.NodeStub(channel).Session(iter(frames), timeout=timeout_s):
            pass
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


def _serves(channel, facts: corpus.NodeFacts, session_id: str, timeout_s: float) -> bool:
    """A well-formed session: Open, an empty push, one Forward; True when its ForwardResult comes back."""
    hidden = torch.randn(1, 3, facts.part.config.hidden_size)
    messages = [wire.Open(session_id=session_id, model=facts.model, fingerprint=facts.fingerprint, route=[facts.hop],
                          methods_json='[{"type": "LoraConfig", "fields": {"r": 2}}]'),
                wire.AdapterPush(1, {}),
                wire.Forward(step=0, micro=0, version=1, train=False, dropout_key=None, hidden=hidden)]
    frames = [f for m in messages for f in serde.down_frames(m)]
    try:
        replies = list(serde.read_up(node_pb2_grpc.NodeStub(channel).Session(iter(frames), timeout=timeout_s)))
    except grpc.RpcError:
        return False
    return [type(r).__name__ for r in replies] == ["Opened", "ForwardResult"] and replies[1].hidden.shape == hidden.shape


def live_check(n: int, seed: int = 0, stream_timeout_s: float = 10.0, folder: Path | None = None) -> dict:
    """Feed `n` fuzzed sessions to a real node server; what happened (see the module docstring):

        sequences, frames   sessions and frames sent
        statuses            how the streams ended, by gRPC status name
        bad                 [{status, input (hex, first 512 bytes), details}] for each bad stream
        unhealthy           how often the well-formed session after a fuzzed one failed
        left_open           sessions the node still held at the end
    """
    from edgetune.tests.node_harness import start_route

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; see run.py
    work = Path(folder or tempfile.mkdtemp(prefix="fuzz-live-"))
    local = start_route(write_tiny_folder(work / "model"), [], work)
    started = time.monotonic()
    result = {"sequences": n, "frames": 0, "statuses": Counter(), "bad": [], "unhealthy": 0}
    try:
        facts = corpus.NodeFacts(local.shards[0])
        with rpc.make_channel(local.route.hops[0].address, Trust.insecure(local.token)) as channel:
            for i, data in enumerate(fuzzed_sessions(facts, n, seed)):
                frames = _sendable(data)
                result["frames"] += len(frames)
                status, details = _stream(channel, frames, stream_timeout_s)
                result["statuses"][status] += 1
                if status in BAD_STATUSES or status == "DEADLINE_EXCEEDED":
                    result["bad"].append({"status": status, "details": details[:300], "input": data[:512].hex()})
                if not _serves(channel, facts, f"healthy-{i}", stream_timeout_s):
                    result["unhealthy"] += 1
        deadline = time.monotonic() + 5.0  # a session's worker closes it just after its stream ends
        while local.shards[0].sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        result["left_open"] = sorted(local.shards[0].sessions)
    finally:
        local.stop()
        torch.set_num_threads(threads)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["statuses"] = dict(result["statuses"])
    return result
