"""The node's gRPC service: one relaying session per edge stream, over a `Shard`.

A session is a bidirectional stream. Messages going down the route (Open,
AdapterPush, Forward, Backward, EndStep) are handled here in order by one worker
thread; the node opens the same kind of stream to the next node of the route
and relays. Messages coming up from the next node are either relayed straight
up (ForwardResult, errors: no compute, so the pipeline keeps moving) or need
this node's compute (BackwardResult -> this stage's backward) and join the
worker's queue.

Adapter traffic of later nodes passes through unopened: an AdapterPush addressed
hops ahead is relayed frame by frame as it arrives, by the reading thread itself
once Open is handled (cut-through, its tensors never decoded or kept, and never
queued behind this node's compute), and so are the later nodes' Gradients going up; when those have gone up,
this node sends its own stage's Gradients after them. So a later node's push may
overtake a Forward sent before it: a Forward for a version this node does not hold
yet waits (a few at most) for the push that brings it.

    edge ==Session==> node A ==Session==> node B
         <== up ======        <== up ======

Errors: a problem with one item (missing activations, stale adapter version)
goes up as an ItemError and the session stays usable; a malformed frame or a
broken next hop ends this session with a status; the node keeps serving others.

Overload (`NodeLimits`): a session beyond the node's max_sessions, or one whose queues pass their
limits (messages waiting for the node's compute, bytes waiting anywhere: a client sending faster
than the node computes, or not reading its results), ends with RESOURCE_EXHAUSTED; the edge
re-routes, and the node's threads and memory stay bounded.

Trust: with mutual TLS the first node of a route serves only edges and each later
node only the node before it on the route the coordinator placed (`previous`); a
session belongs to the edge that opened it (the first node writes the edge's
identity into Open, later nodes take it from the authenticated previous node), and
another edge naming it is refused. A revoked caller's open sessions end within the
time the coordinator takes to hand this node the list (about a second).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import grpc

from edgetune.nodes.shard import Shard, ShardSession
from edgetune.proto.v1 import node_pb2_grpc
from edgetune.runtime.errors import ConfigError, EdgetuneError, SessionError, TrustError
from edgetune.runtime.security.access import Gatekeeper, Peer, Revocations, Trust
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import node_client, rpc, serde

log = logging.getLogger("edgetune.node")

_END = object()  # end of a queue
MAX_PARKED = 16  # Forwards waiting for their adapter version's push, per session

# Overload: what one node server takes on before it says RESOURCE_EXHAUSTED (the edge re-routes).
# Each open session holds a thread of the server's pool for its life (and 2-3 of its own); past the
# cap a session ends at once, so the pool keeps UNARY_WORKERS threads for health checks and Info.
MAX_SESSIONS = 32
UNARY_WORKERS = 8
# Messages of one session received but not handled yet. An edge sends a step's forwards all at once,
# then a backward per result, its pushes and an EndStep: about 2 x micro-batches + 4 messages, and
# micro-batches <= batch size (typically <= 16; 64 makes 132). Parked forwards are not counted.
MAX_PENDING = 256
# Bytes of frames one session holds in its queues (waiting for the worker, for the previous hop or
# for the next). A session admitted with a larger activations reservation may hold that much instead:
# its blocks save >= 8 x their input per token, while its queues hold at most a step's hidden states
# in and gradients out (2 x). The floor covers undeclared shapes: a default run (4 x 512 tokens) of a
# hidden size 4096 model moves 32 MiB of fp32 hidden states a step.
MAX_PENDING_BYTES = 256 << 20
FRAME_OVERHEAD_BYTES = 1024  # what a queued frame costs beyond its serialized bytes: empty frames count too


@dataclass(frozen=True)
class NodeLimits:
    """How much one node server takes on; `serve(limits=NodeLimits(max_sessions=4))` in tests."""

    max_sessions: int = MAX_SESSIONS
    max_pending: int = MAX_PENDING
    max_pending_bytes: int = MAX_PENDING_BYTES

    def __post_init__(self) -> None:
        bad = [f"{k} must be positive, got {v}" for k, v in vars(self).items() if v <= 0]
        if bad:
            raise ConfigError("node limits: " + "; ".join(bad))


class _RelayedGradients(NamedTuple):
    """The next node's Gradients went up unopened: time for this stage's own."""

    step: int
    version: int


def _is_relayed_push(kind: str, header) -> bool:
    return kind == "adapter" and header.hops_ahead > 0


def _is_relayed_gradients(kind: str, header) -> bool:
    return kind == "gradients"


class _Gate:
    """Keeps one message's frames together on a queue that two threads write: the worker sends
    whole messages (`with gate:`), a reader relays another node's message frame by frame
    (`relay`), holding the gate from its first frame to its last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._relaying = False

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def relay(self, item: serde.Opaque, frames: _Queue, size: int | None = None) -> None:
        if item.first:
            self._lock.acquire()
            self._relaying = True
        frames.put_frame(item.frame, size)
        if item.last:
            self._relaying = False
            self._lock.release()

    def abandon(self) -> None:
        """The relaying reader's stream ended mid-message: let the worker send again."""
        if self._relaying:
            self._relaying = False
            self._lock.release()


