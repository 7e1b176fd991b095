"""Distributed fine-tuning from the edge: the engine behind `finetune --coordinator`.

The edge holds the embeddings, final norm and LM head (frozen), the adapter's
master tensors and the optimizer; the blocks run on the nodes of a route the
coordinator hands out. One step:

1. push the adapter tensors the blocks use (a new version) down the route as soon as the
   optimizer made it: one push per stage, which earlier nodes relay unopened as it
   arrives; the first node's goes first, the others right after the first micro-batch,
   so they cross the later hops while the first node computes;
2. embed each micro-batch and send it (all of them at once: the nodes pipeline);
3. as each micro-batch's output returns, compute its loss and send dL/dh back;
4. end the step as soon as the last Backward is sent: every node returns its stage's
   adapter gradients once its own backwards are done (earlier nodes relay them up
   unopened), which flow into the master tensors; finetune's loop clips and steps the
   optimizer.

A step either completes or is replayed whole: when a node fails, the edge drops
the step's gradients, asks the coordinator for a new route (it reassigns the
blocks of a dead node) and replays the step from its first message. Since every
dropout mask is keyed by (seed, step, micro-batch), the replay computes the very
same gradients. The loop is in `RemoteEngine._with_replays`; its knobs are
TrainConfig fields (max_step_retries, route_timeout_s, reply_timeout_s).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from edgetune.runtime.errors import ConfigError, EdgetuneError
from edgetune.runtime.peft.adapter import constants_digest
from edgetune.runtime.peft.stats import STAT_PREFIX, Recorder
from edgetune.runtime.security.access import Trust
from edgetune.runtime.train.loss import head_loss_sum
from edgetune.runtime.train.options import TrainConfig
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import node_client, rpc, serde
from edgetune.runtime.wire.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    credentials_for,
    save_edge_part,
)

log = logging.getLogger("edgetune.remote")

# Status codes after which a replay on a new route can succeed.
HANG_FACTOR = 4.0  # a reply later than this many times the longest step so far: the route hangs
HANG_FLOOR_S = 10.0  # ... but never sooner than this (a loaded machine, a slow link)
RETRYABLE = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED"}
MAX_RESENDS_PER_MICRO = 3  # re-sends of one micro-batch whose activations a node lost


class RouteFailure(EdgetuneError):
    """A node of the route failed or went silent; the step can be replayed on a new route."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed


class _StageGradients:
    """The adapter gradients of one step as the stages' Gradients arrive (one per node and EndStep)."""

    def __init__(self, views: dict[str, torch.Tensor], hops: list[wire.Hop], step: int, version: int) -> None:
        self.views = views
        self.recorded = Recorder()  # what the nodes' methods recorded in the step's forwards (gates)
        self.hops = hops
        self.step, self.version = step, version
        self.due = 0  # Gradients messages still to come
        self.sums: dict[str, torch.Tensor] = {}
        self.stages: dict[str, tuple[int, wire.StageTiming]] = {}  # node -> (stage, its timing summed over EndSteps)

    def add(self, msg: wire.Gradients) -> None:
        from edgetune.runtime.peft.adapter import split_block_key

        if msg.step != self.step or msg.version != self.version or len(msg.timings) != 1:
            raise RouteFailure(f"gradients of step {msg.step} version {msg.version} from {len(msg.timings)} node(s), "
                               f"expected one node's of step {self.step} version {self.version}", [])
        timing = msg.timings[0]
        stats = {k: msg.tensors.pop(k) for k in [k for k in msg.tensors if k.startswith(STAT_PREFIX)]}
        self.recorded.add_tensors({k[len(STAT_PREFIX):]: t for k, t in stats.items()})
        layers = {split_block_key(k)[1] for k in msg.tensors if k in self.views}
        stage = next((i for i, h in enumerate(self.hops) if all(h.start <= layer < h.end for layer in layers)), None)
        for key, g in msg.tensors.items():
            t = self.views.get(key)
            if t is None or not t.requires_grad or tuple(t.shape) != tuple(g.shape) or stage is None:
                raise EdgetuneError(f"node {timing.name} returned a gradient for {key!r} {tuple(g.shape)} that matches "
                                    "no adapter tensor, or tensors of blocks of more than one stage")
            g = g.to(t.device, t.dtype)
            self.sums[key] = g if key not in self.sums else self.sums[key] + g
        if not layers:  # a stage without block tensors: known by name, if at all
            stage = next((i for i, h in enumerate(self.hops) if h.name == timing.name), len(self.hops))
        _, seen = self.stages.setdefault(timing.name, (stage, wire.StageTiming(name=timing.name)))
        for field_name in ("forward_s", "backward_s", "bytes_in", "bytes_out"):
            setattr(seen, field_name, getattr(seen, field_name) + getattr(timing, field_name))
        self.due -= 1

    def into_master(self) -> None:
        if self.sums:
            torch.autograd.backward([self.views[k] for k in self.sums], list(self.sums.values()))

    def timings(self) -> list[dict[str, Any]]:
        """Each node's share of the step, in the route's order."""
        return [{"node": t.name, "forward_s": t.forward_s, "backward_s": t.backward_s, "bytes_in": t.bytes_in,
                 "bytes_out": t.bytes_out} for _, t in sorted(self.stages.values(), key=lambda st: st[0])]


