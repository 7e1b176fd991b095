"""BitFit (Ben Zaken et al.): train only biases.

Every targeted linear gets a trainable bias delta (out,), starting at zero:
added to the base bias where there is one, standing in for it where the base
has none (Llama's projections). Merges exactly: the delta is added to (or
becomes) the base bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgetune.runtime.peft.base import Method, Tensors, matches_target


@dataclass(frozen=True)
class BitFitConfig(Method):
    target_modules: str | tuple[str, ...] = "all-linear"
    layers_to_transform: tuple[int, ...] | None = None

    peft_type = "EDGETUNE_BITFIT"
    survey_branch = "selective"  # structural masking: only the biases train
    mergeable = True

    def init_block(self, config, block, generator) -> Tensors:
        if self.layers_to_transform is not None and block.layer_idx not in self.layers_to_transform:
            return {}
        return {f"{name}.bias": torch.zeros(linear.weight.shape[0])
                for name, linear in block.linears().items() if matches_target(self.target_modules, block.layer_idx, name)}

    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        delta = t.get(f"{name}.bias")
        return y if delta is None else y + delta

    def merge(self, t: Tensors, block) -> Tensors:
        created = {}
        for name, linear in block.linears().items():
            delta = t.get(f"{name}.bias")
            if delta is None:
                continue
            if linear.bias is None:
                linear.bias = nn.Parameter(delta.detach().clone().to(linear.weight.dtype), requires_grad=False)
                created[name] = torch.ones(())  # marker: the bias did not exist before
            else:
                linear.bias.add_(delta.to(linear.bias.dtype))
        return created

    def unmerge(self, t: Tensors, block, undo: Tensors) -> None:
        for name, linear in block.linears().items():
            delta = t.get(f"{name}.bias")
            if delta is None:
                continue
            if name in undo:
                linear.bias = None
            else:
                linear.bias.sub_(delta.to(linear.bias.dtype))