class _Backlog:
    """What one session holds in its queues, against its limits: messages the worker has not handled
    yet, and the bytes of every queued frame or message (each plus FRAME_OVERHEAD_BYTES). The first
    time a limit is passed, `on_over(what)` runs (outside the lock): the session ends, so a client
    that sends faster than the node computes, or never reads its results, cannot grow the node's memory."""

    def __init__(self, max_messages: int, max_bytes: int, on_over: Callable[[str], None]) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self._on_over = on_over
        self._over = False
        self._lock = threading.Lock()

    def add(self, n_bytes: int, messages: int = 0) -> None:
        with self._lock:
            self.messages += messages
            self.bytes += n_bytes
            what = None
            if self.messages > self.max_messages:
                what = f"{self.messages} messages wait for its compute (at most {self.max_messages})"
            elif self.bytes > self.max_bytes:
                what = (f"{self.bytes / 2**20:.1f} MiB wait in its queues "
                        f"(at most {self.max_bytes / 2**20:.1f} MiB)")
            first = what is not None and not self._over
            self._over = self._over or first
        if first:
            self._on_over(what)

    def remove(self, n_bytes: int, messages: int = 0) -> None:
        with self._lock:
            self.messages -= messages
            self.bytes -= n_bytes


class _Queue:
    """A queue of one session whose entries count against its `_Backlog` from put to get."""

    def __init__(self, backlog: _Backlog) -> None:
        self._q: queue.Queue = queue.Queue()
        self._backlog = backlog

    def put(self, item, n_bytes: int = 0, messages: int = 0) -> None:
        self._q.put((item, n_bytes, messages))
        if n_bytes or messages:
            self._backlog.add(n_bytes, messages)

    def put_frame(self, frame, size: int | None = None) -> None:
        """Queue `frame`, counting its encoded `size` (serde.frame_bytes; measured here when not given:
        measuring re-encodes the frame, so callers that already did pass it on)."""
        self.put(frame, _frame_cost(frame, size))

    def get(self):
        item, n_bytes, messages = self._q.get()
        if n_bytes or messages:
            self._backlog.remove(n_bytes, messages)
        return item


def _frame_cost(frame, size: int | None = None) -> int:
    return (serde.frame_bytes(frame) if size is None else size) + FRAME_OVERHEAD_BYTES


