"""What one fuzz input runs, and what counts as a finding.

Only edgetune's own exceptions (`EdgetuneError`: WireError, SessionError, AdapterError, ...) may
come out of code that parses remote input: they become a gRPC status or an ItemError that says
what was wrong. Anything else -- an IndexError, torch's RuntimeError on a shape mismatch, a
MemoryError from a size the sender declared -- is a bug, and so is a session that never ends
after its stream did, or a reply frame the node builds that does not parse back.

    down   Down frames -> the node's reader (`serde.Assembler("down")` with the servicer's
           pass-through of relayed pushes) -> the servicer's `_Relay` (its reader and worker
           threads, exactly as `NodeServicer.Session` runs them) over a real `Shard` of a tiny
           model. A route past this node leads to a stand-in next node that reads what it is
           sent (through its own Assembler) and answers nothing: the fuzzer never dials out.
    up     Up frames -> `serde.Assembler("up")`, as the edge reads them, and with the relaying
           node's pass-through of later nodes' Gradients
    unary  every unary decoder of serde (requests the coordinator reads, replies the edge and
           nodes read) and `read_edge_part`
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf.message import DecodeError

from edgetune.nodes import service
from edgetune.runtime.errors import EdgetuneError
from edgetune.runtime.security.access import Trust
from edgetune.runtime.wire import node_client, rpc, serde
from edgetune.tests.fuzz.corpus import UNARY_TYPES, frames_of, unpack

SESSION_HANG_S = 10.0  # a session of a few small frames on a 2-block width-32 model ends in milliseconds


class Hang(Exception):
    """A session that did not end within SESSION_HANG_S of its stream ending."""


class BadReply(Exception):
    """The node sent a reply frame that its peer's serde refuses."""


# -- unary -------------------------------------------------------------------------------
UNARY_DECODERS: dict[str, Callable] = {
    "JoinRequest": serde.join_request_from_pb, "RouteRequest": serde.route_request_from_pb,
    "EnrollRequest": serde.enroll_request_from_pb, "RenewRequest": serde.renew_request_from_pb,
    "EdgePartRequest": serde.edge_part_request_from_pb, "NodeInfo": serde.node_info_from_pb,
    "Route": serde.route_from_pb, "ClusterStatus": serde.cluster_status_from_pb,
    "JoinReply": serde.join_reply_from_pb, "EnrollReply": serde.enrolled_from_pb, "Hop": serde.hop_from_pb,
    "EdgePartFrame": serde.read_edge_part,  # a stream: every record is one frame
}


def run_unary(data: bytes) -> None:
    records = unpack(data)
    if not records:
        return
    name = records[0].decode("utf-8", "replace")
    pb_type = UNARY_TYPES.get(name)
    if pb_type is None:
        return
    messages = []
    for record in records[1:]:
        try:
            messages.append(pb_type.FromString(record))
        except DecodeError:  # gRPC refuses a message that does not parse before any edgetune code runs
            break
    try:
        if name == "EdgePartFrame":
            serde.read_edge_part(messages)
        elif messages:
            UNARY_DECODERS[name](messages[0])
    except EdgetuneError:
        pass


# -- up ----------------------------------------------------------------------------------
def run_up(data: bytes) -> None:
    for pass_through in (None, service._is_relayed_gradients):  # the edge; a node relaying later nodes'
        assembler = serde.Assembler("up", pass_through=pass_through)
        try:
            for frame in frames_of("up", data):
                assembler.feed(frame)
            assembler.close()
        except EdgetuneError:
            pass


# -- down: a node's session -------------------------------------------------------------
class _SilentNextNode:
    """Stands in for the next node of a route (node_client.open_session's call): reads every frame
    sent to it through a Down Assembler -- relayed frames must still be well-formed -- and answers
    nothing; iterating it ends when its stream does."""

    def __init__(self, frames: Iterator, errors: list) -> None:
        self._done = threading.Event()
        self._errors = errors
        threading.Thread(target=self._read, args=(frames,), daemon=True, name="fuzz-next-node").start()

    def _read(self, frames: Iterator) -> None:
        assembler = serde.Assembler("down", pass_through=lambda kind, header: kind == "adapter")
        try:
            for frame in frames:
                assembler.feed(type(frame).FromString(frame.SerializeToString()))
        except EdgetuneError as e:
            self._errors.append(BadReply(f"the node relayed a frame the next node refuses: {e}"))
        except Exception as e:
            self._errors.append(e)
        finally:
            self._done.set()

    def __iter__(self):
        self._done.wait()
        return iter(())

    def cancel(self) -> None:
        self._done.set()