def _expect(msg, kind: type):
    """`msg` when it is a `kind`; a node's error or anything else ends the attempt."""
    if isinstance(msg, wire.ItemError):
        raise EdgetuneError(f"node {msg.node}: {msg.code}: {msg.message}")
    if not isinstance(msg, kind):
        raise RouteFailure(f"expected {kind.__name__}, got {type(msg).__name__}", [])
    return msg


class RouteStream:
    """The one bidirectional stream from the edge to the first node of a route."""

    def __init__(self, route: wire.Route, trust: Trust, open_msg: wire.Open, reply_timeout_s: float) -> None:
        self.route = route
        self.open_msg = open_msg
        self.codec = open_msg.codec
        self.adapter_codec = None if open_msg.adapter_codec == "raw" else open_msg.adapter_codec
        self.reply_timeout_s = reply_timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._addresses = [h.address for h in route.hops]
        self._out: queue.Queue = queue.Queue()
        self._inbox: queue.Queue = queue.Queue()
        self._channel = rpc.make_channel(route.hops[0].address, trust, peer=route.hops[0].name)
        self._call = node_client.open_session(self._channel, self._frames(), rpc.SESSION_TIMEOUT_S)
        threading.Thread(target=self._read, daemon=True, name="edgetune-edge-in").start()
        self.send(open_msg)
        opened = self.recv()
        if not isinstance(opened, wire.Opened):
            raise RouteFailure(f"route did not open: first reply was {type(opened).__name__}", self._addresses)
        self.opened = opened.route  # every node's own hop: its name, blocks, dtype and quantization
        log.info("route open: %s", " -> ".join(f"{h.name}[{h.start},{h.end})" for h in opened.route))

    def send(self, msg) -> None:
        # adapter deltas travel with the adapter codec; a whole push (the replica's start) is exact
        adapter_codec = self.adapter_codec if getattr(msg, "delta", False) else None
        for frame in serde.down_frames(msg, codec=self.codec, adapter_codec=adapter_codec):
            self.bytes_sent += serde.frame_bytes(frame)
            self._out.put(frame)

    def recv(self):
        try:
            item = self._inbox.get(timeout=self.reply_timeout_s)
        except queue.Empty:
            raise RouteFailure(f"no reply from the route for {self.reply_timeout_s:.0f} s", self._addresses) from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self._channel.close()

    def _frames(self):
        while True:
            frame = self._out.get()
            if frame is None:
                return
            yield frame

    def _read(self) -> None:
        assembler = serde.Assembler("up")
        try:
            for frame in self._call:
                self.bytes_received += serde.frame_bytes(frame)
                msg = assembler.feed(frame)
                if msg is not None:
                    self._inbox.put(msg)
            self._inbox.put(RouteFailure("the first node closed the session", self._addresses))
        except grpc.RpcError as e:
            code = e.code()
            text = f"{code.name}: {e.details()}"
            if code.name in RETRYABLE:
                self._inbox.put(RouteFailure(f"route {self._addresses[0]} failed: {text}", self._addresses))
            else:
                self._inbox.put(EdgetuneError(f"node {self.route.hops[0].name} ({self._addresses[0]}) refused: {text}"))
        except EdgetuneError as e:  # WireError: a malformed reply
            self._inbox.put(RouteFailure(f"malformed reply from the route: {e}", self._addresses))


def local_model_folder(model: str) -> Path | None:
    """`model` as a folder on this machine (converting a GGUF once), or None when it is not here."""
    from edgetune.runtime.model.loader import resolve_model_folder

    if model == "embedded" or Path(model).exists():
        return resolve_model_folder(model)
    return None


