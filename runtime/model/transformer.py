"""edgetune's decoder-only transformer, in reading order.

    rotary embedding -> RMSNorm -> attention -> MLP -> Block -> CausalLM

One implementation serves Llama, Mistral and Qwen2 checkpoints (they differ
only in biases and config fields, see `config.py`). Module and parameter names
follow the Hugging Face layout (`model.layers.3.self_attn.q_proj.weight`) so a
checkpoint's tensors load by name.

The blocks are frozen. Every PEFT method reaches into a block only through the
`BlockAdapter` passed explicitly to `Block.forward` (see `peft/adapter.py`), so
one frozen block can serve any method and any client, locally or on a node.

A `CausalLM` may hold only part of a model: blocks `[start, end)` (a node's
share) and/or the edge modules (embeddings, final norm, LM head).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.runtime.model.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.peft.adapter import Adapter, BlockAdapter

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NORM_NAMES = ("input_layernorm", "post_attention_layernorm")


# --------------------------------------------------------------------- rotary
def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with llama3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)[None, None, :]  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the half-split ("rotate_half") convention."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------ ops
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x): normalise in fp32, scale in the input dtype (as Llama does)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (h + delta, rms_norm(h + delta))."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over (B, H, T, hd) queries and (B, KVH, S, hd) keys/values; causal when no mask is given.

    Grouped-query attention: SDPA shares each KV head across its query heads itself
    (no copies of k/v, nor of their gradients).
    """
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


