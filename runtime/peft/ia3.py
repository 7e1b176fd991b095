"""(IA)^3 (Liu et al.): learned vectors that rescale activations.

For a targeted linear y = x W^T + b:
    attention-side module (k/v by default):  y * l,          l: (out, 1) as stored by HF PEFT
    feed-forward module (down_proj):         (x * l) W^T + b, l: (1, in)
Vectors start at 1 (the base model). Both forms merge exactly: scale W's rows
(and the bias) or W's columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.peft.base import Method, Tensors, matches_target


@dataclass(frozen=True)
class IA3Config(Method):
    target_modules: str | tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: str | tuple[str, ...] = ("down_proj",)
    layers_to_transform: tuple[int, ...] | None = None

    peft_type = "IA3"
    survey_branch = "additive"  # the survey files (IA)^3 under additive PEFT's "others": new scaling vectors
    mergeable = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff_not_target = [m for m in (self.feedforward_modules if not isinstance(self.feedforward_modules, str) else [])
                         if isinstance(self.target_modules, tuple) and m not in self.target_modules]
        if ff_not_target:
            raise ConfigError(f"IA3 config: feedforward_modules {ff_not_target} must also be in target_modules")

    def is_feedforward(self, layer: int, name: str) -> bool:
        return matches_target(self.feedforward_modules, layer, name)

    def init_block(self, config, block, generator) -> Tensors:
        if self.layers_to_transform is not None and block.layer_idx not in self.layers_to_transform:
            return {}
        out: Tensors = {}
        for name, linear in block.linears().items():
            if matches_target(self.target_modules, block.layer_idx, name):
                d_out, d_in = linear.weight.shape
                shape = (1, d_in) if self.is_feedforward(block.layer_idx, name) else (d_out, 1)
                out[f"{name}.ia3_l"] = torch.ones(shape)
        return out

    def pre_linear(self, t: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
        l = t.get(f"{name}.ia3_l")
        if l is None or l.shape[0] != 1:
            return x
        return x * l.flatten()  # feed-forward: scale the input features

    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        l = t.get(f"{name}.ia3_l")
        if l is None or l.shape[0] == 1:
            return y
        return y * l.flatten()  # attention-side: scale the outputs (bias included, as in PEFT)

    # Merging: the stored vector's shape tells which side it scales.
    def merge(self, t: Tensors, block) -> Tensors:
        for name, linear in block.linears().items():
            l = t.get(f"{name}.ia3_l")
            if l is None:
                continue
            linear.weight.mul_(l.to(linear.weight.dtype))  # (out, in) * (1, in) or (out, 1)
            if l.shape[0] != 1:
                if linear.bias is not None:
                    linear.bias.mul_(l.flatten().to(linear.bias.dtype))
        return {}

    def unmerge(self, t: Tensors, block, undo: Tensors) -> None:
        for name, linear in block.linears().items():
            l = t.get(f"{name}.ia3_l")
            if l is None:
                continue
            linear.weight.div_(l.to(linear.weight.dtype))
            if l.shape[0] != 1 and linear.bias is not None:
                linear.bias.div_(l.flatten().to(linear.bias.dtype))