def round_trip_s(address: str, trust: Trust, samples: int = 5, peer: str | None = None) -> float:
    """The shortest of `samples` health-check round trips to `address` on one open channel (seconds)."""
    with rpc.make_channel(address, trust, peer=peer) as channel:
        best = float("inf")
        try:
            for i in range(samples + 1):  # the first call also connects: not counted
                start = time.perf_counter()
                rpc.check_health(channel)
                if i:
                    best = min(best, time.perf_counter() - start)
        except grpc.RpcError as e:
            raise RouteFailure(f"cannot reach {address} to measure its round trip: {e.code().name}", [address]) from None
    return best


def edge_trust(cfg: TrainConfig) -> tuple[Trust, str]:
    """(how this edge speaks gRPC, the coordinator's HOST:PORT): mutual TLS with the edge's
    credentials (joining first with --join), or --insecure's shared token."""
    if cfg.insecure:
        if not cfg.coordinator:
            raise ConfigError("--insecure needs --coordinator HOST:PORT")
        log.warning("--insecure: plaintext gRPC with a shared token; anyone on the network path can read this "
                    "run's activations and the token. Use it on loopback only.")
        return Trust.insecure(rpc.load_token(Path(cfg.token_file) if cfg.token_file else rpc.default_token_path())), \
            cfg.coordinator
    creds = credentials_for("edge", cfg.credentials or None, cfg.join, cfg.identity or default_edge_name())
    return creds.trust(), cfg.coordinator or creds.coordinator


def default_edge_name() -> str:
    import socket

    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:50].strip("-_.")
    return f"edge-{host or 'host'}"


def route_options(cfg: TrainConfig, banned: set[str]) -> dict[str, Any]:
    """get_route's keywords beyond the model: verifier replicas (--verify), the run's banned nodes."""
    options: dict[str, Any] = {}
    if cfg.verify > 0:
        options["verify"] = True
    if banned:
        options["exclude"] = sorted(banned)
    return options


def check_bans(route: wire.Route, banned: set[str]) -> None:
    """Refuse (for now: the coordinator may still be re-placing) a route through a banned node."""
    used = sorted({h.name for h in route.hops + route.verifiers} & banned)
    if used:  # UNAVAILABLE: new_route asks again until its deadline
        raise CoordinatorError(f"the coordinator's route still uses node(s) {', '.join(used)}, which this run banned "
                               "(a verifier caught them computing wrong hidden states)", "UNAVAILABLE")


