"""Ray-level placement: the one module that owns the shard actors' `ray.remote` options.

The shard actor's body (`edgetune.nodes.actor.ShardServer`) and the profiling
task (`edgetune.nodes.profile.profile_node`) run on the nodes. The coordinator
refers to them by import path only, resolved when they are placed: coordinator/
and nodes/ never import each other's modules (ARCHITECTURE.md), and Ray ships
the code to the node by that same path anyway.

Ray does the hard parts: node affinity pins an actor to its node, and
`max_restarts` restarts it there if its process dies (a restarted actor loads
its blocks again and listens on a new port; routes always ask for the current
address).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from edgetune.runtime.errors import ConfigError, EdgetuneError
from edgetune.runtime.wire import messages as wire

log = logging.getLogger("edgetune.coordinator")

NAMESPACE = "edgetune"
SHARD_SERVER = "edgetune.nodes.actor:ShardServer"
SHARD_SPEC = "edgetune.nodes.actor:ShardSpec"
HAS_MODEL = "edgetune.nodes.actor:has_model"
PROFILE_NODE = "edgetune.nodes.profile:profile_node"
ACTOR_RESTARTS = 3
PING_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 900.0
PROBE_BYTES = (256 * 2**10, 8 * 2**20)  # a small and a large probe: see nodes/profile.link_bandwidth


class PlacementError(EdgetuneError):
    """A shard actor could not be placed, started or reached."""


def resolve(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def _on(node_id: str) -> dict:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False), "num_cpus": 0}


def shard_spec(**fields) -> Any:
    return resolve(SHARD_SPEC)(**fields)


def profile(node_id: str, name: str, device: str, threads: int, memory_limit_bytes: int, config: dict,
            dtype: str = "auto", quantize: str = "none", kernels: str = "auto", timeout_s: float = 300.0) -> Any:
    """Run the profiler on `node_id`; returns its NodeProfile."""
    task = ray.remote(resolve(PROFILE_NODE)).options(**_on(node_id), max_retries=0)
    probes = [ray.put(b"\0" * n) for n in PROBE_BYTES]  # fetched by the node, timed there: the link estimate
    try:
        return ray.get(task.remote(name, device, threads, memory_limit_bytes, config, probes, dtype, quantize, kernels),
                       timeout=timeout_s)
    except Exception as e:  # RayTaskError, GetTimeoutError, node died
        _raise_config_error(e, name)
        raise PlacementError(f"profiling node {name} failed: {type(e).__name__}: {e}") from None


def has_model(node_id: str, model: str, timeout_s: float = 300.0) -> bool:
    task = ray.remote(resolve(HAS_MODEL)).options(**_on(node_id), max_retries=0)
    try:
        return bool(ray.get(task.remote(model), timeout=timeout_s))
    except Exception:
        return False


class ShardActor:
    """A handle to one node's shard actor; every call has a timeout and raises PlacementError."""

    def __init__(self, handle, node_id: str, spec) -> None:
        self.handle = handle
        self.node_id = node_id
        self.spec = spec

    @classmethod
    def place(cls, node_id: str, spec, trust, revoked: list[int], manifest: list[wire.ManifestEntry], config: dict,
              tensors_ref=None) -> ShardActor:
        """`trust`: the shard's certificate and key (or --insecure's token); `revoked`: serials it refuses."""
        body = ray.remote(resolve(SHARD_SERVER)).options(**_on(node_id), max_restarts=ACTOR_RESTARTS,
                                                         max_task_retries=0, namespace=NAMESPACE)
        return cls(body.remote(spec, trust, revoked, manifest, config, tensors_ref), node_id, spec)

    def revoke(self, serials: list[int], timeout_s: float = PING_TIMEOUT_S) -> None:
        """Hand the shard the cluster's revoked serials: it refuses them and cancels their streams."""
        try:
            self._get(self.handle.revoke.remote(serials), timeout_s, "revoke")
        except PlacementError as e:
            log.warning("%s", e)

    def address(self, timeout_s: float = LOAD_TIMEOUT_S) -> str:
        return self._get(self.handle.address.remote(), timeout_s, "start")

    def ping(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        try:
            return bool(self._get(self.handle.ping.remote(), timeout_s, "ping"))
        except PlacementError:
            return False

    def info(self, timeout_s: float = PING_TIMEOUT_S) -> wire.NodeInfo | None:
        try:
            return self._get(self.handle.info.remote(), timeout_s, "info")
        except PlacementError:
            return None

    def shutdown(self) -> None:
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception as e:  # already gone
            log.debug("shard actor of %s already gone: %s", self.spec.name, e)

    def _get(self, ref, timeout_s: float, what: str):
        try:
            return ray.get(ref, timeout=timeout_s)
        except Exception as e:
            _raise_config_error(e, self.spec.name)
            cause = getattr(e, "cause", None) or e
            raise PlacementError(f"shard actor on node {self.spec.name} ({what}): {type(cause).__name__}: {cause}") from None


def _raise_config_error(e: Exception, node: str) -> None:
    """A node that cannot run the model as it was started (e.g. --quantize nf4 on weights nf4 cannot
    split) raised a ConfigError: raise it as one, since retrying the placement cannot help."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, ConfigError):
        raise ConfigError(f"node {node}: {cause}") from None
