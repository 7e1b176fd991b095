"""What a node can do, measured on the node: memory, cores, GPU, block speed, link speed.

`profile_node` runs on the node itself (the coordinator launches it there as a
Ray task pinned to the node). The block timing builds one block of the target
model's shape with random weights and times forward + backward at a reference
micro-batch, with the node's own thread count and device, so a node started
with `--threads 1` or on a slower GPU measures slower, and the partitioner gives
it proportionately fewer blocks.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

from edgetune.runtime.plan.cost import REFERENCE_TOKENS  # the partitioner charges memory for the same micro-batch

REFERENCE_BATCH = 1
FIXED_BYTES = 256 * 2**20  # a node process's own footprint (torch, gRPC, Ray worker) beside its blocks


@dataclass(frozen=True)
class NodeProfile:
    name: str
    device: str
    cpus: int
    threads: int
    ram_bytes: int            # available now (psutil)
    gpu_name: str
    gpu_memory_bytes: int
    memory_bytes: int         # usable for blocks: min(--memory-limit, available RAM or GPU memory)
    fixed_bytes: int
    block_time_s: float       # forward + backward of one block at REFERENCE_BATCH x REFERENCE_TOKENS
    bandwidth_bytes_per_s: float
    dtype: str = "fp32"       # the precision its blocks are held and run in (--dtype, auto resolved here)
    quantize: str = "none"    # how its blocks' linear weights are held (--quantize)
    kernels: str = "eager"    # what its blocks run (--kernels, auto resolved here)

    def to_dict(self) -> dict:
        return asdict(self)


def hardware(device: str) -> dict:
    """RAM, cores and (with CUDA) the GPU's name and total memory."""
    import psutil
    import torch

    gpu_name, gpu_memory = "", 0
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu_name, gpu_memory = props.name, int(props.total_memory)
    return {"cpus": os.cpu_count() or 1, "ram_bytes": int(psutil.virtual_memory().available),
            "gpu_name": gpu_name, "gpu_memory_bytes": gpu_memory}


def time_block(config_dict: dict, device: str, repeats: int = 3, dtype: str = "fp32", quantize: str = "none",
               kernels: str = "eager") -> float:
    """Median seconds of forward + backward through one block of this shape (random weights, `dtype`, `quantize`,
    the ops of `kernels`; a compiled node is timed without compiling: a compile per profile would cost more
    than it tells)."""
    from dataclasses import replace

    import torch

    from edgetune.runtime.compute.kernels import block_ops
    from edgetune.runtime.compute.precision import torch_dtype
    from edgetune.runtime.compute.quantize import quantize_blocks
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.transformer import CausalLM

    config = ModelConfig.from_hf_dict(config_dict)
    dev = torch.device(device)
    with torch.device(dev):
        part = CausalLM(config, 0, 1, edge=False)  # one block, random weights
    part.to(torch_dtype(dtype))
    for p in part.parameters():
        p.requires_grad_(False)
    quantize_blocks(part, quantize)
    block = part.block(0)
    h = torch.randn(REFERENCE_BATCH, REFERENCE_TOKENS, config.hidden_size, device=dev, dtype=torch_dtype(dtype),
                    requires_grad=True)
    ctx = part.make_context(REFERENCE_BATCH, REFERENCE_TOKENS, dev)  # rotary tables in the part's dtype
    ctx = replace(ctx, ops=block_ops(kernels))
    times = []
    for _ in range(repeats + 1):  # the first run warms up kernels and allocators
        start = time.perf_counter()
        block(h, ctx, None, None).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def link_bandwidth(probe_refs: list) -> float:
    """Bytes/s of fetching the coordinator's probe objects to this node through Ray's object store.

    Two probes of different sizes: the difference of their fetch times cancels the
    fixed cost of a fetch (a round trip to the owner), leaving the per-byte cost.
    The refs arrive inside a list, so Ray has not fetched them before the task
    starts; on the coordinator's own host a fetch is a shared-memory map (fast).
    """
    if len(probe_refs) != 2:
        return float("inf")
    import ray

    times, sizes = [], []
    for ref in probe_refs:
        start = time.perf_counter()
        sizes.append(len(ray.get(ref)))
        times.append(time.perf_counter() - start)
    extra_s = times[1] - times[0]
    return (sizes[1] - sizes[0]) / extra_s if extra_s > 0 else float("inf")


def profile_node(name: str, device: str, threads: int, memory_limit_bytes: int, config_dict: dict,
                 probe_refs: list = (), dtype: str = "auto", quantize: str = "none", kernels: str = "auto") -> NodeProfile:
    """Everything the partitioner needs about this node (runs on the node); `dtype` as `--dtype`."""
    import torch

    from edgetune.runtime.compute.kernels import resolve_kernels
    from edgetune.runtime.compute.precision import resolve_dtype

    if threads > 0:
        torch.set_num_threads(threads)
    hw = hardware(device)
    usable = hw["gpu_memory_bytes"] if device.startswith("cuda") and hw["gpu_memory_bytes"] else hw["ram_bytes"]
    if memory_limit_bytes > 0:
        usable = min(usable, memory_limit_bytes)
    bandwidth = link_bandwidth(list(probe_refs))
    dtype = resolve_dtype(dtype, device)
    kernels = resolve_kernels(kernels, device)
    return NodeProfile(name=name, device=device, cpus=hw["cpus"], threads=threads or torch.get_num_threads(),
                       ram_bytes=hw["ram_bytes"], gpu_name=hw["gpu_name"], gpu_memory_bytes=hw["gpu_memory_bytes"],
                       memory_bytes=usable, fixed_bytes=FIXED_BYTES,
                       block_time_s=time_block(config_dict, device, dtype=dtype, quantize=quantize, kernels=kernels),
                       bandwidth_bytes_per_s=bandwidth, dtype=dtype, quantize=quantize, kernels=kernels)


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1000000' -> bytes; ValueError for anything else."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 512M or 2G") from None
    if not math.isfinite(value) or value * units[unit] < 1:
        raise ValueError(f"size {text!r} must be a finite size of at least one byte")
    return int(value * units[unit])