def adapted_linear(adapter: BlockAdapter | None, name: str, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A block's linear layer with every PEFT method's change to it (see BlockAdapter.linear)."""
    if adapter is None:
        return F.linear(x, layer.weight, layer.bias)
    return adapter.linear(name, x, layer.weight, layer.bias)


@dataclass(frozen=True)
class BlockOps:
    """The ops a block runs, swappable as a set (runtime/compute/kernels.py registers faster ones).

    The defaults are the plain PyTorch references: the CPU path and the oracle every
    faster version is tested against.
    """

    rms_norm: Callable[..., torch.Tensor] = rms_norm
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]] = rope_qk
    swiglu: Callable[..., torch.Tensor] = swiglu
    attention: Callable[..., torch.Tensor] = attention
    linear: Callable[..., torch.Tensor] = adapted_linear
    name: str = "eager"


REFERENCE_OPS = BlockOps()


# ------------------------------------------------------------------- context
@dataclass
class ForwardContext:
    """What every block of one forward pass shares.

    cos, sin: (B, T, head_dim) rotary tables for the new tokens.
    attn_mask: None for plain causal attention over the new tokens (no cache,
        no prefix, no padding), else a bool (B, 1, T, S) mask, True = attend,
        over the S = prefix + past + T keys.
    dropout_key: (seed, step, micro_batch) in training with dropout, else None;
        each adapter extends it with (layer, module) for its masks.
    ops: the kernels the blocks run (REFERENCE_OPS unless an executor chose others).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_key: tuple[int, ...] | None = None
    ops: BlockOps = field(default=REFERENCE_OPS)


class KVCache:
    """Per-layer keys/values of the tokens seen so far: (B, kv_heads, S, hd) each."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # tokens cached (excluding any adapter prefix)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            old_k, old_v = self.layers[layer]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        self.layers = {i: (k[index], v[index]) for i, (k, v) in self.layers.items()}


# -------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight if weight is None else weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, config.q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, config.kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, config.kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_dim, d, bias=config.o_proj_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, adapter: BlockAdapter | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        linear = ctx.ops.linear
        q = linear(adapter, "self_attn.q_proj", self.q_proj, x).view(B, T, self.num_heads, self.head_dim)
        k = linear(adapter, "self_attn.k_proj", self.k_proj, x).view(B, T, self.num_kv_heads, self.head_dim)
        v = linear(adapter, "self_attn.v_proj", self.v_proj, x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KVH, T, hd)
        q, k = ctx.ops.rope(q, k, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KVH, past + T, hd)
        mask = ctx.attn_mask  # (B, 1, T, S) or None
        if adapter is not None:
            k, v = adapter.prefix_kv(k, v)  # (B, KVH, prefix + past + T, hd)
            if mask is not None and mask.shape[-1] > k.shape[2]:
                # a prefix method skips this layer (layers_to_transform): the mask counts keys it did
                # not add; prefix columns are all visible, so dropping any of them keeps the rest right
                mask = mask[..., mask.shape[-1] - k.shape[2]:]
        if adapter is not None and adapter.has_gates:  # per-token gates read x (UniPELT's gated prefix)
            out = adapter.gated_attention(ctx.ops.attention, q, k, v, mask, x)  # (B, H, T, hd)
        else:
            out = ctx.ops.attention(q, k, v, mask)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*hd)
        return linear(adapter, "self_attn.o_proj", self.o_proj, out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, adapter: BlockAdapter | None, ops: BlockOps = REFERENCE_OPS) -> torch.Tensor:
        gate = ops.linear(adapter, "mlp.gate_proj", self.gate_proj, x)  # (B, T, F)
        up = ops.linear(adapter, "mlp.up_proj", self.up_proj, x)  # (B, T, F)
        return ops.linear(adapter, "mlp.down_proj", self.down_proj, ops.swiglu(gate, up))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def linears(self) -> dict[str, nn.Linear]:
        return {name: self.get_submodule(name) for name in LINEAR_NAMES}

    def forward(
        self,
        h: torch.Tensor,  # (B, T, D)
        ctx: ForwardContext,
        adapter: BlockAdapter | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        norm_w = (lambda name, w: w) if adapter is None else adapter.norm_weight
        ops, norm1, norm2 = ctx.ops, self.input_layernorm, self.post_attention_layernorm
        x = ops.rms_norm(h, norm_w("input_layernorm", norm1.weight), norm1.eps)
        attn = self.self_attn(x, ctx, adapter, cache)  # (B, T, D)
        if adapter is not None:
            attn = adapter.after_attention(attn)  # serial (Houlsby) adapter
        h, x = ops.add_rms_norm(h, attn, norm_w("post_attention_layernorm", norm2.weight), norm2.eps)
        mlp = self.mlp(x, adapter, ops)  # (B, T, D)
        if adapter is not None:
            mlp = adapter.after_mlp(mlp, x)  # serial adapter and/or parallel adapter on the MLP input
        return h + mlp


# ---------------------------------------------------------------------- model
class CausalLM(nn.Module):
    """A whole causal LM, or a part of one: blocks [start, end) and/or the edge modules.

    `model(input_ids)` returns logits (B, T, V). A node-side part runs
    `forward_blocks` on hidden states instead.
    """

    def __init__(self, config: ModelConfig, start: int = 0, end: int | None = None, edge: bool = True) -> None:
        super().__init__()
        self.config = config
        self.start = start
        self.end = config.num_layers if end is None else end
        self.has_edge = edge
        self.layers = nn.ModuleList(Block(config, i) for i in range(self.start, self.end))
        if edge:
            # _weight skips the random init (the checkpoint overwrites it; on the meta device
            # the init would only pull in torch._dynamo)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                             _weight=torch.empty(config.vocab_size, config.hidden_size))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # on CPU even under torch.device("meta")
        self.adapter: Adapter | None = None  # attached by peft.adapter.attach_adapter
        # runs the blocks of a training/eval forward instead of run_blocks (compute.executor; None: run_blocks)
        self.runner: Callable[..., torch.Tensor] | None = None
        self.head_dtype: torch.dtype | None = None  # the loss's LM-head matmuls (None: the head's own dtype)
        self._head_cast: torch.Tensor | None = None

    # -- names -----------------------------------------------------------
    def hf_names(self) -> dict[str, str]:
        """Module parameter name -> Hugging Face checkpoint name (block indices made absolute)."""
        out = {}
        for name, _ in self.named_parameters():
            if name.startswith("layers."):
                idx, rest = name[len("layers."):].split(".", 1)
                out[name] = f"model.layers.{int(idx) + self.start}.{rest}"
            else:  # lm_head.* keeps its name; embed_tokens / norm live under model.
                out[name] = name if name.startswith("lm_head.") else f"model.{name}"
        return out

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under their Hugging Face checkpoint names."""
        params = dict(self.named_parameters())
        return {hf: params[name] for name, hf in self.hf_names().items()}

    def block(self, layer: int) -> Block:
        return self.layers[layer - self.start]

    def blocks(self) -> Iterator[Block]:
        return iter(self.layers)

    # -- edge pieces -----------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, T, D)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        norm_w = self.norm.weight if self.adapter is None else self.adapter.edge_norm_weight(self.norm.weight)
        return self.norm(h, norm_w)  # (B, T, D)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head (V, D): the embedding matrix when embeddings are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def loss_head_weight(self) -> torch.Tensor:
        """The LM head the training loss multiplies by: in `self.head_dtype` (bf16 on an edge that
        computes it natively, see compute.precision.resolve_head_dtype), cast once and kept."""
        w, dtype = self.head_weight, self.head_dtype
        if dtype is None or dtype == w.dtype:
            return w
        cached = self._head_cast
        if cached is None or cached.dtype != dtype or cached.shape != w.shape or cached.device != w.device:
            cached = self._head_cast = w.detach().to(dtype)
        return cached

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.final_norm(h), self.head_weight)  # (B, T, V)

    # -- context ---------------------------------------------------------
    def make_context(
        self,
        batch: int,
        new_tokens: int,
        device: torch.device,
        attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 = real token
        past: int = 0,
        prefix: int = 0,
        position_offset: int = 0,
        dropout_key: tuple[int, ...] | None = None,
    ) -> ForwardContext:
        """Positions, rotary tables and attention mask for T new tokens after `past` cached ones.

        With padding (zeros in attention_mask), positions count real tokens only,
        so a left-padded prompt gets the same positions as an unpadded one.
        """
        T = new_tokens
        if attention_mask is not None and bool((attention_mask == 0).any()):
            pos_all = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
            position_ids = pos_all[:, past:] + position_offset
        else:
            attention_mask = None
            position_ids = torch.arange(past, past + T, device=device)[None].expand(batch, T) + position_offset
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, self.dtype)
        attn_mask = None
        if attention_mask is not None or past > 0 or prefix > 0:
            S = prefix + past + T
            q_pos = torch.arange(past, past + T, device=device)[:, None] + prefix  # (T, 1)
            k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
            allowed = (k_pos <= q_pos)[None, None].expand(batch, 1, T, S)  # causal; prefix always visible
            if attention_mask is not None:
                keys_real = torch.cat([torch.ones(batch, prefix, dtype=torch.bool, device=device), attention_mask.bool()], dim=1)
                allowed = allowed & keys_real[:, None, None, :]
                # A padding query may see no real key (softmax of nothing = NaN, which
                # would leak through V); let every query see itself. Its output is ignored.
                allowed = allowed | (k_pos == q_pos)[None, None]
            attn_mask = allowed
        return ForwardContext(cos=cos, sin=sin, attn_mask=attn_mask, dropout_key=dropout_key)

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)  # a part may hold no parameters at all
        return torch.float32 if p is None else p.dtype

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return self.inv_freq.device if p is None else p.device

    # -- forward ---------------------------------------------------------
    def forward_blocks(self, h: torch.Tensor, ctx: ForwardContext, cache: KVCache | None = None, adapter: Adapter | None = None,
                       views: dict[int, BlockAdapter] | None = None) -> torch.Tensor:
        """Run this part's blocks on hidden states (B, T, D).

        `views` gives each block's adapter directly (a node builds them from the
        tensors the edge pushed); otherwise they come from `adapter` or the attached one.
        """
        if views is None:
            adapter = self.adapter if adapter is None else adapter
            views = {} if adapter is None else adapter.for_blocks(range(self.start, self.end), ctx.dropout_key)
        if self.runner is not None and cache is None:
            return self.runner(self, h, ctx, views)
        return self.run_blocks(h, ctx, views, cache)

    def run_blocks(self, h: torch.Tensor, ctx: ForwardContext, views: dict[int, BlockAdapter],
                   cache: KVCache | None = None) -> torch.Tensor:
        """The blocks one after the other, each with its adapter view and ctx.ops."""
        for block in self.layers:
            h = block(h, ctx, views.get(block.layer_idx), cache)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, past + T)
        cache: KVCache | None = None,
        dropout_key: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Logits (B, T', V); T' = T plus any prompt-tuning virtual tokens on the first call."""
        return self.head(self.last_hidden(input_ids, attention_mask, cache, dropout_key))

    def last_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        dropout_key: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T', D) after the last block, before the final norm (see forward)."""
        if not (self.has_edge and self.start == 0 and self.end == self.config.num_layers):
            raise RuntimeError("forward() needs a whole model; this part holds blocks "
                               f"[{self.start}, {self.end}) edge={self.has_edge}")
        h = self.embed(input_ids)
        past = 0 if cache is None else cache.length
        adapter = self.adapter
        if adapter is not None:  # prompt tuning (edge only): virtual tokens on the first call
            h, attention_mask = adapter.prepend_prompt(h, attention_mask, first=past == 0)
        B, T, _ = h.shape
        prefix, offset = (0, 0) if adapter is None else (adapter.num_prefix_tokens, adapter.position_offset)
        ctx = self.make_context(B, T, h.device, attention_mask, past, prefix, offset, dropout_key)
        h = self.forward_blocks(h, ctx, cache)
        if cache is not None:
            cache.length += T
        return h

    # -- generation -----------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Greedy or sampled generation with a KV cache; see `generation.generate`."""
        from edgetune.runtime.model.generation import generate

        return generate(self, input_ids, **kwargs)