class RemoteTrainer:
    """The connection to a cluster, before training starts: trust, coordinator, route, edge folder."""

    def __init__(self, cfg: TrainConfig, client: CoordinatorClient, trust: Trust, route: wire.Route, folder: Path,
                 has_local_model: bool = True) -> None:
        self.cfg = cfg
        self.client = client
        self.trust = trust
        self.route = route
        self.folder = folder
        self.has_local_model = has_local_model  # False: only the edge part was fetched from the cluster
        self.banned: set[str] = set()  # node names a verifier caught computing wrong hidden states (--verify)

    @classmethod
    def connect(cls, cfg: TrainConfig) -> RemoteTrainer:
        from edgetune.runtime.model.manifest import checkpoint_manifest, verify

        trust, address = edge_trust(cfg)
        client = CoordinatorClient(address, trust)
        log.info("asking %s for a route for %s (the first request places the shards)", address, cfg.model)
        route = client.get_route(cfg.model, timeout_s=cfg.route_timeout_s, **route_options(cfg, set()))
        folder, local = cls._edge_folder(cfg.model, route, client)
        # The edge checks its own tensors against the cluster's manifest.
        edge_names = [e.name for e in route.manifest if not e.name.startswith("model.layers.")]
        verify(checkpoint_manifest(folder, edge_names), route.manifest, who=f"the edge's model {folder}")
        return cls(cfg, client, trust, route, folder, has_local_model=local)

    @staticmethod
    def _edge_folder(model: str, route: wire.Route, client: CoordinatorClient) -> tuple[Path, bool]:
        """The model folder here, or the edge's part of it fetched from the cluster (cached by fingerprint)."""
        from edgetune.runtime.model.gguf import default_cache_root

        folder = local_model_folder(model)
        if folder is not None:
            return folder, True
        folder = default_cache_root() / "edge-parts" / route.fingerprint[:32]
        if not (folder / "model.safetensors").exists():
            log.info("%s is not on this machine: fetching only its edge part from the cluster", model)
            save_edge_part(client.fetch_edge_part(model), folder)
        return folder, False

    def start(self, methods, device: torch.device) -> RemoteEngine:
        from edgetune.runtime.model.loader import load_model
        from edgetune.runtime.peft import Adapter

        model = load_model(self.folder, start=0, end=0, edge=True, device=device)  # no blocks
        if model.config.num_layers != self.route.num_layers:
            raise ConfigError(f"the edge's model has {model.config.num_layers} blocks, the route {self.route.num_layers}")
        adapter = Adapter.create(model, methods, seed=self.cfg.seed, block_source=self._block_source(model, methods))
        model.adapter = adapter
        return RemoteEngine(self, model, adapter)

    def _block_source(self, model, methods) -> Callable:
        """Blocks to initialise the adapter from: shapes only, or real blocks one at a time."""
        from edgetune.runtime.model.loader import load_model
        from edgetune.runtime.model.transformer import Block

        config = model.config
        if not any(m.init_reads_weights for m in methods):
            def shapes():
                for layer in range(config.num_layers):
                    with torch.device("meta"):
                        block = Block(config, layer)
                    yield block
            return shapes
        if not self.has_local_model:
            raise ConfigError(f"{type(methods[0]).__name__} starts from the base weights of every block, so the edge "
                              "needs a local copy of the model for it (pass --model as a path on this machine)")

        def weights():
            for layer in range(config.num_layers):  # one block in memory at a time
                yield load_model(self.folder, start=layer, end=layer + 1, edge=False).block(layer)
        return weights

    def choose_micro_batches(self, batch_size: int, seq_len: int) -> int:
        """Micro-batches for this run, from the round trip measured now to the route's first node and
        (when the coordinator has profiled them) the stages' speed; see plan.choose_micro_batches."""
        from edgetune.runtime.plan.cost import REFERENCE_TOKENS
        from edgetune.runtime.plan.planner import choose_micro_batches

        hops = self.route.hops
        rtt = round_trip_s(hops[0].address, self.trust, peer=hops[0].name)
        route_rtt = rtt * len(hops)  # every hop taken to be as far as the edge's: the cautious guess
        try:
            block_s = {n.name: n.block_time_s for n in self.client.status().nodes}
        except EdgetuneError as e:
            log.info("no node profiles from the coordinator (%s)", e)
            block_s = {}
        stage_forward_s = None
        if hops and all(block_s.get(h.name, 0.0) > 0 for h in hops):
            # profiled: forward + backward of one block at REFERENCE_TOKENS tokens; a forward is about a third
            stage_forward_s = max(block_s[h.name] * (h.end - h.start) for h in hops) * batch_size * seq_len / REFERENCE_TOKENS / 3
        m = choose_micro_batches(batch_size, len(hops), route_rtt, stage_forward_s)
        speed = "unknown stage speed" if stage_forward_s is None else f"slowest stage's forward ~{stage_forward_s:.2f} s a batch"
        log.info("micro-batches: %d of %d rows (round trip to %s %.1f ms, %d stage(s), %s)", m, batch_size,
                 hops[0].name, rtt * 1e3, len(hops), speed)
        return m

    def new_route(self, failed: list[str]) -> wire.Route:
        """Ask again until the coordinator answers with a usable route (it reassigns dead nodes' blocks)."""
        deadline = time.monotonic() + self.cfg.route_timeout_s
        delay_s = 0.5
        while True:
            try:
                route = self.client.get_route(self.cfg.model, failed=failed,
                                              timeout_s=max(1.0, deadline - time.monotonic()),
                                              **route_options(self.cfg, self.banned))
                if route.fingerprint != self.route.fingerprint:
                    raise EdgetuneError("the cluster now serves different weights for "
                                        f"{self.cfg.model}; restart the run")
                check_bans(route, self.banned)
                self.route = route
                return route
            except EdgetuneError as e:
                if getattr(e, "code", "") not in RETRYABLE or time.monotonic() + delay_s > deadline:
                    raise
                log.warning("no new route yet (%s); retrying in %.1f s", e, delay_s)
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)


