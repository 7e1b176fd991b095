"""LayerNorm tuning (Zhao et al.): train the (RMS)norm scale vectors, nothing else.

Block norms ("input_layernorm", "post_attention_layernorm") and the final
"norm" (edge-side) get trainable copies of their base weights, which replace
the base weights in forward. Merging copies them in (exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.runtime.model.transformer import NORM_NAMES
from edgetune.runtime.peft.base import Method, Tensors, matches_target


@dataclass(frozen=True)
class LNTuningConfig(Method):
    target_modules: str | tuple[str, ...] = ("input_layernorm", "post_attention_layernorm", "norm")
    layers_to_transform: tuple[int, ...] | None = None

    peft_type = "LN_TUNING"
    survey_branch = "selective"  # structural masking: only the norms' scales train
    mergeable = True

    @property
    def init_reads_weights(self) -> bool:
        return True  # the trained norms start as copies of the base norms

    def targets_final_norm(self) -> bool:
        if isinstance(self.target_modules, str):
            import re

            return re.fullmatch(self.target_modules, "model.norm") is not None
        return "norm" in self.target_modules or "model.norm" in self.target_modules

    def init_block(self, config, block, generator) -> Tensors:
        if self.layers_to_transform is not None and block.layer_idx not in self.layers_to_transform:
            return {}
        return {f"{name}.weight": getattr(block, name).weight.detach().float().cpu().clone()
                for name in NORM_NAMES if matches_target(self.target_modules, block.layer_idx, name)}

    def init_edge(self, config, model, generator) -> Tensors:
        if not self.targets_final_norm():
            return {}
        return {"norm.weight": model.norm.weight.detach().float().cpu().clone()}

    def norm_weight(self, t: Tensors, name: str, weight: torch.Tensor) -> torch.Tensor:
        return t.get(f"{name}.weight", weight)

    def edge_norm_weight(self, edge: Tensors, weight: torch.Tensor) -> torch.Tensor:
        return edge.get("norm.weight", weight)

    def merge(self, t: Tensors, block) -> Tensors:
        undo = {}
        for name in NORM_NAMES:
            if f"{name}.weight" in t:
                w = getattr(block, name).weight
                undo[name] = w.detach().clone()
                w.copy_(t[f"{name}.weight"])
        return undo

    def unmerge(self, t: Tensors, block, undo: Tensors) -> None:
        for name, original in undo.items():
            getattr(block, name).weight.copy_(original)

    def merge_edge(self, edge: Tensors, model) -> Tensors:
        if "norm.weight" not in edge:
            return {}
        undo = {"norm": model.norm.weight.detach().clone()}
        model.norm.weight.copy_(edge["norm.weight"])
        return undo

    def unmerge_edge(self, edge: Tensors, model, undo: Tensors) -> None:
        if "norm" in undo:
            model.norm.weight.copy_(undo["norm"])
