"""Bottleneck adapters: small down/up projections inside each block.

Serial (Houlsby et al.): after the attention output and after the MLP output,

    out + up(act(down(out)))             down: (r, D), up: (D, r)

Parallel (He et al., "scaled parallel adapter"): beside the MLP, fed by the MLP's input,

    mlp(x) + s * up(act(down(x)))

`up` starts at zero, so training starts at the base model. The nonlinearity
makes both impossible to merge into the base weights. HF PEFT has no such
method: adapters are saved with edgetune's own peft_type (see hf_format.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.peft.base import Method, Tensors

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _bottleneck_init(prefix: str, d: int, r: int, gen: torch.Generator) -> Tensors:
    bound = 1.0 / math.sqrt(d)
    return {
        f"{prefix}.down.weight": (torch.rand(r, d, generator=gen) * 2 - 1) * bound,  # (r, D)
        f"{prefix}.down.bias": torch.zeros(r),
        f"{prefix}.up.weight": torch.zeros(d, r),  # (D, r): zero => identity at start
        f"{prefix}.up.bias": torch.zeros(d),
    }


def _bottleneck(t: Tensors, prefix: str, x: torch.Tensor, act) -> torch.Tensor:
    z = act(F.linear(x, t[f"{prefix}.down.weight"], t[f"{prefix}.down.bias"]))  # (B, T, r)
    return F.linear(z, t[f"{prefix}.up.weight"], t[f"{prefix}.up.bias"])  # (B, T, D)


@dataclass(frozen=True)
class _BottleneckBase(Method):
    bottleneck_size: int = 64
    activation: str = "relu"
    layers_to_transform: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.bottleneck_size <= 0:
            problems.append(f"bottleneck_size must be positive, got {self.bottleneck_size}")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation {self.activation!r} not in {sorted(_ACTIVATIONS)}")
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))

    def _applies(self, layer: int) -> bool:
        return self.layers_to_transform is None or layer in self.layers_to_transform

    @property
    def act(self):
        return _ACTIVATIONS[self.activation]


@dataclass(frozen=True)
class SerialAdapterConfig(_BottleneckBase):
    peft_type = "EDGETUNE_SERIAL_ADAPTER"
    survey_branch = "additive"  # adapters

    def init_block(self, config, block, generator) -> Tensors:
        if not self._applies(block.layer_idx):
            return {}
        d = config.hidden_size
        return {**_bottleneck_init("attn_adapter", d, self.bottleneck_size, generator),
                **_bottleneck_init("mlp_adapter", d, self.bottleneck_size, generator)}

    def after_attention(self, t: Tensors, out: torch.Tensor) -> torch.Tensor:
        return out + _bottleneck(t, "attn_adapter", out, self.act)

    def after_mlp(self, t: Tensors, out: torch.Tensor, mlp_in: torch.Tensor, dropout_key) -> torch.Tensor:
        return out + _bottleneck(t, "mlp_adapter", out, self.act)


@dataclass(frozen=True)
class ParallelAdapterConfig(_BottleneckBase):
    scaling: float = 4.0

    peft_type = "EDGETUNE_PARALLEL_ADAPTER"
    survey_branch = "additive"  # adapters

    def init_block(self, config, block, generator) -> Tensors:
        if not self._applies(block.layer_idx):
            return {}
        return _bottleneck_init("parallel_adapter", config.hidden_size, self.bottleneck_size, generator)

    def after_mlp(self, t: Tensors, out: torch.Tensor, mlp_in: torch.Tensor, dropout_key) -> torch.Tensor:
        return out + self.scaling * _bottleneck(t, "parallel_adapter", mlp_in, self.act)
