"""One block executor for a node's part and for `finetune --local`: runs blocks with a kernel set.

    executor = BlockExecutor("compiled")
    h = executor.forward_blocks(part, h, ctx, views)

- eager / fused: the blocks run as Python calls over the chosen ops (`kernels.block_ops`).
- compiled: each block's forward goes through one `torch.compile`d function, made once per
  (block class, method stack with ranks, dtype, sequence-length bucket); AOT autograd
  compiles its backward. The blocks of a part share the compiled code: their weights and
  the adapter tensors are graph inputs, so neither another block, a new adapter version nor
  a new step recompiles (a test fails on any recompile after warm-up). Sequence lengths are
  padded up to a bucket (a multiple of `BUCKET` tokens, after the causal positions, where no
  real token can see them) so a ragged last batch does not compile again -- except with dropout,
  whose masks depend on the shape they are drawn for (such a micro-batch compiles for its length).

Training with dropout: each block's dropout keys are hashed before the call into one int64
tensor (`BlockAdapter.with_hashed_keys`), an input like any other, so the compiled code draws the
same masks as eager code without being specialised to a step.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from edgetune.runtime.compute.kernels import block_ops

log = logging.getLogger("edgetune.kernels")
BUCKET = 64  # tokens: sequence lengths are padded up to a multiple of this for compiled blocks
RECOMPILE_LIMIT = 64  # compiled variants per block function (buckets x batch sizes x method stacks)


def _run_block(block, h, ctx, view):
    return block(h, ctx, view)


def bucket(tokens: int) -> int:
    return -(-tokens // BUCKET) * BUCKET


class BlockExecutor:
    """Runs blocks with the ops of one concrete kernel mode (eager, compiled or fused)."""

    def __init__(self, mode: str = "eager", backend: str = "inductor") -> None:
        self.mode = mode
        self.backend = backend  # torch.compile's backend (tests use aot_eager where inductor adds nothing)
        self.ops = block_ops(mode)
        self._compiled = {}  # (block class, methods, dtype, bucket) -> compiled function
        if mode == "compiled":
            import torch._dynamo

            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)

    def runner(self, methods_key: str = ""):
        """A `CausalLM.runner` that runs a whole local model's blocks through this executor."""
        return lambda part, h, ctx, views: self.forward_blocks(part, h, ctx, views, methods_key)

    def variants(self) -> int:
        """How many compiled block functions exist (one per key)."""
        return len(self._compiled)

    def forward_blocks(self, part, h: torch.Tensor, ctx, views: dict, methods_key: str = "") -> torch.Tensor:
        """Run `part`'s blocks on h (B, T, D), each with views[layer] (its BlockAdapter)."""
        ctx = replace(ctx, ops=self.ops)
        if self.mode != "compiled":
            return part.run_blocks(h, ctx, views)
        # no Python key inside compiled code (it would be guarded on, i.e. recompiled, every step):
        # hashed ahead where a method drops something, dropped where none does
        drops = ctx.dropout_key is not None and any(getattr(m, "dropout", 0) > 0 for v in views.values() for m in v.methods)
        ctx = replace(ctx, dropout_key=None)
        views = {layer: v.with_hashed_keys() if drops else v.without_dropout() for layer, v in views.items()}
        T = h.shape[1]
        Tp = T if drops else bucket(T)  # a mask's values depend on the shape it is drawn for: no padding
        if Tp != T:
            h, ctx = _pad(h, ctx, Tp)
        for block in part.layers:
            h = self._function(block, methods_key, h.dtype, Tp)(block, h, ctx, views.get(block.layer_idx))
        return h[:, :T] if Tp != T else h

    def _function(self, block, methods_key: str, dtype, tokens: int):
        key = (type(block).__name__, methods_key, str(dtype), tokens)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = torch.compile(_run_block, backend=self.backend, dynamic=False)
            log.info("kernels compiled: new block function for %s", key)
        return fn


def _pad(h: torch.Tensor, ctx, tokens: int):
    """h and ctx padded with tokens after the real ones (zeros; rotary tables repeat the last row).

    Causal attention keeps real queries from seeing them; a given mask is extended so that each
    padding query sees itself only."""
    B, T, D = h.shape
    extra = tokens - T
    h = torch.cat([h, h.new_zeros(B, extra, D)], dim=1)
    cos = torch.cat([ctx.cos, ctx.cos[:, -1:].expand(-1, extra, -1)], dim=1)
    sin = torch.cat([ctx.sin, ctx.sin[:, -1:].expand(-1, extra, -1)], dim=1)
    mask = ctx.attn_mask
    if mask is not None:
        S = mask.shape[-1]
        padded = torch.zeros(B, 1, tokens, S + extra, dtype=torch.bool, device=mask.device)
        padded[:, :, :T, :S] = mask
        idx = torch.arange(T, tokens, device=mask.device)
        padded[:, :, idx, S - T + idx] = True
        mask = padded
    return h, replace(ctx, cos=cos, sin=sin, attn_mask=mask)
