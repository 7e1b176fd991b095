"""The shard actor's body: the plain class a Ray actor runs on one node.

The coordinator places one per node (coordinator/placement.py owns the Ray
options: node affinity, restarts) and names its range. On construction it
loads only blocks [start, end) -- from the model path on this machine, or from
tensors the coordinator shipped through Ray's object store when this node lacks
the file -- checks them against the model's manifest, and serves them over gRPC
on a free port until the actor ends.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from edgetune.runtime.wire import messages as wire

log = logging.getLogger("edgetune.node")


@dataclass(frozen=True)
class ShardSpec:
    """What the coordinator asks a node to serve."""

    name: str
    model: str
    start: int
    end: int
    device: str = "cpu"
    threads: int = 0
    max_cached: int = 64        # micro-batches whose activations stay for backward
    fetch_weights: bool = False  # read no local file: the coordinator ships the tensors
    port: int = 0  # the gRPC port; 0 = a free one
    dtype: str = "fp32"  # fp32, bf16 or fp16: the precision the blocks are held and run in
    quantize: str = "none"  # none, int8 or nf4: how the blocks' linear weights are held
    kernels: str = "eager"  # eager, compiled or fused: what the blocks run (compute.kernels)
    previous: str = ""  # the node before this one on the route ("": the first, which edges call)
    memory_bytes: int = 0  # usable memory of the node (its profile): admission of sessions; 0: no limit


class ShardServer:
    """Loads the blocks of `spec`, verifies them, and serves them until stop()."""

    def __init__(self, spec: ShardSpec, trust, revoked: list[int], manifest: list[wire.ManifestEntry], config: dict,
                 tensors: dict | None = None) -> None:
        import torch

        from edgetune.nodes.service import serve
        from edgetune.nodes.shard import Shard
        from edgetune.runtime.model.manifest import fingerprint
        from edgetune.runtime.security.access import Revocations

        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        part = self._load(spec, manifest, config, tensors)
        self.spec = spec
        self.shard = Shard(spec.name, spec.model, part, fingerprint(manifest), max_cached=spec.max_cached,
                           quantize=spec.quantize, kernels=spec.kernels, memory_bytes=spec.memory_bytes)
        self.revoked = Revocations(revoked)
        self.server, port = serve(self.shard, trust, port=spec.port, previous=spec.previous, revoked=self.revoked)
        self._address = f"{_node_ip()}:{port}"
        log.info("node %s serves blocks [%d, %d) of %s in %s (weights %s, kernels %s) at %s", spec.name, spec.start,
                 spec.end, spec.model, spec.dtype, spec.quantize, spec.kernels, self._address)

    @staticmethod
    def _load(spec: ShardSpec, manifest, config: dict, tensors: dict | None):
        import torch

        from edgetune.runtime.compute.precision import torch_dtype
        from edgetune.runtime.compute.quantize import check_scheme, quantize_block
        from edgetune.runtime.model.config import ModelConfig
        from edgetune.runtime.model.loader import build_part, part_shapes, resolve_model_folder
        from edgetune.runtime.model.manifest import entry, verify
        from edgetune.runtime.model.weights import SafetensorsCheckpoint

        cfg = ModelConfig.from_hf_dict(config)
        if tensors is None:  # read this part's tensors once, as stored: hashed, then built from
            ckpt = SafetensorsCheckpoint(resolve_model_folder(spec.model))
            tensors = {n: ckpt.read_raw(n) for n in part_shapes(cfg, spec.start, spec.end, edge=False)}
        verify([entry(n, t) for n, t in tensors.items()], manifest, who=f"node {spec.name}")
        check_scheme(spec.quantize)
        # quantized block by block as they are built (after the manifest check: the stored weights
        # are what was verified), so the node never holds its whole part unquantized
        part = build_part(cfg, spec.start, spec.end, False, lambda shapes: tensors, torch.device(spec.device),
                          torch_dtype(spec.dtype), each_block=lambda block: quantize_block(block, spec.quantize))
        return part

    def address(self) -> str:
        return self._address

    def info(self) -> wire.NodeInfo:
        return self.shard.info(device=self.spec.device)

    def ping(self) -> bool:
        return True

    def revoke(self, serials: list[int]) -> None:
        self.revoked.update(serials)

    def stop(self) -> None:
        self.server.stop(grace=1.0)


def has_model(model: str) -> bool:
    """Whether this machine can read `model` itself (runs on the node, as a Ray task)."""
    from edgetune.runtime.model.loader import resolve_model_folder

    try:
        return (resolve_model_folder(model) / "config.json").exists()
    except Exception:  # not there, not convertible: the coordinator ships the tensors instead
        return False


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
