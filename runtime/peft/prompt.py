"""Prompt tuning (Lester et al.): P trained input embeddings prepended to every sequence.

Lives on the edge only (the nodes never see it): the virtual tokens join the
sequence before the first block, at positions 0..P-1, and the logits of the
first forward carry P extra leading positions. Cannot be merged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.runtime.peft.base import Tensors, VirtualTokenMethod


@dataclass(frozen=True)
class PromptTuningConfig(VirtualTokenMethod):
    # Optional "text" initialisation: the embeddings of these token ids,
    # repeated to fill P rows (HF PEFT's PromptTuningInit.TEXT); else N(0, 1).
    init_token_ids: tuple[int, ...] | None = None

    peft_type = "PROMPT_TUNING"
    survey_branch = "additive"  # soft prompts

    def init_edge(self, config, model, generator) -> Tensors:
        P = self.num_virtual_tokens
        if self.init_token_ids:
            ids = torch.tensor(self.init_token_ids, dtype=torch.long)
            ids = ids.repeat((P + len(ids) - 1) // len(ids))[:P]
            emb = model.embed_tokens.weight.detach()[ids.to(model.embed_tokens.weight.device)].float().cpu()
        else:
            emb = torch.randn(P, config.hidden_size, generator=generator)
        return {"prompt_embeddings": emb}  # (P, D)

    def prepend_prompt(self, edge: Tensors, h: torch.Tensor, mask: torch.Tensor | None, first: bool):
        """Prepend the virtual tokens on the first call; callers' masks never include them."""
        prompt = edge.get("prompt_embeddings")
        if prompt is None:
            return h, mask
        B = h.shape[0]
        if first:
            h = torch.cat([prompt.to(h.dtype)[None].expand(B, -1, -1), h], dim=1)  # (B, P + T, D)
        if mask is not None:
            ones = torch.ones(B, prompt.shape[0], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
        return h, mask