class RemoteEngine:
    """finetune's engine for a cluster: same interface as train.LocalEngine."""

    def __init__(self, trainer: RemoteTrainer, model, adapter) -> None:
        from edgetune.runtime.peft.adapter import methods_to_json

        self.trainer = trainer
        self.cfg = trainer.cfg
        self.model = model
        self.adapter = adapter
        self.methods_json = methods_to_json(adapter.methods)
        self.layers = range(model.config.num_layers)
        self.version = 0
        self.stream: RouteStream | None = None
        self._metrics: dict[str, Any] = {}
        self._mirror: dict[str, torch.Tensor] | None = None  # what the session's nodes hold (lossy adapter codecs)
        self._pushed: dict[str, torch.Tensor] | None = None  # the current version's views, already on the route
        self._later_pushes: list[wire.AdapterPush] = []  # the current version's pushes for stages 1.., not sent yet
        self._frozen = adapter.frozen_keys()  # sparse masks' indices: pushed once a session
        # of the constants as every node rebuilds them (fp32), whatever dtype the edge keeps its copy in
        self.constants_digest = constants_digest([m.constants(model.config) for m in adapter.methods])
        self._frozen_sent = False
        self._verifier = None  # --verify: verify.Verifier of the open route, made on its first verified step
        self._longest_s = 0.0  # the longest step or evaluation so far (s): what a reply may take
        self._closed_bytes = [0, 0]  # sent, received by the sessions closed so far
        self._marked_bytes = (0, 0)  # the totals when the last training step was accounted

    # -- the engine interface ---------------------------------------------------------
    def accumulate(self, micros: list[tuple[tuple, Any]], total_tokens: int) -> float:
        result = self._with_replays(lambda: self._train_step(micros, total_tokens))
        # a step's traffic on the edge's link: everything since the previous step's account, so the
        # push that left right after that step's optimizer update, replays and evaluations too
        sent, received = self._bytes()
        self._metrics["bytes_sent"] = sent - self._marked_bytes[0]
        self._metrics["bytes_received"] = received - self._marked_bytes[1]
        self._marked_bytes = (sent, received)
        return result

    def loss_sum(self, batch) -> float:
        return self._with_replays(lambda: self._eval_loss(batch))

    def step_metrics(self) -> dict[str, Any]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def prepare_next_step(self) -> None:
        """The optimizer just stepped: the new version leaves for the nodes now, crossing the route while
        the edge records the step and embeds the next batch; evaluations in between reuse it."""
        self._pushed = None
        if self.stream is not None:  # else the next step opens a session and pushes whole
            self._pushed = self._push_adapter()

    def close(self) -> None:
        self._close_stream()
        self.trainer.client.close()

    def _close_stream(self) -> None:
        if self._verifier is not None:
            sent, received = self._verifier.bytes()
            self._closed_bytes[0] += sent
            self._closed_bytes[1] += received
            self._verifier.close()
            self._verifier = None
        if self.stream is not None:
            self._closed_bytes[0] += self.stream.bytes_sent
            self._closed_bytes[1] += self.stream.bytes_received
            self.stream.close()
            self.stream = None

    def _bytes(self) -> tuple[int, int]:
        live = (self.stream.bytes_sent, self.stream.bytes_received) if self.stream is not None else (0, 0)
        checks = self._verifier.bytes() if self._verifier is not None else (0, 0)
        return self._closed_bytes[0] + live[0] + checks[0], self._closed_bytes[1] + live[1] + checks[1]

    # -- replay loop --------------------------------------------------------------------
    def _with_replays(self, attempt: Callable[[], Any]) -> Any:
        """A step or evaluation on the session's stream, replayed on a new route when a node fails."""
        def on_stream():
            if self.stream is None:
                self.stream = self._open()
            started = time.monotonic()
            result = attempt()
            self._longest_s = max(self._longest_s, time.monotonic() - started)
            self.stream.reply_timeout_s = self._silence_s()
            return result

        def drop_attempt():
            for p in self.adapter.parameters():  # drop this attempt's partial gradients
                p.grad = None
            self._close_stream()

        return self._replayed(on_stream, drop_attempt, "")

    def _replayed(self, attempt: Callable[[], Any], after_failure: Callable[[], None], what: str) -> Any:
        """attempt() until it succeeds: after each RouteFailure, after_failure() and a new route from the
        coordinator, at most max_step_retries times."""
        failures = 0
        while True:
            try:
                return attempt()
            except RouteFailure as e:
                failures += 1
                after_failure()
                if failures > self.cfg.max_step_retries:
                    raise EdgetuneError(f"{what}gave up after {failures} failed attempts: {e}") from None
                log.warning("%s; %sreplaying on a new route (attempt %d of %d)", e, what, failures + 1,
                            self.cfg.max_step_retries + 1)
                self.trainer.new_route(e.failed)

    def _silence_s(self) -> float:
        """How long the route may stay silent before the edge gives it up as hung: the configured
        limit until a step has been seen (the first one may compile or load), then HANG_FACTOR times
        the longest step so far, never under HANG_FLOOR_S -- a peer whose process hangs with its
        connection open is rerouted around in seconds, not at the session's deadline."""
        if self._longest_s <= 0:
            return self.cfg.reply_timeout_s
        return min(self.cfg.reply_timeout_s, max(HANG_FLOOR_S, HANG_FACTOR * self._longest_s))

    def _open(self) -> RouteStream:
        route = self.trainer.route
        hops = list(route.hops)
        cfg = self.trainer.cfg  # with the micro-batch count resolved
        micro = max(1, cfg.micro_batches)
        open_msg = wire.Open(session_id=uuid.uuid4().hex, model=cfg.model, fingerprint=route.fingerprint,
                             route=hops, codec=cfg.codec, methods_json=self.methods_json,
                             adapter_codec=cfg.adapter_codec, micro_batch_size=-(-cfg.batch_size // micro),
                             seq_len=cfg.max_seq_len, micro_batches=micro,
                             constants_digest=self.constants_digest)
        self._mirror = None  # a new session: its nodes hold no replica yet
        self._frozen_sent = False
        self._pushed = None
        self._later_pushes = []
        try:
            return RouteStream(route, self.trainer.trust, open_msg, self._silence_s())
        except RouteFailure:
            raise
        except grpc.RpcError as e:
            raise RouteFailure(f"cannot reach {hops[0].address}: {e}", [h.address for h in hops]) from None

    # -- calibration (sparse masks) -------------------------------------------------------
    def calibrate(self, probe, sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Sparse fine-tuning's mask, chosen where the weights are: a session of its own whose only
        method is `probe` (its dense zero deltas live on the nodes); each (input_ids, labels) sequence
        goes forward and backward on its own, every node squares and sums its weights' gradients, and
        EndStep brings back only the kept entries: '{k}.{layer}.{module}.sparse_indices' / '.sparse_scores'
        with k = 0. Replayed on a new route when a node fails, like a step."""
        return self._replayed(lambda: self._calibrate_on(self.trainer.route, probe, sequences), lambda: None,
                              "calibration ")

    def _calibrate_on(self, route: wire.Route, probe, sequences) -> dict[str, torch.Tensor]:
        from edgetune.runtime.peft.adapter import methods_to_json

        hops = list(route.hops)
        longest = max((int(ids.shape[-1]) for ids, _ in sequences), default=1)
        open_msg = wire.Open(session_id=uuid.uuid4().hex, model=self.cfg.model, fingerprint=route.fingerprint,
                             route=hops, codec="fp32", methods_json=methods_to_json([probe]), adapter_codec="raw",
                             micro_batch_size=1, seq_len=longest, micro_batches=1)
        try:
            stream = RouteStream(route, self.trainer.trust, open_msg, self.cfg.reply_timeout_s)
        except grpc.RpcError as e:
            raise RouteFailure(f"cannot reach {hops[0].address}: {e}", [h.address for h in hops]) from None
        try:
            for i in range(len(hops)):  # version 1 everywhere; the probe's tensors are the nodes' own
                stream.send(wire.AdapterPush(1, {}, hops_ahead=i))
            for micro, (ids, labels) in enumerate(sequences):
                with torch.no_grad():
                    h = self.model.embed(ids)  # (1, T, D)
                stream.send(wire.Forward(0, micro, 1, True, None, h, None))
                out = _expect(stream.recv(), wire.ForwardResult)
                h_out = out.hidden.to(self.model.device, self.model.dtype).requires_grad_(True)
                loss = head_loss_sum(self.model.final_norm(h_out), self.model.loss_head_weight, labels)
                loss.backward()  # the sequence's summed loss, as the local Fisher takes it
                stream.send(wire.Backward(0, micro, h_out.grad, False))
                _expect(stream.recv(), wire.BackwardResult)
            stream.send(wire.EndStep(0, 1))
            chosen: dict[str, torch.Tensor] = {}
            for _ in hops:
                chosen.update(_expect(stream.recv(), wire.Gradients).tensors)
            return chosen
        finally:
            stream.close()

    # -- one step -----------------------------------------------------------------------
    def _push_adapter(self) -> dict[str, torch.Tensor]:
        """Bring the nodes' replicas to this version: whole and exact on a new session (and always with
        --adapter-codec raw), else the deltas against the edge's mirror of the replicas, encoded with the
        adapter codec; the mirror takes what the nodes will decode, so what encoding lost this step is
        part of the next step's delta and the replicas never drift."""
        views = self.adapter.block_tensor_views(self.layers)  # what the blocks use (autograd-linked)
        self.version += 1
        current = {k: v.detach() for k, v in views.items() if k not in self._frozen}
        codec = self.cfg.adapter_codec
        if codec == "raw" or self._mirror is None:
            if not self._frozen_sent:  # the session's first push: the nodes keep them from now on
                current.update({k: views[k].detach() for k in self._frozen})
                self._frozen_sent = True
            self._send_by_stage(current, delta=False)
            self._mirror = None if codec == "raw" else {k: t.float().clone() for k, t in current.items()}
            return views
        deltas = {k: t.float() - self._mirror[k] for k, t in current.items()}
        self._send_by_stage(deltas, delta=True)
        for k, d in deltas.items():
            self._mirror[k] += serde.roundtrip(d, codec)
        return views

    def _send_by_stage(self, tensors: dict[str, torch.Tensor], delta: bool) -> None:
        """One AdapterPush per stage of the route: the first node's now, the others (nearest first) by
        `_send_later_pushes` once the first micro-batch is on its way, so the first node starts computing
        while they cross the later hops; earlier nodes relay them unopened as their frames arrive, and a
        node holds a forward that overtook its push until the push is there."""
        from edgetune.runtime.peft.adapter import split_block_key

        hops = self.stream.route.hops
        stages: list[dict[str, torch.Tensor]] = [{} for _ in hops]
        for key, t in tensors.items():
            layer = split_block_key(key)[1]
            stage = next((i for i, h in enumerate(hops) if h.start <= layer < h.end), None)
            if stage is None:
                raise EdgetuneError(f"adapter tensor {key!r} is for block {layer}, which no node of the route serves")
            stages[stage][key] = t
        self.stream.send(wire.AdapterPush(self.version, stages[0], delta))
        self._later_pushes = [wire.AdapterPush(self.version, stages[i], delta, hops_ahead=i) for i in range(1, len(hops))]

    def _send_later_pushes(self) -> None:
        pushes, self._later_pushes = self._later_pushes, []
        for push in pushes:
            self.stream.send(push)

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.model.embed(input_ids)  # (B, T, D), frozen
        return self.adapter.prepend_prompt(h, None, first=True)  # prompt tuning: (B, P + T, D)

    def _train_step(self, micros: list[tuple[tuple, Any]], total_tokens: int) -> float:
        step = micros[0][0][1]
        views = self._pushed if self._pushed is not None else self._push_adapter()
        self._pushed = None  # this step's backward consumes the views' graph
        checks = self._begin_checks(step, len(micros), views)  # --verify: micro-batches recomputed on replicas
        inputs, forwards = {}, {}
        for micro, (key, batch) in enumerate(micros):
            h, mask = self._embed(batch.input_ids)
            inputs[micro] = h
            forwards[micro] = wire.Forward(step, micro, self.version, True, key, h.detach(), mask, echo=micro in checks)
            self.stream.send(forwards[micro])  # all at once: the nodes pipeline them
            self._send_later_pushes()  # after the first
            if micro in checks:
                self._verifier.sent(forwards[micro])
        grads_out: dict[int, torch.Tensor] = {}  # micro -> dL/d(route output)
        in_flight = set(range(len(micros)))  # a forward or backward of these is on its way
        lost: list[int] = []  # a node lost their activations: replay forward + backward, one at a time
        resends = {m: 0 for m in range(len(micros))}
        gradients = _StageGradients(views, self.stream.route.hops, step, self.version)
        unended = False  # Backwards sent since the last EndStep
        loss_sum = 0.0
        while in_flight or lost or gradients.due:
            if lost and not in_flight:  # nothing else in flight: the replay cannot be evicted again
                m = lost.pop(0)
                self.stream.send(forwards[m])
                self.stream.send(wire.Backward(step, m, grads_out[m], inputs[m].requires_grad))
                in_flight.add(m)
                unended = True
            if unended and not lost and len(grads_out) == len(micros):
                # every Backward is on its way: each node sends its gradients once its last backward is
                # done, the last node's going up while earlier nodes still run theirs
                self._end_step(step)
                gradients.due += len(self.stream.route.hops)
                unended = False
            msg = self.stream.recv()
            if isinstance(msg, wire.ForwardResult):
                m = self._check_item(msg, step, len(micros))
                if m in grads_out:  # the output of a replayed forward: its backward is already queued
                    continue
                h_out = msg.hidden.to(self.model.device, self.model.dtype).requires_grad_(True)
                loss = head_loss_sum(self.model.final_norm(h_out), self.model.loss_head_weight, micros[m][1].labels)
                loss = loss / max(1, total_tokens)
                loss.backward()  # h_out.grad, and edge tensors (LN tuning's final norm)
                loss_sum += float(loss.detach())
                grads_out[m] = h_out.grad
                # dL/d(input) comes back only for prompt tuning's virtual tokens: otherwise a node
                # would send the edge a batch of hidden-state gradients for nothing
                self.stream.send(wire.Backward(step, m, grads_out[m], inputs[m].requires_grad))
                unended = True
            elif isinstance(msg, wire.BackwardResult):
                m = self._check_item(msg, step, len(micros))
                if m in in_flight:
                    in_flight.discard(m)
                    if inputs[m].requires_grad:  # prompt tuning: into the virtual tokens
                        if msg.grad is None:
                            raise RouteFailure(f"the route returned no input gradient for micro-batch {m}", [])
                        inputs[m].backward(msg.grad.to(inputs[m].device, inputs[m].dtype))
            elif isinstance(msg, wire.Gradients) and gradients.due:
                gradients.add(msg)
            elif isinstance(msg, wire.StageOutput) and checks:
                self._verifier.stage_output(msg)
            elif isinstance(msg, wire.ItemError):
                m = self._lost(msg, grads_out, resends)
                in_flight.discard(m)
                lost.append(m)
            else:
                raise RouteFailure(f"unexpected {type(msg).__name__} during step {step}", [])
        if checks:  # before anything of this step counts: a mismatch replays it
            self._metrics.update(self._verifier.finish(step))
        gradients.into_master()
        self._metrics["stages"] = gradients.timings()
        if gradients.recorded.sums:
            self._metrics["recorded"] = gradients.recorded.means()
        return loss_sum

    def _begin_checks(self, step: int, count: int, views: dict[str, torch.Tensor]) -> set[int]:
        """--verify: the step's micro-batches to recompute on the verifiers (none without --verify),
        whose replicas get this version of what the route's nodes hold."""
        if self.cfg.verify <= 0:
            return set()
        if self._verifier is None:
            from edgetune.runtime.train.verify import Verifier

            self._verifier = Verifier(self.stream.route, self.stream.opened, self.trainer.trust, self.stream.open_msg,
                                      self.stream.codec, self.cfg.verify, self.cfg.seed, self.stream.reply_timeout_s,
                                      self.trainer.banned)
        self._verifier.reply_timeout_s = self.stream.reply_timeout_s  # the route's silence limit, as it is now
        held = {k: v.detach() for k, v in views.items()}
        if self._mirror is not None:  # what the route's nodes decoded, and the frozen tensors they were sent
            held = {**self._mirror, **{k: held[k] for k in self._frozen}}
        return self._verifier.begin(step, count, self.version, held)

    def _end_step(self, step: int) -> None:
        """Ask every node for the adapter gradients its backwards have summed since the last EndStep
        (once a step; again after replaying micro-batches whose activations a node had lost)."""
        self.stream.send(wire.EndStep(step, self.version))

    def _eval_loss(self, batch) -> float:
        if self._pushed is None:
            self._pushed = self._push_adapter()
        with torch.no_grad():
            h, mask = self._embed(batch.input_ids)
            self.stream.send(wire.Forward(0, 0, self.version, False, None, h, mask))
            self._send_later_pushes()
            msg = self.stream.recv()
            if isinstance(msg, wire.ItemError):
                raise EdgetuneError(f"node {msg.node}: {msg.message}")
            if not isinstance(msg, wire.ForwardResult):
                raise RouteFailure(f"expected an evaluation result, got {type(msg).__name__}", [])
            hidden = self.model.final_norm(msg.hidden.to(self.model.device, self.model.dtype))
            return float(head_loss_sum(hidden, self.model.loss_head_weight, batch.labels))

    def _check_item(self, msg, step: int, count: int) -> int:
        if msg.step != step or not 0 <= msg.micro < count:
            raise RouteFailure(f"reply for step {msg.step} micro-batch {msg.micro} during step {step}", [])
        return msg.micro

    def _lost(self, err: wire.ItemError, grads_out: dict, resends: dict) -> int:
        """A node lost a micro-batch's activations (FAILED_PRECONDITION): it will be replayed."""
        m = err.micro
        if err.code != "FAILED_PRECONDITION" or m not in grads_out:
            raise EdgetuneError(f"node {err.node}: {err.code}: {err.message}")
        resends[m] += 1
        if resends[m] > MAX_RESENDS_PER_MICRO:
            raise EdgetuneError(f"node {err.node} lost the activations of micro-batch {m} {resends[m]} times; "
                                "is its activation cache smaller than one micro-batch?")
        log.info("node %s lost micro-batch %d's activations; re-sending it through the route", err.node, m)
        return m
