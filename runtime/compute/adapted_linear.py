"""The adapted linear layer as one autograd function: the op a fused or compiled block runs.

A block's linear with LoRA/rsLoRA or (IA)^3 computes y = x W'^T + b' where W' folds the
method into the frozen weight:

    LoRA / rsLoRA:        W' = W + s B A                     (A: (r, in), B: (out, r))
    (IA)^3, output side:  W' = diag(l) W,  b' = l * b        (k/v projections)
    (IA)^3, input side:   W' = W diag(l)                     (feed-forward down_proj)

Forward runs one GEMM instead of three (LoRA's x A^T and (x A^T) B^T are skinny and slow on
CPUs); W' is formed again in backward (a rank-r update) rather than kept, so nothing of the
size of W is saved per micro-batch. Backward computes exactly the gradients autograd would:

    LoRA:   dx = g W',   dA = s (g B)^T x,   dB = s g^T (x A^T)
    (IA)^3 output side: dx = g W', dl = sum over tokens of g * (x W^T + b)  (saves x W^T + b)
    (IA)^3 input side:  dx = (g W) * l,  dl = sum over tokens of (g W) * x

Anything else -- DoRA, active dropout, several methods on one linear, methods this module
does not know, quantized weights -- runs the reference (`BlockAdapter.linear`) for that
module: slower, never different.

`backend="triton"` runs LoRA's forward and its backward to the inputs through the GEMM with a
fused low-rank epilogue in `triton_lora.py` (CUDA, or Triton's interpreter in tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.runtime.peft.ia3 import IA3Config
from edgetune.runtime.peft.lora import LoraConfig

FUSED_METHODS = ("LoRA", "rsLoRA", "(IA)^3")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _token_sum(t: torch.Tensor) -> torch.Tensor:
    return _rows(t).sum(0)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float):
        ctx.save_for_backward(x, weight, A, B)
        ctx.scale = scale
        return F.linear(x, torch.addmm(weight, B * scale, A), bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B = ctx.saved_tensors
        scale = ctx.scale
        g2, x2 = _rows(g), _rows(x)
        dx = (g @ torch.addmm(weight, B * scale, A)) if ctx.needs_input_grad[0] else None
        dA = (g2 @ B).T @ x2 * scale if ctx.needs_input_grad[3] else None
        dB = g2.T @ (x2 @ A.T) * scale if ctx.needs_input_grad[4] else None
        return dx, None, None, dA, dB, None


class _IA3OutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, l):
        z = F.linear(x, weight, bias)  # what dl needs; x itself is not kept
        ctx.save_for_backward(z, weight, l)
        return z * l

    @staticmethod
    def backward(ctx, g):
        z, weight, l = ctx.saved_tensors
        dx = (g * l) @ weight if ctx.needs_input_grad[0] else None
        dl = _token_sum(g * z) if ctx.needs_input_grad[3] else None
        return dx, None, None, dl


class _IA3InLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, l):
        ctx.save_for_backward(x, weight, l)
        return F.linear(x, weight * l, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, l = ctx.saved_tensors
        gw = g @ weight  # (..., in)
        dx = gw * l if ctx.needs_input_grad[0] else None
        dl = _token_sum(gw * x) if ctx.needs_input_grad[3] else None
        return dx, None, None, dl


def _plain(weight: torch.Tensor) -> bool:
    return type(weight) in (torch.Tensor, nn.Parameter)  # not a quantized tensor subclass


def fusable(adapter, name: str, weight: torch.Tensor) -> tuple[str, object, dict] | None:
    """('lora' | 'ia3', method, tensors) when this linear can run as one of the functions above."""
    entries = adapter.linear_entries
    if not _plain(weight) or not all(type(m) in (LoraConfig, IA3Config) for m, _ in entries):
        return None
    mine = [(m, t) for m, t in entries if f"{name}.lora_A" in t or f"{name}.ia3_l" in t]
    if len(mine) != 1:
        return None
    m, t = mine[0]
    if isinstance(m, IA3Config):
        return "ia3", m, t
    if m.use_dora or (m.dropout > 0 and adapter.draws):
        return None
    return "lora", m, t


def make_adapted_linear(backend: str = "torch"):
    """The `BlockOps.linear` of a fused or compiled block: backend 'torch' (any device) or
    'triton' (LoRA through the fused Triton GEMM)."""
    from edgetune.runtime.model.transformer import adapted_linear as reference

    def adapted_linear(adapter, name: str, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        plan = None if adapter is None else fusable(adapter, name, layer.weight)
        if plan is None:
            return reference(adapter, name, layer, x)
        kind, method, t = plan
        weight, bias = layer.weight, layer.bias
        if kind == "lora":
            A, B = t[f"{name}.lora_A"], t[f"{name}.lora_B"]
            if backend == "triton":
                from edgetune.runtime.compute.triton_lora import lora_linear

                return lora_linear(x, weight, bias, A, B, method.scaling)
            return _LoraLinear.apply(x, weight, bias, A, B, method.scaling)
        l = t[f"{name}.ia3_l"]
        if l.shape[0] == 1:
            return _IA3InLinear.apply(x, weight, bias, l.reshape(-1))
        return _IA3OutLinear.apply(x, weight, bias, l.reshape(-1))

    adapted_linear.backend = backend
    return adapted_linear
