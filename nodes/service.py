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
from collections.abc import Iterator
from typing import NamedTuple

import grpc

from edgetune.nodes.shard import Shard, ShardSession
from edgetune.proto.v1 import node_pb2_grpc
from edgetune.runtime.errors import EdgetuneError, SessionError, TrustError
from edgetune.runtime.security.access import Gatekeeper, Peer, Revocations, Trust
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import node_client, rpc, serde

log = logging.getLogger("edgetune.node")

_END = object()  # end of a queue
MAX_PARKED = 16  # Forwards waiting for their adapter version's push, per session


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

    def relay(self, item: serde.Opaque, frames: queue.Queue) -> None:
        if item.first:
            self._lock.acquire()
            self._relaying = True
        frames.put(item.frame)
        if item.last:
            self._relaying = False
            self._lock.release()

    def abandon(self) -> None:
        """The relaying reader's stream ended mid-message: let the worker send again."""
        if self._relaying:
            self._relaying = False
            self._lock.release()


class _Abort(Exception):
    """Ends a session with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Thin: decode -> Shard / relay -> encode."""

    def __init__(self, shard: Shard, trust: Trust, session_deadline_s: float = rpc.SESSION_TIMEOUT_S, *,
                 previous: str = "", revoked: Revocations | None = None) -> None:
        self.shard = shard
        self.trust = trust
        self.previous = previous
        self.gate = Gatekeeper(trust, revoked)
        self.session_deadline_s = session_deadline_s
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
        relay = _Relay(self.shard, self.trust, self.session_deadline_s, owner=peer.name if not self.previous else None)
        with self._relays_lock:
            self._relays[relay] = peer
        try:
            yield from self._serve(relay, request_iterator, context)
        finally:
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
            if item is _END:
                return
            if isinstance(item, _Abort):
                relay.cancel()
                context.abort(item.code, item.message)
            yield item