class _Abort(Exception):
    """Ends a session with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Thin: decode -> Shard / relay -> encode."""

    def __init__(self, shard: Shard, trust: Trust, session_deadline_s: float = rpc.SESSION_TIMEOUT_S, *,
                 previous: str = "", revoked: Revocations | None = None, limits: NodeLimits = NodeLimits()) -> None:
        self.shard = shard
        self.trust = trust
        self.previous = previous
        self.gate = Gatekeeper(trust, revoked)
        self.session_deadline_s = session_deadline_s
        self.limits = limits
        self._relays: dict[_Relay, Peer] = {}
        self._relays_lock = threading.Lock()
        self.gate.revoked.on_change(self._end_revoked)

    def Info(self, request, context):
        try:
            self.gate.admit(context, ("edge", "node", "coordinator"), f"node {self.shard.name}: Info")
        except TrustError as e:
            rpc.abort(context, e)
        return serde.node_info_to_pb(self.shard.info())

    def _admit_session(self, context) -> Peer:
        what = f"node {self.shard.name}: Session"
        if not self.previous:
            return self.gate.admit(context, ("edge",), what + " (the first node of a route serves edges)")
        peer = self.gate.admit(context, ("node",), what)
        if self.trust.secure and peer.name != self.previous:
            raise TrustError(f"{what}: node {peer.name!r} is not before this node on the route the coordinator "
                             f"placed (node {self.previous!r} is)", code="PERMISSION_DENIED")
        return peer

    def _end_revoked(self, serials: frozenset[int]) -> None:
        with self._relays_lock:
            revoked = [(r, p) for r, p in self._relays.items() if p.serial in serials]
        for relay, peer in revoked:
            log.warning("node %s: ending a session of revoked %s %r", self.shard.name, peer.role, peer.name)
            relay.end(_Abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer.role} {peer.name!r} was revoked"))

    def Session(self, request_iterator, context) -> Iterator:
        try:
            peer = self._admit_session(context)
        except TrustError as e:
            rpc.abort(context, e)
        relay = _Relay(self.shard, self.trust, self.session_deadline_s, owner=peer.name if not self.previous else None,
                       limits=self.limits)
        with self._relays_lock:
            held = len(self._relays)
            if held < self.limits.max_sessions:
                self._relays[relay] = peer
        if held >= self.limits.max_sessions:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {self.shard.name} holds {held} sessions, as many as it accepts "
                          f"(max_sessions={self.limits.max_sessions}): retry in a while, or ask the coordinator "
                          "for a route through other nodes")
        # the count drops however the call ends: a cancelled one may never resume this generator
        if not context.add_callback(lambda: self._forget(relay)):
            self._forget(relay)
        try:
            yield from self._serve(relay, request_iterator, context)
        finally:
            self._forget(relay)

    def _forget(self, relay: _Relay) -> None:
        with self._relays_lock:
            self._relays.pop(relay, None)

    def _serve(self, relay: _Relay, request_iterator, context) -> Iterator:
        context.add_callback(relay.cancel)
        reader = threading.Thread(target=relay.read_upstream, args=(request_iterator,), daemon=True,
                                  name="edgetune-session-in")
        worker = threading.Thread(target=relay.work, daemon=True, name="edgetune-session-work")
        reader.start()
        worker.start()
        while True:
            item = relay.out.get()
            if relay.ending is not None:  # revoked or overloaded: ahead of the frames still queued
                item = relay.ending
            if item is _END:
                return
            if isinstance(item, _Abort):
                relay.cancel()
                context.abort(item.code, item.message)
            yield item


