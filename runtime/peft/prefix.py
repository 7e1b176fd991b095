"""Prefix tuning (Li & Liang): trained key/value vectors prepended in every layer's attention.

Per block: prefix keys and values (P, kv_heads, head_dim) that every query
attends to. With `prefix_projection`, the prefixes are computed on the edge by
a two-layer MLP from a small embedding (P, kv_dim) -- the reparameterisation
of the paper -- and shipped to the blocks as derived tensors.

As in HF PEFT, the prefix counts as P past tokens: the real tokens' positions
start at P. Prefix tuning cannot be merged into the weights.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgetune.runtime.peft.base import Tensors, VirtualTokenMethod


def _linear_init(out_dim: int, in_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    bound = 1.0 / math.sqrt(in_dim)
    w = (torch.rand(out_dim, in_dim, generator=gen) * 2 - 1) * bound
    b = (torch.rand(out_dim, generator=gen) * 2 - 1) * bound
    return w, b


@dataclass(frozen=True)
class PrefixTuningConfig(VirtualTokenMethod):
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # default: kv_dim, as in HF PEFT

    peft_type = "PREFIX_TUNING"
    survey_branch = "additive"  # soft prompts

    def init_block(self, config, block, generator) -> Tensors:
        if self.prefix_projection:
            return {}
        shape = (self.num_virtual_tokens, config.num_kv_heads, config.head_dim)
        return {"prefix_key": torch.randn(shape, generator=generator),
                "prefix_value": torch.randn(shape, generator=generator)}

    def init_edge(self, config, model, generator) -> Tensors:
        if not self.prefix_projection:
            return {}
        kv_dim = config.kv_dim
        hidden = self.encoder_hidden_size or kv_dim
        w1, b1 = _linear_init(hidden, kv_dim, generator)
        w2, b2 = _linear_init(config.num_layers * 2 * kv_dim, hidden, generator)
        emb = torch.randn(self.num_virtual_tokens, config.num_kv_heads, config.head_dim, generator=generator)
        return {"embedding": emb,
                "transform.0.weight": w1, "transform.0.bias": b1,
                "transform.2.weight": w2, "transform.2.bias": b2}

    def project(self, edge: Tensors) -> torch.Tensor:
        """All layers' prefixes from the projection MLP: (P, 2L, kv_heads, head_dim)."""
        emb = edge["embedding"]  # (P, kv_heads, hd)
        P, kv_heads, hd = emb.shape
        h = torch.tanh(emb.reshape(P, -1) @ edge["transform.0.weight"].T + edge["transform.0.bias"])  # (P, hidden)
        out = h @ edge["transform.2.weight"].T + edge["transform.2.bias"]  # (P, L*2*kv_dim)
        return out.view(P, -1, kv_heads, hd)

    def derive_blocks(self, edge: Tensors, layers: Sequence[int]) -> dict[int, Tensors] | None:
        if not self.prefix_projection or not edge:
            return None
        prefixes = self.project(edge)  # (P, 2L, KVH, hd): layer l's key at 2l, value at 2l + 1
        return {l: {"prefix_key": prefixes[:, 2 * l], "prefix_value": prefixes[:, 2 * l + 1]} for l in layers}

    def prefix_kv(self, t: Tensors, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        pk = t["prefix_key"].transpose(0, 1)[None].expand(B, -1, -1, -1).to(k.dtype)  # (B, KVH, P, hd)
        pv = t["prefix_value"].transpose(0, 1)[None].expand(B, -1, -1, -1).to(v.dtype)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def num_prefix_tokens(self) -> int:
        return self.num_virtual_tokens

    def position_offset(self) -> int:
        return self.num_virtual_tokens