class _Relay:
    """The state of one session on one node."""

    def __init__(self, shard: Shard, trust: Trust, deadline_s: float, owner: str | None = None) -> None:
        self.shard = shard
        self.trust = trust
        self.owner = owner  # the edge's identity when this node is the first (None: trust the Open's)
        self.deadline_s = deadline_s
        self.out: queue.Queue = queue.Queue()   # Up frames for the previous hop, or _END / _Abort
        self.work_q: queue.Queue = queue.Queue()  # ("down" | "up", message)
        self.session: ShardSession | None = None
        self.codec = "fp32"
        self.adapter_codec = "raw"
        self.next_hop: wire.Hop | None = None
        self._down_q: queue.Queue | None = None   # frames for the next hop
        self._call = None
        self._channel = None
        self._closed = threading.Event()
        self._up_gate = _Gate()  # the worker and the downstream reader both send up
        self._input_grads: dict[tuple[int, int], bool] = {}  # (step, micro) -> the previous hop wants dL/d(input)
        self._down_gate = _Gate()  # the worker and the upstream reader both send down
        self._started = threading.Event()  # the worker handled the session's first message (Open): relays may go
        self._parked: list[wire.Forward] = []  # Forwards whose version's push has not arrived yet

    # -- threads ----------------------------------------------------------------------
    def read_upstream(self, frames) -> None:
        """Assemble frames from the previous hop into messages for the worker."""
        assembler = serde.Assembler("down", pass_through=_is_relayed_push)
        try:
            for frame in frames:
                msg = assembler.feed(frame)
                self._count_in(frame)
                if isinstance(msg, serde.Opaque):
                    refused = self._relay_push(msg)
                    if refused is not None:
                        self.work_q.put(("abort", refused))
                        return
                elif msg is not None:
                    self.work_q.put(("down", msg))
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
                if kind == "end":
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
        try:
            for frame in responses:
                msg = assembler.feed(frame)
                if msg is None:
                    continue
                if isinstance(msg, serde.Opaque):
                    self._relay_up(msg)
                    if msg.last:  # after the last of the next node's BackwardResults (same stream)
                        self.work_q.put(("up", _RelayedGradients(msg.header.step, msg.header.version)))
                elif isinstance(msg, (wire.ForwardResult, wire.ItemError)):
                    self._up(msg)
                else:
                    self.work_q.put(("up", msg))
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
                self._down(wire.Forward(msg.step, msg.micro, msg.version, msg.train, msg.dropout_key, out, msg.attention_mask))
            else:
                self._up(wire.ForwardResult(msg.step, msg.micro, out))
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
        self.codec = msg.codec
        self.adapter_codec = msg.adapter_codec
        log.info("session %s opened: blocks [%d, %d), %d hop(s) after this node, codec %s", msg.session_id,
                 self.shard.start, self.shard.end, len(msg.route) - 1, msg.codec)
        if len(msg.route) == 1:
            self._up(wire.Opened([self._me()]))
            return
        self.next_hop = msg.route[1]
        self._channel = rpc.make_channel(self.next_hop.address, self.trust, peer=self.next_hop.name)
        self._down_q = queue.Queue()
        self._call = node_client.open_session(self._channel, self._frames_down(), self.deadline_s)
        threading.Thread(target=self.read_downstream, args=(self._call,), daemon=True, name="edgetune-session-next").start()
        self._down(wire.Open(msg.session_id, msg.model, msg.fingerprint, msg.route[1:], msg.codec, msg.methods_json,
                             msg.adapter_codec, msg.owner, msg.micro_batch_size, msg.seq_len, msg.micro_batches))

    # -- plumbing -----------------------------------------------------------------------
    def _me(self) -> wire.Hop:
        return wire.Hop(self.shard.name, "", self.shard.start, self.shard.end)

    def _up(self, msg) -> None:
        adapter_codec = None if self.adapter_codec == "raw" else self.adapter_codec
        with self._up_gate:
            for frame in serde.up_frames(msg, codec=self.codec, adapter_codec=adapter_codec):
                self._count_out(frame)
                self.out.put(frame)

    def _relay_up(self, item: serde.Opaque) -> None:
        """One frame of a later node's Gradients, up as it came."""
        self._count_out(item.frame)
        self._up_gate.relay(item, self.out)

    def _relay_push(self, item: serde.Opaque) -> _Abort | None:
        """(Reader thread) one frame of an AdapterPush for a later node, straight down as it came, one
        hop nearer its node (once the worker has handled Open and so connected the next node); an
        _Abort to end the session with when there is no next node."""
        if item.first:
            self._started.wait()
            if self.next_hop is None:
                where = "before the session's Open" if self.session is None else f"past node {self.shard.name}, the last of the route"
                return _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"an adapter push addressed {item.header.hops_ahead} hop(s) {where}")
            item.frame.adapter.hops_ahead -= 1
        self._down_gate.relay(item, self._down_q)
        return None

    def _down(self, msg) -> None:
        with self._down_gate:
            for frame in serde.down_frames(msg, codec=self.codec):
                self._down_q.put(frame)

    def _frames_down(self) -> Iterator:
        while True:
            frame = self._down_q.get()
            if frame is _END:
                return
            yield frame

    def _count_in(self, frame) -> None:
        if self.session is not None:
            self.session.timing.bytes_in += serde.frame_bytes(frame)

    def _count_out(self, frame) -> None:
        if self.session is not None:
            self.session.timing.bytes_out += serde.frame_bytes(frame)

    def end(self, abort: _Abort) -> None:
        """End the session from outside (the caller was revoked): the stream closes with `abort`."""
        self.out.put(abort)
        self.cancel()

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


def serve(shard: Shard, trust: Trust, host: str = "0.0.0.0", port: int = 0, max_workers: int = 16, *,
          previous: str = "", revoked: Revocations | None = None):
    """Start a node server for `shard`; returns (server, port). Serves the health service too.

    `previous`: the node before this one on its route ("" for the first, which edges call)."""
    servicer = NodeServicer(shard, trust, previous=previous, revoked=revoked)
    server, bound, _ = rpc.start_server(lambda server: node_pb2_grpc.add_NodeServicer_to_server(servicer, server),
                                        trust, host, port, f"node {shard.name}", max_workers)
    return server, bound