class _Relay:
    """The state of one session on one node."""

    def __init__(self, shard: Shard, trust: Trust, deadline_s: float, owner: str | None = None,
                 limits: NodeLimits = NodeLimits()) -> None:
        self.shard = shard
        self.trust = trust
        self.owner = owner  # the edge's identity when this node is the first (None: trust the Open's)
        self.deadline_s = deadline_s
        self.backlog = _Backlog(limits.max_pending, limits.max_pending_bytes, self._overloaded)
        self.out = _Queue(self.backlog)     # Up frames for the previous hop, or _END / _Abort
        self.work_q = _Queue(self.backlog)  # ("down" | "up", message), ("abort", _Abort), ("end", None)
        self.ending: _Abort | None = None  # how end() ends the stream, ahead of queued frames
        self.session: ShardSession | None = None
        self.codec = "fp32"
        self.adapter_codec = "raw"
        self.next_hop: wire.Hop | None = None
        self.later_nodes = 0  # nodes after this one on the route: each sends its Gradients up through here
        self._down_q: _Queue | None = None   # frames for the next hop
        self._call = None
        self._channel = None
        self._closed = threading.Event()
        self._up_gate = _Gate()  # the worker and the downstream reader both send up
        self._input_grads: dict[tuple[int, int], bool] = {}  # (step, micro) -> the previous hop wants dL/d(input)
        self._down_gate = _Gate()  # the worker and the upstream reader both send down
        self._open_queued = False  # (reader thread) an Open went to the worker: relays may wait for it
        self._started = threading.Event()  # the worker handled the session's first message (Open): relays may go
        self._parked: list[wire.Forward] = []  # Forwards whose version's push has not arrived yet

    # -- threads ----------------------------------------------------------------------
    def read_upstream(self, frames) -> None:
        """Assemble frames from the previous hop into messages for the worker."""
        assembler = serde.Assembler("down", pass_through=_is_relayed_push)
        held = 0  # bytes of the frames of the message being assembled
        try:
            for frame in frames:
                msg = assembler.feed(frame)
                size = serde.frame_bytes(frame)  # once a frame: it re-encodes the frame
                self._count_in(size)
                held += _frame_cost(frame, size)
                if isinstance(msg, serde.Opaque):
                    held = 0  # the frame counts on the next hop's queue instead
                    refused = self._relay_push(msg, size)
                    if refused is not None:
                        self.work_q.put(("abort", refused))
                        return
                elif msg is not None:
                    self._open_queued = self._open_queued or isinstance(msg, wire.Open)
                    self.work_q.put(("down", msg), held, messages=1)
                    held = 0
                if self._closed.is_set():  # ended (overloaded, revoked): read no more
                    return
            assembler.close()
        except EdgetuneError as e:  # WireError: malformed or truncated input
            self.work_q.put(("abort", _Abort(rpc.status_code_for(e), str(e))))
            return
        except Exception:  # the previous hop went away (cancelled stream)
            pass
        finally:
            self._down_gate.abandon()
        self.work_q.put(("end", None))

    def work(self) -> None:
        """Handle messages in order; the only thread that runs this session's torch code."""
        try:
            while True:
                kind, msg = self.work_q.get()
                if kind == "end" or self._closed.is_set():
                    break
                if kind == "abort":
                    self.out.put(msg)
                    break
                try:
                    self._handle_down(msg) if kind == "down" else self._handle_up(msg)
                except SessionError as e:
                    if self.session is None:  # nothing to keep serving: end the stream
                        raise _Abort(rpc.status_code_for(e), str(e)) from None
                    step, micro = getattr(msg, "step", 0), getattr(msg, "micro", 0)
                    self._up(wire.ItemError(e.code, str(e), self.shard.name, step, micro))
                self._started.set()
        except _Abort as a:
            self.out.put(a)
        except EdgetuneError as e:
            self.out.put(_Abort(rpc.status_code_for(e), str(e)))
        except Exception as e:  # a bug: say so instead of hanging the edge
            log.exception("session failed on node %s", self.shard.name)
            self.out.put(_Abort(grpc.StatusCode.INTERNAL, f"node {self.shard.name}: {type(e).__name__}: {e}"))
        finally:
            self.close()
            self.out.put(_END)

    def read_downstream(self, responses) -> None:
        """Up frames from the next hop: relay results, queue what needs this stage's compute."""
        assembler = serde.Assembler("up", pass_through=_is_relayed_gradients)
        relayed = 0  # later nodes' Gradients of the current EndStep round gone up so far
        held = 0  # bytes of the frames of the message being assembled
        try:
            for frame in responses:
                msg = assembler.feed(frame)
                size = serde.frame_bytes(frame)
                held += _frame_cost(frame, size)
                if msg is None:
                    continue
                cost, held = held, 0  # what a message for the worker holds (frames up count on their queue)
                if isinstance(msg, serde.Opaque):
                    self._relay_up(msg, size)
                    if msg.last:
                        relayed += 1
                    # every later node's Gradients have gone up (each after its own backwards, so after
                    # the last BackwardResult of this stream): this stage's own may follow
                    if msg.last and relayed == self.later_nodes:
                        relayed = 0
                        self.work_q.put(("up", _RelayedGradients(msg.header.step, msg.header.version)))
                elif isinstance(msg, (wire.ForwardResult, wire.StageOutput, wire.ItemError)):
                    self._up(msg)
                else:
                    self.work_q.put(("up", msg), cost)
        except grpc.RpcError as e:
            if not self._closed.is_set():
                hop = self.next_hop
                code = e.code() if e.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.UNAVAILABLE
                self.work_q.put(("abort", _Abort(code, f"next node {hop.name} at {hop.address}: {e.details()}")))
        except EdgetuneError as e:
            self.work_q.put(("abort", _Abort(grpc.StatusCode.INTERNAL, f"next node {self.next_hop.name} sent {e}")))
        finally:
            self._up_gate.abandon()

    # -- handlers -----------------------------------------------------------------------
    def _handle_down(self, msg) -> None:
        if isinstance(msg, wire.Open):
            return self._open(msg)
        if self.session is None:
            raise SessionError("unknown session: the first message of a session must be Open", code="FAILED_PRECONDITION")
        s = self.session
        if isinstance(msg, wire.AdapterPush):
            s.push_adapter(msg)
            parked, self._parked = self._parked, []
            for forward in parked:  # in the order they came; still too new ones park again
                try:
                    self._handle_down(forward)
                except SessionError as e:
                    self._up(wire.ItemError(e.code, str(e), self.shard.name, forward.step, forward.micro))
        elif isinstance(msg, wire.Forward):
            if s.version is None or msg.version == s.version + 1:  # its push is on its way (sent after it)
                if len(self._parked) >= MAX_PARKED:
                    raise SessionError(f"{len(self._parked)} forwards already wait for adapter version {msg.version} "
                                       f"on node {self.shard.name}, which holds {s.version}: push it first",
                                       code="FAILED_PRECONDITION")
                self._parked.append(msg)
                return
            out = s.forward(msg)
            if self.next_hop is not None:
                self._down(replace(msg, hidden=out))
            else:
                self._up(wire.ForwardResult(msg.step, msg.micro, out))
            if msg.echo:  # verified: this stage's output goes up too, exactly (after the pipeline's own)
                self._up(wire.StageOutput(msg.step, msg.micro, self.shard.name, out))
        elif isinstance(msg, wire.Backward):
            if self.next_hop is None:
                grad = s.backward(msg.step, msg.micro, msg.grad)
                self._up(wire.BackwardResult(msg.step, msg.micro, grad if msg.input_grad else None))
            elif not s.has_activation(msg.step, msg.micro):
                raise s.missing(msg.step, msg.micro)  # no use asking the next nodes first
            else:
                self._input_grads[(msg.step, msg.micro)] = msg.input_grad
                self._down(wire.Backward(msg.step, msg.micro, msg.grad))  # this node needs the next one's
        elif isinstance(msg, wire.EndStep):
            if self.next_hop is not None:
                self._down(msg)
            else:
                grads, timing = s.end_step(msg)
                self._up(wire.Gradients(msg.step, msg.version, s.with_feedback(grads), [timing]))
        else:
            raise SessionError(f"unexpected message {type(msg).__name__} going down", code="INVALID_ARGUMENT")

    def _handle_up(self, msg) -> None:
        s = self.session
        if isinstance(msg, wire.Opened):
            self._up(wire.Opened([self._me()] + msg.route))
        elif isinstance(msg, wire.BackwardResult):
            if msg.grad is None:
                raise SessionError(f"next node {self.next_hop.name} returned no input gradient for micro-batch "
                                   f"{msg.micro}", code="INTERNAL")
            grad = s.backward(msg.step, msg.micro, msg.grad)
            wanted = self._input_grads.pop((msg.step, msg.micro), True)
            self._up(wire.BackwardResult(msg.step, msg.micro, grad if wanted else None))
        elif isinstance(msg, _RelayedGradients):
            self._input_grads = {k: v for k, v in self._input_grads.items() if k[0] >= msg.step}
            grads, timing = s.end_step(wire.EndStep(msg.step, msg.version))
            self._up(wire.Gradients(msg.step, msg.version, s.with_feedback(grads), [timing]))

    def _open(self, msg: wire.Open) -> None:
        if self.session is not None:
            raise SessionError("Open sent twice in one session", code="FAILED_PRECONDITION")
        if self.owner is not None:
            msg.owner = self.owner  # whatever the edge wrote: its certificate says who it is
        self.session = self.shard.open_session(msg)
        # the node admitted this session's activations; its queues hold a fraction of them (MAX_PENDING_BYTES)
        self.backlog.max_bytes = max(self.backlog.max_bytes, self.session.reserved_bytes)
        self.codec = msg.codec
        self.adapter_codec = msg.adapter_codec
        log.info("session %s opened: blocks [%d, %d), %d hop(s) after this node, codec %s", msg.session_id,
                 self.shard.start, self.shard.end, len(msg.route) - 1, msg.codec)
        if len(msg.route) == 1:
            self._up(wire.Opened([self._me()]))
            return
        self.next_hop = msg.route[1]
        self.later_nodes = len(msg.route) - 1
        self._channel = rpc.make_channel(self.next_hop.address, self.trust, peer=self.next_hop.name)
        self._down_q = _Queue(self.backlog)
        self._call = node_client.open_session(self._channel, self._frames_down(), self.deadline_s)
        threading.Thread(target=self.read_downstream, args=(self._call,), daemon=True, name="edgetune-session-next").start()
        self._down(replace(msg, route=msg.route[1:]))  # the owner as this node set it

    # -- plumbing -----------------------------------------------------------------------
    def _me(self) -> wire.Hop:
        dtype, quantize = self.shard.precision()
        return wire.Hop(self.shard.name, "", self.shard.start, self.shard.end, dtype, quantize)

    def _up(self, msg) -> None:
        adapter_codec = None if self.adapter_codec == "raw" else self.adapter_codec
        with self._up_gate:
            for frame in serde.up_frames(msg, codec=self.codec, adapter_codec=adapter_codec):
                size = serde.frame_bytes(frame)
                self._count_out(size)
                self.out.put_frame(frame, size)

    def _relay_up(self, item: serde.Opaque, size: int | None = None) -> None:
        """One frame of a later node's Gradients, up as it came."""
        size = serde.frame_bytes(item.frame) if size is None else size
        self._count_out(size)
        self._up_gate.relay(item, self.out, size)

    def _relay_push(self, item: serde.Opaque, size: int | None = None) -> _Abort | None:
        """(Reader thread) one frame of an AdapterPush for a later node, straight down as it came, one
        hop nearer its node (once the worker has handled Open and so connected the next node); an
        _Abort to end the session with when there is no next node."""
        if item.first:
            if not self._open_queued:  # nothing will ever handle an Open: refuse now, do not wait for one
                return _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"an adapter push addressed {item.header.hops_ahead} "
                              "hop(s) before the session's Open")
            self._started.wait()
            if self.next_hop is None:
                where = "before the session's Open" if self.session is None else f"past node {self.shard.name}, the last of the route"
                return _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"an adapter push addressed {item.header.hops_ahead} hop(s) {where}")
            item.frame.adapter.hops_ahead -= 1
        self._down_gate.relay(item, self._down_q, size)
        return None

    def _down(self, msg) -> None:
        with self._down_gate:
            for frame in serde.down_frames(msg, codec=self.codec):
                self._down_q.put_frame(frame)

    def _frames_down(self) -> Iterator:
        while True:
            frame = self._down_q.get()
            if frame is _END:
                return
            yield frame

    def _count_in(self, size: int) -> None:
        if self.session is not None:
            self.session.timing.bytes_in += size

    def _count_out(self, size: int) -> None:
        if self.session is not None:
            self.session.timing.bytes_out += size

    def end(self, abort: _Abort) -> None:
        """End the session from outside the worker (the caller was revoked, the session overloaded): the
        stream closes with `abort`, ahead of the frames still waiting to go up."""
        if self.ending is None:
            self.ending = abort
        self.cancel()  # first: once the caller hears `abort`, the worker takes no more messages
        self.out.put(abort)  # wakes the stream's thread

    def _overloaded(self, what: str) -> None:
        """(Whichever thread queued past a limit) the session ends with RESOURCE_EXHAUSTED."""
        log.warning("node %s: ending an overloaded session: %s", self.shard.name, what)
        self.end(_Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"node {self.shard.name} ended the session: {what}; the edge sends faster than the node "
                        "computes, or does not read its results: send a step's micro-batches, then read their "
                        "results as they come"))

    def cancel(self) -> None:
        """The previous hop went away: stop relaying and free the session."""
        self.work_q.put(("end", None))
        self.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._started.set()  # a reader waiting to relay finds no next node and stops
        if self._down_q is not None:
            self._down_q.put(_END)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            self._channel.close()
        if self.session is not None:
            self.shard.close_session(self.session.session_id, self.session)


