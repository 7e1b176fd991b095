"""Text generation with a KV cache: greedy, or temperature + top-p sampling.

The prompt runs once through the whole model; every new token then runs one
position through the blocks, attending to the cached keys/values. Sampling is
seeded, so `seed=S` gives the same text every time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edgetune.runtime.model.transformer import CausalLM, KVCache
from edgetune.runtime.text.sampling import SamplingConfig


def next_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from logits (B, V) -> (B,)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # (B, V)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,  # (B, T), left-padded when rows differ in length
    attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token
    *,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prompt plus generated tokens, (B, T + n). Rows stop at an eos token (then padded with it).

    `on_token(tokens (B,))` is called for every generated step, for streaming.
    """
    cfg = SamplingConfig(max_new_tokens, greedy, temperature, top_p, seed)
    was_training = model.training
    model.eval()
    gen = None
    if not greedy:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    B = input_ids.shape[0]
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache = KVCache()
    out = input_ids
    mask = attention_mask
    logits = model(input_ids, attention_mask=mask, cache=cache)[:, -1]  # (B, V)
    for _ in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, gen)  # (B,)
        if eos.numel():
            tok = torch.where(done, eos[0], tok)
            done = done | torch.isin(tok, eos)
        out = torch.cat([out, tok[:, None]], dim=1)
        if on_token is not None:
            on_token(tok)
        if bool(done.all()):
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        logits = model(tok[:, None], attention_mask=mask, cache=cache)[:, -1]
    model.train(was_training)
    return out
