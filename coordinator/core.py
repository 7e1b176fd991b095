"""The coordinator's logic, behind its gRPC service: nodes, profiles, partitions, routes.

Ray keeps the membership (which nodes are alive, their labels) and places and
restarts actors; this module decides *what* runs where. For a model it:

1. lists the live edgetune nodes (Ray nodes carrying the edgetune resource),
2. profiles each once (memory, cores, GPU, measured block time, link estimate),
3. partitions the blocks with edgetune.runtime.plan (cost model + partition),
4. places one shard actor per used node and waits until each serves its range,
5. answers GetRoute with the shard addresses in block order.

When a node of a placement dies (its actor stops answering), the next GetRoute
drops that node, partitions the blocks over the remaining ones and places new
shards; the edge replays its step on the new route.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import ray

from edgetune.coordinator import placement
from edgetune.runtime.cluster.node_labels import NODE_RESOURCE, NodeOptions
from edgetune.runtime.compute.precision import value_bytes
from edgetune.runtime.compute.quantize import bytes_per_value
from edgetune.runtime.errors import ConfigError, EdgetuneError, PartitionError, SessionError, TrustError
from edgetune.runtime.plan.cost import model_cost
from edgetune.runtime.plan.partition import Stage, StageNode, format_bytes, node_bytes_per_block, partition
from edgetune.runtime.security.access import Peer, Revocations, Trust
from edgetune.runtime.security.authority import ClusterAuthority
from edgetune.runtime.wire import messages as wire

log = logging.getLogger("edgetune.coordinator")

BAN_S = 60.0  # a node whose shard stopped answering (hung, cut off) gets no blocks for this long
EDGE_FILES_SKIP = (".safetensors", ".safetensors.index.json", ".lock", ".gguf")


@dataclass(frozen=True)
class RayNode:
    node_id: str
    host: str
    alive: bool
    options: NodeOptions


@dataclass
class ModelInfo:
    name: str
    folder: Path
    config: object  # ModelConfig
    config_dict: dict
    manifest: list[wire.ManifestEntry]
    fingerprint: str


@dataclass
class Placement:
    model: ModelInfo
    stages: list[tuple[RayNode, object, placement.ShardActor]]  # (node, partition.Stage, actor)
    summary: str = ""
    verifiers: list[tuple[RayNode, object, placement.ShardActor]] = field(default_factory=list)  # --verify: per stage


@dataclass
class CoordinatorState:
    profiles: dict[tuple[str, str], object] = field(default_factory=dict)  # (node_id, model) -> NodeProfile
    placements: dict[str, Placement] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    bans: dict[str, float] = field(default_factory=dict)  # node id -> until when (monotonic s): its shard stopped answering


class Coordinator:
    """Plain Python over Ray; coordinator/service.py maps gRPC calls onto these methods."""

    def __init__(self, trust: Trust, ray_address: str, ray_auth_token: str = "", ray_auth_mode: str = "",
                 authority: ClusterAuthority | None = None, ray_tls: bool = False, address: str = "",
                 ban_s: float = BAN_S) -> None:
        self.trust = trust  # the coordinator's own server identity (or --insecure's token)
        self.authority = authority  # None under --insecure
        self.ray_address = ray_address
        self.ray_auth_token = ray_auth_token
        self.ray_auth_mode = ray_auth_mode
        self.ray_tls = ray_tls  # Ray runs with TLS: joining nodes get a Ray-only certificate
        self.address = address  # HOST:PORT of the mutual-TLS port, as nodes and edges reach it
        self.ban_s = ban_s  # how long a node whose shard stopped answering gets no blocks
        self.revoked = Revocations(authority.revoked_serials() if authority else ())
        self.state = CoordinatorState()
        self._lock = threading.RLock()  # model infos
        self._plan_lock = threading.RLock()  # routes: one placement at a time (it may take minutes)

    # -- membership ---------------------------------------------------------------------
    def join(self, name: str, peer: Peer, peer_ip: str = "") -> wire.JoinReply:
        from edgetune.runtime.cluster.node_labels import check_name

        check_name(name)
        if self.trust.secure and name != peer.name:
            raise TrustError(f"node {peer.name!r} may join only under its own name, not {name!r}")
        taken = [n for n in self.nodes() if n.alive and n.options.name == name]
        if taken:
            raise ConfigError(f"a live node is already called {name!r} (on {taken[0].host}); pick another --name")
        reply = wire.JoinReply(self.ray_address, self.ray_auth_token, self.ray_auth_mode)
        if self.ray_tls and self.authority is not None:
            ips = sorted({*peer.ips, *([peer_ip] if peer_ip else [])})  # Ray dials a node by its routable IP
            cert, key = self.authority.ray_keypair(f"ray-{name}", ips)
            reply.ray_tls_cert, reply.ray_tls_key, reply.ray_tls_ca = cert, key, self.authority.ray_ca.cert_pem
        return reply

    # -- trust ------------------------------------------------------------------------------
    def enroll(self, token_id: str, secret: str, name: str, csr_pem: bytes, ips: list[str]) -> wire.Enrolled:
        issued = self._authority().enroll(token_id, secret, name, csr_pem, ips)
        return wire.Enrolled(issued.cert_pem, self.trust.ca_pem, self.address)

    def renew(self, peer: Peer, csr_pem: bytes, ips: list[str]) -> wire.Enrolled:
        from edgetune.runtime.security.ca import CertInfo

        holder = CertInfo(peer.name, peer.role, peer.serial, datetime.max)
        issued = self._authority().renew(holder, csr_pem, ips)
        return wire.Enrolled(issued.cert_pem, self.trust.ca_pem, self.address)

    def _authority(self) -> ClusterAuthority:
        if self.authority is None:
            raise TrustError("this coordinator runs with --insecure: there are no certificates to issue",
                             code="FAILED_PRECONDITION")
        return self.authority

    def check_revocations(self) -> bool:
        """Pick up `edgetune revoke`: refuse the serials from now on, hand the list to every shard
        (they cancel the revoked peers' open streams) and evict revoked nodes' shards. True when
        the list changed."""
        if self.authority is None:
            return False
        names, serials = self.authority.revocations()
        if serials == self.revoked.serials:
            return False
        self.revoked.update(serials)  # this coordinator's own calls: from now on
        log.warning("revoked identities now: %s", ", ".join(sorted(names)) or "none")
        for p in list(self.state.placements.values()):  # no lock: a placement may take minutes
            for _, _, actor in p.stages + p.verifiers:
                actor.revoke(sorted(serials))
        with self._plan_lock:
            for model, p in list(self.state.placements.items()):
                if any(node.options.name in names for node, _, _ in p.stages):
                    log.warning("evicting the placement of %s: it uses a revoked node", model)
                    self._drop(model)
        return True

    def nodes(self) -> list[RayNode]:
        """Edgetune nodes Ray knows, alive or not."""
        out = []
        for n in ray.nodes():
            if NODE_RESOURCE not in n.get("Resources", {}) and NODE_RESOURCE not in n.get("Labels", {}):
                continue
            try:
                options = NodeOptions.from_labels(n.get("Labels", {}))
            except ConfigError as e:
                log.warning("ignoring Ray node %s: %s", n.get("NodeID"), e)
                continue
            out.append(RayNode(n["NodeID"], n.get("NodeManagerAddress", ""), bool(n.get("Alive")), options))
        return out

    # -- models ---------------------------------------------------------------------------
    def model_info(self, model: str) -> ModelInfo:
        """The model's config and manifest, read here once (the coordinator needs the model)."""
        from edgetune.runtime.model.config import ModelConfig
        from edgetune.runtime.model.loader import resolve_model_folder
        from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint

        with self._lock:
            info = self.state.models.get(model)
            if info is None:
                folder = resolve_model_folder(model)
                config = ModelConfig.from_file(folder / "config.json")
                log.info("hashing %s for its fingerprint", folder)
                manifest = checkpoint_manifest(folder)
                info = ModelInfo(model, folder, config, config.to_hf_dict(), manifest, fingerprint(manifest))
                self.state.models[model] = info
            return info

    def edge_part(self, model: str) -> wire.EdgePart:
        """config.json, tokenizer files, and the edge's tensors as stored, for an edge without the model."""
        from edgetune.runtime.model.weights import SafetensorsCheckpoint

        info = self.model_info(model)
        files = {p.name: p.read_bytes() for p in sorted(info.folder.iterdir())
                 if p.is_file() and not p.name.endswith(EDGE_FILES_SKIP) and p.stat().st_size < 64 * 2**20}
        ckpt = SafetensorsCheckpoint(info.folder)
        names = [e.name for e in info.manifest if not e.name.startswith("model.layers.")]
        return wire.EdgePart(files, {n: ckpt.read_raw(n) for n in names})

    # -- routes ---------------------------------------------------------------------------
    def route(self, model: str, failed: list[str] | None = None) -> wire.Route:
        with self._plan_lock:
            current = self.state.placements.get(model)
            if current is not None and self._healthy(current, failed or []):
                return self._route_of(current)
            if current is not None:
                self._drop(model)
            try:
                placed = self._place(model)
            except (PartitionError, ConfigError) as e:  # the cluster cannot hold or run the model: not worth retrying
                raise SessionError(str(e), code="FAILED_PRECONDITION") from None
            except placement.PlacementError as e:
                raise PlacementUnavailable(str(e)) from None
            self.state.placements[model] = placed
            return self._route_of(placed)

    def _healthy(self, p: Placement, failed: list[str]) -> bool:
        alive = {n.node_id for n in self.nodes() if n.alive}
        ok = True
        for node, stage, actor in p.stages:
            if node.node_id not in alive or not actor.ping():
                log.warning("node %s (blocks [%d, %d)) does not answer; reassigning its blocks and banning it for "
                            "%.0f s", node.options.name, stage.start, stage.end, self.ban_s)
                self.state.bans[node.node_id] = time.monotonic() + self.ban_s
                ok = False
        return ok

    def _drop(self, model: str) -> None:
        p = self.state.placements.pop(model, None)
        if p is not None:
            for _, _, actor in p.stages + p.verifiers:
                actor.shutdown()

    def _route_of(self, p: Placement) -> wire.Route:
        hops = [wire.Hop(node.options.name, actor.address(), stage.start, stage.end) for node, stage, actor in p.stages]
        return wire.Route(p.model.name, p.model.fingerprint, hops, p.model.config.num_layers, p.model.manifest)

    def _candidates(self) -> list[RayNode]:
        nodes = self.nodes()
        alive_ids = {n.node_id for n in nodes if n.alive}
        now = time.monotonic()
        # a ban ends when it runs out (the node may have come back: a hung process resumed) or when
        # Ray declares the node dead (no longer our concern)
        self.state.bans = {nid: until for nid, until in self.state.bans.items() if nid in alive_ids and until > now}
        revoked = set(self.authority.revoked_names()) if self.authority else set()
        return [n for n in nodes if n.alive and n.node_id not in self.state.bans and n.options.name not in revoked]

    def banned_s(self, node_id: str) -> float:
        """Seconds left of `node_id`'s ban (0: not banned)."""
        return max(0.0, self.state.bans.get(node_id, 0.0) - time.monotonic())

    def _place(self, model: str) -> Placement:
        info = self.model_info(model)
        nodes = self._candidates()
        if not nodes:
            raise PlacementUnavailable("no edgetune node has joined the cluster yet; start one with "
                                       "`edgetune node --coordinator HOST:PORT`")
        profiles = {n.node_id: self._profile(n, info) for n in nodes}
        cost = model_cost(info.config)
        plan = partition([_stage_node(n.options.name, profiles[n.node_id]) for n in nodes], cost)
        log.info("partition of %s:\n%s", model, plan.describe())
        by_name = {n.options.name: n for n in nodes}
        nodes_in_order = [by_name[stage.name] for stage in plan.stages]
        # the first stage serves edges; each later one only the node before it
        previous = [""] + [n.options.name for n in nodes_in_order[:-1]]
        stages = self._start_shards(info, [(node, stage, prev, None) for node, stage, prev
                                           in zip(nodes_in_order, plan.stages, previous)])
        return Placement(info, stages, plan.describe())

    def _start_shards(self, info: ModelInfo, specs: list[tuple]) -> list[tuple]:
        """Start a shard per (node, stage, previous, port) and wait until each has loaded and listens;
        on any failure stop the ones started. Returns (node, stage, actor) per spec."""
        placed = []
        try:
            for node, stage, previous, port in specs:
                placed.append((node, stage, self._start_shard(node, stage, info, previous, port=port)))
            for _, _, actor in placed:
                actor.address()
        except EdgetuneError:
            for _, _, actor in placed:
                actor.shutdown()
            raise
        return placed

    def _profile(self, node: RayNode, info: ModelInfo):
        key = (node.node_id, info.name)
        if key not in self.state.profiles:
            o = node.options
            self.state.profiles[key] = placement.profile(node.node_id, o.name, o.device, o.threads,
                                                         o.memory_limit_bytes, info.config_dict, o.dtype, o.quantize,
                                                         o.kernels)
            p = self.state.profiles[key]
            log.info("profiled %s: %s %s (weights %s, kernels %s), %d threads, %.0f MiB usable, block %.1f ms, "
                     "link %.0f MB/s", o.name, p.device, p.dtype, p.quantize, p.kernels, p.threads, p.memory_bytes / 2**20, p.block_time_s * 1e3,
                     min(p.bandwidth_bytes_per_s, 1e12) / 1e6)
        return self.state.profiles[key]

    def _start_shard(self, node: RayNode, stage, info: ModelInfo, previous: str,
                     port: int | None = None) -> placement.ShardActor:
        o = node.options
        prof = self._profile(node, info)  # --dtype as the node resolved it for its device
        fetch = o.fetch_weights or not placement.has_model(node.node_id, info.name)
        tensors_ref = None
        if fetch:  # the node lacks the file: ship its blocks through Ray's object store
            from edgetune.runtime.model.weights import SafetensorsCheckpoint

            ckpt = SafetensorsCheckpoint(info.folder)
            names = [e.name for e in info.manifest if _block_of(e.name) is not None
                     and stage.start <= _block_of(e.name) < stage.end]
            tensors_ref = ray.put({n: ckpt.read_raw(n) for n in names})
            log.info("node %s reads no model file: sending its %d tensors through the object store", o.name, len(names))
        spec = placement.shard_spec(name=o.name, model=info.name, start=stage.start, end=stage.end, device=o.device,
                                    threads=o.threads, fetch_weights=fetch, port=o.shard_port if port is None else port,
                                    dtype=prof.dtype,
                                    quantize=prof.quantize, kernels=prof.kernels, previous=previous,
                                    memory_bytes=int(prof.memory_bytes))
        return placement.ShardActor.place(node.node_id, spec, self._shard_trust(node), sorted(self.revoked.serials),
                                          info.manifest, info.config_dict, tensors_ref)

    def _shard_trust(self, node: RayNode) -> Trust:
        """What a node's shard serves and relays with: a certificate naming the node (made here,
        shipped over Ray's own TLS), or --insecure's token."""
        if self.authority is None:
            return self.trust
        cert, key = self.authority.shard_keypair(node.options.name, [node.host] if node.host else [])
        return Trust.mutual(self.trust.ca_pem, cert, key)

    # -- verifier replicas (finetune --verify) ------------------------------------------------
    def serve_route(self, model: str, failed: list[str] | None = None, verify: bool = False,
                    exclude: tuple[str, ...] | list[str] = ()) -> wire.Route:
        """GetRoute: `route`, without the nodes the edge banned (`exclude`: its verifier caught them
        computing wrong hidden states), and with a verifier replica of every stage when `verify`.

        Placements are shared by every edge training the model, so an exclusion bans the node for
        everyone, like a node that stopped answering (`ban_s`; the edge asks again while it holds
        its ban), and a placement using it is dropped: other edges replay a step once."""
        with self._plan_lock:
            if exclude:
                self._exclude(model, set(exclude))
            route = self.route(model, failed)
            if verify:
                route.verifiers = self._verifier_hops(model, failed or [])
            return route

    def _exclude(self, model: str, names: set[str]) -> None:
        until = time.monotonic() + self.ban_s
        for node in self.nodes():
            if node.options.name in names:
                if not self.banned_s(node.node_id):
                    log.warning("an edge's verifier caught node %s computing wrong hidden states: banned for %.0f s",
                                node.options.name, self.ban_s)
                self.state.bans[node.node_id] = max(self.state.bans.get(node.node_id, 0.0), until)
        p = self.state.placements.get(model)
        if p is not None and names & {node.options.name for node, _, _ in p.stages}:
            self._drop(model)  # the next route re-partitions without it
        elif p is not None and names & {node.options.name for node, _, _ in p.verifiers}:
            self._drop_verifiers(p)

    def _verifier_hops(self, model: str, failed: list[str]) -> list[wire.Hop]:
        """A replica of each stage of `model`'s placement, on another node than the stage's, placed
        once and kept with the placement (re-placed when a verifier's node is gone or banned)."""
        p = self.state.placements[model]
        usable = {n.node_id for n in self._candidates()}
        if any(node.node_id not in usable or (actor.address() in failed and not actor.ping())
               for node, _, actor in p.verifiers):
            self._drop_verifiers(p)
        if not p.verifiers:
            try:
                p.verifiers = self._place_verifiers(p)
            except ConfigError as e:
                raise SessionError(str(e), code="FAILED_PRECONDITION") from None
            except placement.PlacementError as e:
                raise PlacementUnavailable(str(e)) from None
        return [wire.Hop(node.options.name, actor.address(), stage.start, stage.end) for node, stage, actor in p.verifiers]

    def _drop_verifiers(self, p: Placement) -> None:
        for _, _, actor in p.verifiers:
            actor.shutdown()
        p.verifiers = []

    def _place_verifiers(self, p: Placement) -> list[tuple[RayNode, Stage, placement.ShardActor]]:
        """Per stage, the node other than the stage's with room for a replica of its blocks (with one
        micro-batch in flight, as partitions count), preferring one that holds and runs blocks as the
        stage's node does (then their tolerance is tightest), then the most free memory. Replicas
        serve edges directly (previous ""), on a free port (the node's shard port is its stage's)."""
        info = p.model
        cost = model_cost(info.config)
        nodes = self._candidates()
        profiles = {n.node_id: self._profile(n, info) for n in nodes}
        shapes = {n.node_id: _stage_node(n.options.name, profiles[n.node_id]) for n in nodes}
        free = {}
        for n in nodes:
            held = sum((st.end - st.start) * node_bytes_per_block(shapes[n.node_id], cost, 1)
                       for node, st, _ in p.stages if node.node_id == n.node_id)
            free[n.node_id] = shapes[n.node_id].memory_bytes - shapes[n.node_id].fixed_bytes - held
        picks = []
        for node, stage, _ in p.stages:
            mine = self._profile(node, info)
            need = {n.node_id: (stage.end - stage.start) * node_bytes_per_block(shapes[n.node_id], cost, 1) for n in nodes}
            others = [n for n in nodes if n.node_id != node.node_id]
            fits = [n for n in others if free[n.node_id] >= need[n.node_id]]
            if not fits:
                raise ConfigError(_no_verifier(node, stage, others, free, need))
            best = min(fits, key=lambda n: ((profiles[n.node_id].dtype, profiles[n.node_id].quantize)
                                            != (mine.dtype, mine.quantize), -free[n.node_id], n.options.name))
            free[best.node_id] -= need[best.node_id]
            picks.append((best, Stage(best.options.name, stage.start, stage.end, stage.time_s, need[best.node_id])))
        placed = self._start_shards(info, [(node, stage, "", 0) for node, stage in picks])
        log.info("verifier replicas of %s: %s", info.name,
                 ", ".join(f"[{st.start}, {st.end}) on {n.options.name}" for n, st, _ in placed))
        return placed

    # -- status ---------------------------------------------------------------------------
    def status(self) -> wire.ClusterStatus:
        placements = list(self.state.placements.values())  # no lock: answers while a placement runs
        profiles = dict(self.state.profiles)
        stages: dict[str, list] = {}
        for p in placements:
            for node, stage, actor in p.stages:
                stages.setdefault(node.node_id, []).append((p.model.name, stage, actor))
        out = []
        for node in self.nodes():
            prof = next((v for (nid, _), v in profiles.items() if nid == node.node_id), None)
            mine = stages.get(node.node_id, [])
            info = mine[0][2].info() if mine and node.alive else None
            out.append(wire.NodeStatus(
                name=node.options.name, ray_node_id=node.node_id, host=node.host, alive=node.alive,
                device=node.options.device, gpu_name=getattr(prof, "gpu_name", ""),
                memory_bytes=getattr(prof, "memory_bytes", 0), cpus=getattr(prof, "cpus", 0),
                threads=getattr(prof, "threads", node.options.threads), block_time_s=getattr(prof, "block_time_s", 0.0),
                bandwidth_bytes_per_s=min(getattr(prof, "bandwidth_bytes_per_s", 0.0), 1e15),
                dtype=getattr(prof, "dtype", ""), quantize=getattr(prof, "quantize", ""),
                kernels=getattr(prof, "kernels", ""), banned_s=self.banned_s(node.node_id),
                stages=[wire.Hop(model, "", s.start, s.end) for model, s, _ in mine], info=info))
        return wire.ClusterStatus(self.ray_address, out, sorted(p.model.name for p in placements))

    def shutdown(self) -> None:
        with self._plan_lock:
            for model in list(self.state.placements):
                self._drop(model)


class PlacementUnavailable(SessionError):
    """No route can be built right now (no nodes yet, a shard failed to start); the caller may retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="UNAVAILABLE")


def _stage_node(name: str, profile) -> StageNode:
    """The partitioner's view of a profiled node: its blocks cost their bytes in the node's dtype,
    and their weights those of its quantization."""
    fp32 = value_bytes("fp32")  # ModelCost is in fp32 bytes
    return StageNode(name, profile.memory_bytes, profile.block_time_s, profile.bandwidth_bytes_per_s,
                     profile.fixed_bytes, weight_scale=bytes_per_value(profile.quantize, profile.dtype) / fp32,
                     activation_scale=value_bytes(profile.dtype) / fp32)


def _no_verifier(node: RayNode, stage, others: list[RayNode], free: dict[str, int], need: dict[str, int]) -> str:
    """Why no node can hold a verifier replica of `stage` (run by `node`), with the numbers."""
    blocks = f"blocks [{stage.start}, {stage.end})"
    if not others:
        return (f"--verify needs a replica of every stage's blocks on another node than the stage's, and the cluster "
                f"has only node {node.options.name} (serving {blocks}); add a node, or train without --verify")
    room = "; ".join(f"{n.options.name} has {format_bytes(max(0, free[n.node_id]))} free, needs "
                     f"{format_bytes(need[n.node_id])}" for n in others)
    return (f"--verify: no node other than {node.options.name} has room for a replica of its {blocks} ({room}, "
            "beside its own blocks and other replicas); add a node or raise a node's --memory-limit, or train "
            "without --verify")


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None
