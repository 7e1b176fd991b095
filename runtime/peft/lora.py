"""LoRA (Hu et al.), rsLoRA (Kalajdzievski) and DoRA (Liu et al.) on a block's linear layers.

For a targeted linear y = x W^T + b (W: (out, in)):

    LoRA:  y + s * dropout(x) A^T B^T,         A: (r, in), B: (out, r), s = alpha / r
    rsLoRA: the same with s = alpha / sqrt(r)
    DoRA:  m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b,   m: (out,)

Initialisation matches HF PEFT: A ~ kaiming-uniform(a=sqrt(5)) i.e.
U(-1/sqrt(in), 1/sqrt(in)), B = 0 (so training starts at the base model), and
m = ||W||_row. As in PEFT, the DoRA norm is treated as a constant in backward.
All three merge exactly into W.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.peft.base import Method, Tensors, matches_target
from edgetune.runtime.peft.rng import keyed_dropout


@dataclass(frozen=True)
class LoraConfig(Method):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False

    peft_type = "LORA"
    survey_branch = "reparameterized"  # low-rank decomposition (LoRA, rsLoRA, DoRA)
    mergeable = True

    @property
    def init_reads_weights(self) -> bool:
        return self.use_dora  # DoRA's magnitude starts as the base weight's row norms

    @property
    def reads_base_weight(self) -> bool:
        return self.use_dora  # DoRA's norm of (W + BA) in every forward

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.r <= 0:
            problems.append(f"rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        if problems:
            raise ConfigError("LoRA config: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, layer: int, names: Sequence[str]) -> list[str]:
        if self.layers_to_transform is not None and layer not in self.layers_to_transform:
            return []
        return [n for n in names if matches_target(self.target_modules, layer, n)]

    # -- tensors ------------------------------------------------------------
    def init_block(self, config, block, generator: torch.Generator) -> Tensors:
        out: Tensors = {}
        for name, linear in block.linears().items():
            if name not in self.targets(block.layer_idx, [name]):
                continue
            d_out, d_in = linear.weight.shape
            bound = 1.0 / math.sqrt(d_in)
            out[f"{name}.lora_A"] = (torch.rand(self.r, d_in, generator=generator) * 2 - 1) * bound  # (r, in)
            out[f"{name}.lora_B"] = torch.zeros(d_out, self.r)  # (out, r)
            if self.use_dora:
                out[f"{name}.lora_magnitude_vector"] = linear.weight.detach().float().norm(dim=1).cpu()  # (out,)
        return out

    # -- rule -----------------------------------------------------------------
    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        A = t.get(f"{name}.lora_A")
        if A is None:
            return y
        B = t[f"{name}.lora_B"]
        s = self.scaling
        x_d = x if dropout_key is None else keyed_dropout(x, self.dropout, dropout_key)
        lora = (x_d @ A.T) @ B.T  # (..., out)
        if not self.use_dora:
            return y + s * lora
        m = t[f"{name}.lora_magnitude_vector"]
        norm = self._dora_norm(weight, A, B).detach()  # (out,)
        scale = m / norm  # (out,)
        if x_d is x:
            base = y if bias is None else y - bias  # x W^T without the bias
        else:  # dropout changes the input of the DoRA branch (as in PEFT)
            base = torch.nn.functional.linear(x_d, weight)
        return y + (scale - 1) * base + scale * s * lora

    def _dora_norm(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (weight + self.scaling * (B @ A)).norm(dim=1)  # (out,)

    # -- merging --------------------------------------------------------------
    def _targeted(self, t: Tensors, block):
        for name, linear in block.linears().items():
            if f"{name}.lora_A" in t:
                W = linear.weight
                delta = self.scaling * (t[f"{name}.lora_B"] @ t[f"{name}.lora_A"]).to(W.dtype)  # (out, in)
                yield name, W, delta

    def merge(self, t: Tensors, block) -> Tensors:
        undo: Tensors = {}
        for name, W, delta in self._targeted(t, block):
            if self.use_dora:
                norm = (W + delta).norm(dim=1)  # (out,)
                m = t[f"{name}.lora_magnitude_vector"].to(W.dtype)
                W.add_(delta).mul_((m / norm)[:, None])
                # W' = (m / n) (W + delta): n cannot be recovered from W' (its rows have norm m), keep it.
                undo[f"{name}.norm"] = norm
            else:
                W.add_(delta)
        return undo

    def unmerge(self, t: Tensors, block, undo: Tensors) -> None:
        for name, W, delta in self._targeted(t, block):
            if self.use_dora:
                m = t[f"{name}.lora_magnitude_vector"].to(W.dtype)
                W.mul_((undo[f"{name}.norm"] / m)[:, None])
            W.sub_(delta)