class _Bugs(logging.Handler):
    """Collects what the servicer's catch-alls log (`log.exception`) and uncaught thread exceptions."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.add(record.exc_info[1])

    def add(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)

    def take(self) -> list[BaseException]:
        with self._lock:
            out, self.errors = self.errors, []
        return out


class NodeTarget:
    """The down target: one input is one session stream to `shard` (see the module docstring)."""

    def __init__(self, shard) -> None:
        self.shard = shard
        self.bugs = _Bugs()
        logging.getLogger("edgetune.node").addHandler(self.bugs)
        logging.getLogger("edgetune.node").setLevel(logging.ERROR)  # no INFO line per session
        threading.excepthook = lambda args: self.bugs.add(args.exc_value)
        self.relayed: list[BaseException] = []
        # A route past this node reaches the stand-in, never the network.
        rpc.make_channel = lambda *a, **kw: _Channel()
        node_client.open_session = lambda channel, frames, timeout_s: _SilentNextNode(frames, self.relayed)
        self.counts = {"inputs": 0, "messages": 0, "sessions": 0, "replies": 0, "item_errors": 0, "aborts": 0}

    def __call__(self, data: bytes) -> None:
        self.counts["inputs"] += 1
        self._assemble(list(frames_of("down", data)))
        self._serve(list(frames_of("down", data)))  # parsed again: the relay edits the frames it passes on

    def _assemble(self, frames: list) -> None:
        """What the node's reader does with the frames, on its own: only WireError may come out."""
        assembler = serde.Assembler("down", pass_through=service._is_relayed_push)
        try:
            for frame in frames:
                if assembler.feed(frame) is not None:
                    self.counts["messages"] += 1
            assembler.close()
        except EdgetuneError:
            pass

    def _serve(self, frames: list) -> None:
        """The session as NodeServicer._serve runs it: its worker and reader threads, and the stream's
        own loop over `relay.out` (here: into `replies`, checked as the edge would read them)."""
        relay = service._Relay(self.shard, Trust.insecure("fuzz"), 60.0, owner="edge")
        for name in ("_relay_push", "_count_in"):  # the reader's catch-all takes any exception for a hang-up
            setattr(relay, name, self._watched(getattr(relay, name)))
        threading.Thread(target=relay.work, daemon=True, name="fuzz-session-work").start()
        threading.Thread(target=relay.read_upstream, args=(iter(frames),), daemon=True,
                         name="fuzz-session-in").start()
        out: queue.Queue = queue.Queue()  # relay.out, read by a thread of its own so this one can time out

        def drain() -> None:
            while True:
                item = relay.out.get()
                ending = getattr(relay, "ending", None)  # revoked or overloaded: ahead of queued frames
                out.put(ending if ending is not None and item is not service._END else item)
                if item is service._END:
                    return

        threading.Thread(target=drain, daemon=True, name="fuzz-session-out").start()
        replies = serde.Assembler("up")  # what the edge makes of the node's replies
        deadline = time.monotonic() + SESSION_HANG_S
        aborted = False  # the stream ended with a status: nothing after it reaches the edge
        while True:
            try:
                item = out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                relay.cancel()
                self._raise_bugs()
                raise Hang(f"the session did not end within {SESSION_HANG_S} s of its last frame") from None
            if item is service._END:
                break
            if isinstance(item, service._Abort):
                self.counts["aborts"] += 1
                if item.code.name in ("INTERNAL", "UNKNOWN"):
                    self._raise_bugs()
                    raise AssertionError(f"session ended with {item.code.name}: {item.message}")
                aborted = True
                relay.cancel()  # as NodeServicer._serve does; the worker then ends the queue
                continue
            if not aborted:
                self._check_reply(replies, item)
        self._raise_bugs(aborted)
        if self.shard.sessions:  # the session was closed: nothing of it stays on the shard
            raise AssertionError(f"sessions left open on the shard: {list(self.shard.sessions)}")

    def _watched(self, method: Callable) -> Callable:
        def call(*args):
            try:
                return method(*args)
            except EdgetuneError:
                raise
            except Exception as e:
                self.bugs.add(e)
                raise
        return call

    def _check_reply(self, replies: serde.Assembler, frame) -> None:
        try:
            msg = replies.feed(type(frame).FromString(frame.SerializeToString()))
        except EdgetuneError as e:
            raise BadReply(f"the node sent a reply frame its edge refuses: {e}") from None
        if msg is not None:
            self.counts["replies"] += 1
            self.counts["sessions"] += type(msg).__name__ == "Opened"
            self.counts["item_errors"] += type(msg).__name__ == "ItemError"

    def _raise_bugs(self, aborted: bool = False) -> None:
        """Raise the first bug the session's threads met. A session the node ended because its stream was
        malformed may have passed part of a message on to the next node (pushes are relayed frame by frame
        as they arrive, before the node can know the rest will not come): the next node refusing that is
        as it should be, and only a bug in a session that did not end so."""
        relayed = [e for e in self.relayed if not (aborted and isinstance(e, BadReply))]
        errors = self.bugs.take() + relayed
        self.relayed.clear()
        if errors:
            raise errors[0]


class _Channel:
    def close(self) -> None:
        pass


_REPO = Path(__file__).resolve().parents[2]


def where(exc: BaseException) -> str:
    """The innermost frame of edgetune's code (not the fuzz harness's) in `exc`'s traceback, as
    "path:line in function" relative to the repository: what tells one finding from another."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve().is_relative_to(_REPO)]
    own = [f for f in frames if not Path(f.filename).resolve().is_relative_to(_REPO / "tests" / "fuzz")]
    if not (own or frames):
        return "?"
    f = (own or frames)[-1]
    return f"{Path(f.filename).resolve().relative_to(_REPO)}:{f.lineno} in {f.name}"
