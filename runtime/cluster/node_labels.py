"""How an edgetune node describes itself to Ray, and how the coordinator reads it back.

`edgetune node` joins Ray with one custom resource that marks it as an edgetune
node and labels for its options; the coordinator finds edgetune nodes in
`ray.nodes()` by that resource. Written by nodes/, read by coordinator/, so it
lives here where both may import it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from edgetune.runtime.compute.kernels import KERNELS
from edgetune.runtime.compute.precision import DTYPES
from edgetune.runtime.compute.quantize import SCHEMES
from edgetune.runtime.errors import ConfigError

NODE_RESOURCE = "edgetune_node"
LABEL_NAME = "edgetune-name"
LABEL_DEVICE = "edgetune-device"
LABEL_THREADS = "edgetune-threads"
LABEL_MEMORY_LIMIT = "edgetune-memory-limit"  # bytes; "0" = no limit
LABEL_FETCH_WEIGHTS = "edgetune-fetch-weights"  # "1": the coordinator ships block tensors
LABEL_SHARD_PORT = "edgetune-shard-port"  # the shard's gRPC port; "0" = a free one
LABEL_DTYPE = "edgetune-dtype"  # auto, fp32, bf16, fp16: the precision of its blocks
LABEL_QUANTIZE = "edgetune-quantize"  # none, int8, nf4: how its blocks' linear weights are held
LABEL_KERNELS = "edgetune-kernels"  # auto, eager, compiled, fused: what its blocks run

# Ray label values: at most 63 characters, alphanumerics with - _ . inside.
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"node name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting and ending "
                          "with a letter or digit")
    return name


@dataclass(frozen=True)
class NodeOptions:
    """What `edgetune node` was started with."""

    name: str
    device: str = "cpu"
    threads: int = 0
    memory_limit_bytes: int = 0
    fetch_weights: bool = False
    shard_port: int = 0
    dtype: str = "auto"
    quantize: str = "none"
    kernels: str = "auto"

    def __post_init__(self) -> None:
        check_name(self.name)
        problems = []
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            problems.append(f"device {self.device!r} not in cpu, cuda, cuda:N")
        if self.threads < 0:
            problems.append(f"threads must be >= 0, got {self.threads}")
        if self.memory_limit_bytes < 0:
            problems.append(f"memory limit must be >= 0, got {self.memory_limit_bytes}")
        if not (self.shard_port == 0 or 1024 <= self.shard_port <= 65535):
            problems.append(f"shard port must be 0 (a free one) or 1024..65535, got {self.shard_port}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {', '.join(DTYPES)}")
        if self.quantize not in SCHEMES:
            problems.append(f"quantize {self.quantize!r} not in {', '.join(SCHEMES)}")
        if self.kernels not in KERNELS:
            problems.append(f"kernels {self.kernels!r} not in {', '.join(KERNELS)}")
        if problems:
            raise ConfigError("node options: " + "; ".join(problems))

    def labels(self) -> dict[str, str]:
        return {LABEL_NAME: self.name, LABEL_DEVICE: self.device.replace(":", "-"), LABEL_THREADS: str(self.threads),
                LABEL_MEMORY_LIMIT: str(self.memory_limit_bytes), LABEL_FETCH_WEIGHTS: "1" if self.fetch_weights else "0",
                LABEL_SHARD_PORT: str(self.shard_port), LABEL_DTYPE: self.dtype,
                LABEL_QUANTIZE: self.quantize, LABEL_KERNELS: self.kernels}

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> NodeOptions:
        """Options back from a Ray node's labels; ConfigError when they are not edgetune's."""
        try:
            return cls(name=labels[LABEL_NAME], device=labels.get(LABEL_DEVICE, "cpu").replace("-", ":"),
                       threads=int(labels.get(LABEL_THREADS, "0")),
                       memory_limit_bytes=int(labels.get(LABEL_MEMORY_LIMIT, "0")),
                       fetch_weights=labels.get(LABEL_FETCH_WEIGHTS, "0") == "1",
                       shard_port=int(labels.get(LABEL_SHARD_PORT, "0")), dtype=labels.get(LABEL_DTYPE, "auto"),
                       quantize=labels.get(LABEL_QUANTIZE, "none"), kernels=labels.get(LABEL_KERNELS, "auto"))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"Ray node labels are not an edgetune node's: {labels} ({e})") from None