def serve(shard: Shard, trust: Trust, host: str = "0.0.0.0", port: int = 0, max_workers: int | None = None, *,
          previous: str = "", revoked: Revocations | None = None, limits: NodeLimits = NodeLimits()):
    """Start a node server for `shard`; returns (server, port). Serves the health service too.

    `previous`: the node before this one on its route ("" for the first, which edges call).
    `max_workers`: the thread pool (default: `limits.max_sessions` + UNARY_WORKERS); calls beyond
    twice that many at once get gRPC's own RESOURCE_EXHAUSTED instead of waiting in its queue."""
    workers = limits.max_sessions + UNARY_WORKERS if max_workers is None else max_workers
    if workers <= limits.max_sessions:
        raise ConfigError(f"node {shard.name}: max_workers={workers} leaves no thread beside "
                          f"max_sessions={limits.max_sessions} sessions for health checks and Info: "
                          f"use at least {limits.max_sessions + 1}")
    servicer = NodeServicer(shard, trust, previous=previous, revoked=revoked, limits=limits)
    server, bound, _ = rpc.start_server(lambda server: node_pb2_grpc.add_NodeServicer_to_server(servicer, server),
                                        trust, host, port, f"node {shard.name}", workers,
                                        max_concurrent_rpcs=2 * workers)
    return server, bound
