"""AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

LoRA in SVD form, whose total rank shrinks while training towards where it matters. For a
targeted linear y = x W^T + b (W: (out, in)), with r = init_r:

    y + dropout(x) (A * E)^T B^T * alpha / (r + 1e-5)      A: (r, in), E: (r, 1), B: (out, r)

Row i of A, E[i] and column i of B form triplet i (a right singular vector, its singular value
and a left singular vector). As in HF PEFT: E starts at 0 (training starts at the base model),
A and B ~ N(0, 0.02^2), and the scale divides by `ranknum` = init_r (+ 1e-5), which PEFT never
changes, not even for an adapter it loads with fewer ranks.

Training adds two things, both on the edge (which holds the master tensors):

- `regularizer`: orth_reg_weight * mean over every A and B of ||P P^T - I||_F (A: P P^T is
  (r, r); B: P^T P), PEFT's orthogonality term, added to the step's loss.
- `after_optimizer_step`: PEFT's RankAllocator. Each triplet's importance is an EMA of the
  sensitivity |p * grad| (beta1) times an EMA of its uncertainty (beta2), meaned over A's row
  and B's column and summed with E's. The total budget falls from init_r to target_r ranks per
  module on a cubic schedule between steps tinit and total_step - tfinal; every deltaT steps the
  least important triplets beyond the budget are masked (their E entries set to 0). At step
  total_step - tfinal the mask is final and is re-applied after every later step. Our `step`
  (the 0-based index of the step just taken) is PEFT's `global_step` as its examples count it
  (`update_and_allocate(global_step)` after `optimizer.step()`, then `global_step += 1`), so with
  tfinal = 0 the last step of a total_step-step run still masks on the cubic schedule. With
  target_r = init_r nothing is ever masked (PEFT fails at its first allocation instead).

`init_state` holds what PEFT keeps between steps, as tensors (a checkpoint saves them):
`exp_avg_ipt.{layer}.{tensor}`, `exp_avg_unc.{layer}.{tensor}` (each shaped like its tensor) and
`rank_mask.{layer}.{module}` (init_r,) bool, the last mask (PEFT's `rank_pattern`), all True until
the first allocation.

Saved as PEFT saves it: the rank_pattern of the last mask in adapter_config.json and only the
kept triplets in the safetensors (`shrink_to_rank_pattern`). Loading gives every module its full
init_r triplets again, the saved ones at their rank_pattern positions and zeros elsewhere, and
sets the mask to the rank_pattern (`expand_from_rank_pattern`): the same model (a zero triplet
adds nothing) that saves back to the same folder, and can train on with its dropped triplets
still masked.

Merging is exact: W += B (A * E) * alpha / (init_r + 1e-5).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.peft.base import Tensors, WeightDeltaMethod, matches_target
from edgetune.runtime.peft.rng import keyed_dropout

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import Block

TRIPLET = ("lora_A", "lora_E", "lora_B")
INIT_STD = 0.02  # PEFT's reset_lora_parameters: A, B ~ N(0, 0.02^2)
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclass(frozen=True)
class AdaLoraConfig(WeightDeltaMethod):
    """AdaLoRA on the targeted linears; `total_step` is the run's optimizer steps (finetune sets it).

        >>> AdaLoraConfig(init_r=12, target_r=8, alpha=32, target_modules=("q_proj", "v_proj"), total_step=1000)
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0  # PEFT's lora_alpha
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    tinit: int = 0  # steps before the budget starts to fall
    tfinal: int = 0  # steps at the end that train with the final mask
    deltaT: int = 1  # steps between two allocations (PEFT's name)
    beta1: float = 0.85  # EMA factor of the sensitivity
    beta2: float = 0.85  # EMA factor of the uncertainty
    orth_reg_weight: float = 0.5
    total_step: int = 0  # the run's optimizer steps; 0: unknown (inference), which training refuses

    peft_type = "ADALORA"
    survey_branch = "reparameterized"  # a LoRA derivative with a dynamic rank

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.init_r <= 0:
            problems.append(f"init_r must be positive, got {self.init_r}")
        if not 0 < self.target_r <= self.init_r:
            problems.append(f"target_r must be in [1, init_r={self.init_r}], got {self.target_r}")
        if self.alpha <= 0:
            problems.append(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        for name in ("tinit", "tfinal", "total_step"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.deltaT <= 0:
            problems.append(f"deltaT must be positive, got {self.deltaT}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                problems.append(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_step > 0 and self.total_step <= self.tinit + self.tfinal:
            problems.append(f"total_step ({self.total_step}) must exceed tinit + tfinal ({self.tinit} + {self.tfinal}) "
                            "to leave steps for the budget to fall")
        if problems:
            raise ConfigError("AdaLoRA config: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        """alpha / ranknum, as PEFT scales (ranknum = init_r, whatever rank a module keeps)."""
        return self.alpha / (self.init_r + RANKNUM_EPS)

    def is_target(self, layer: int, name: str) -> bool:
        if self.layers_to_transform is not None and layer not in self.layers_to_transform:
            return False
        return matches_target(self.target_modules, layer, name)

    # -- tensors ------------------------------------------------------------
    def init_block(self, config: ModelConfig, block: Block, generator: torch.Generator) -> Tensors:
        out: Tensors = {}
        r = self.init_r
        for name, linear in block.linears().items():
            if not self.is_target(block.layer_idx, name):
                continue
            d_out, d_in = linear.weight.shape
            out[f"{name}.lora_A"] = torch.randn(r, d_in, generator=generator) * INIT_STD  # (r, in)
            out[f"{name}.lora_E"] = torch.zeros(r, 1)  # (r, 1)
            out[f"{name}.lora_B"] = torch.randn(d_out, r, generator=generator) * INIT_STD  # (out, r)
        return out

    # -- rule -----------------------------------------------------------------
    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        A = t.get(f"{name}.lora_A")
        if A is None:
            return y
        E, B = t[f"{name}.lora_E"], t[f"{name}.lora_B"]
        x_d = x if dropout_key is None else keyed_dropout(x, self.dropout, dropout_key)
        return y + (x_d @ (A * E).T @ B.T) * self.scaling  # (..., out)

    def weight_deltas(self, t: Tensors, block: Block):
        for name, linear in block.linears().items():
            if f"{name}.lora_A" in t:
                A, E, B = (t[f"{name}.{n}"] for n in TRIPLET)
                yield linear.weight, (self.scaling * (B @ (A * E))).to(linear.weight.dtype)  # (out, in)


    # -- the edge's side of a training step ---------------------------------------
    def regularizer(self, blocks: dict[int, Tensors]) -> torch.Tensor | None:
        """orth_reg_weight * mean over every A and B of ||P P^T - I||_F, as PEFT adds to its loss."""
        norms = []
        for ts in blocks.values():
            for name, p in ts.items():
                if name.endswith(".lora_A"):
                    cov = p @ p.T  # (r, r)
                elif name.endswith(".lora_B"):
                    cov = p.T @ p  # (r, r)
                else:
                    continue
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                norms.append(torch.linalg.matrix_norm(cov - eye))  # Frobenius
        if not norms or self.orth_reg_weight == 0:
            return None
        return self.orth_reg_weight * (sum(norms[1:], norms[0]) / len(norms))

    def init_state(self, blocks: dict[int, Tensors]) -> Tensors:
        state: Tensors = {}
        for layer, ts in blocks.items():
            for name, t in ts.items():
                state[f"exp_avg_ipt.{layer}.{name}"] = torch.zeros_like(t)
                state[f"exp_avg_unc.{layer}.{name}"] = torch.zeros_like(t)
            for module in _modules(ts):
                state[f"rank_mask.{layer}.{module}"] = torch.ones(self.init_r, dtype=torch.bool, device=ts[f"{module}.lora_E"].device)
        return state

    def budget(self, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
        """(ranks kept in all, whether to mask now) after step `step`: PEFT's budget_schedule."""
        if step <= self.tinit:
            return init_budget, False
        if step > self.total_step - self.tfinal:
            return target_budget, True
        falling = self.total_step - self.tfinal - self.tinit
        coeff = 1 - (step - self.tinit) / falling
        return int((init_budget - target_budget) * coeff ** 3 + target_budget), step % self.deltaT == 0

    def after_optimizer_step(self, blocks: dict[int, Tensors], state: Tensors, step: int) -> dict[str, float]:
        """PEFT's AdaLoraModel.update_and_allocate(global_step=step), gradients still in place."""
        if self.total_step <= 0:
            raise ConfigError("AdaLoRA: total_step is 0; set it to the run's number of optimizer steps "
                              "(edgetune finetune sets it from --steps)")
        modules = [(layer, m) for layer, ts in blocks.items() for m in _modules(ts)]
        init_budget, target_budget = self.init_r * len(modules), self.target_r * len(modules)
        final = self.total_step - self.tfinal
        if step < final:
            self._update_importance(blocks, state)
            budget, mask_now = self.budget(step, init_budget, target_budget)
            if mask_now:
                self._mask_to_budget(blocks, state, modules, init_budget - budget)
        elif step == final:  # the last allocation; the averages are not needed any more
            budget = self.budget(step, init_budget, target_budget)[0]
            self._mask_to_budget(blocks, state, modules, init_budget - budget)
            for name, t in state.items():
                if name.startswith("exp_avg_"):
                    t.zero_()
        else:  # train on with the final mask (the optimizer may have moved masked E entries)
            budget = target_budget
            self._apply_masks(blocks, state, modules)
        kept = sum(int(state[f"rank_mask.{layer}.{m}"].sum()) for layer, m in modules)
        return {"adalora_budget": budget, "adalora_rank": kept}

    @torch.no_grad()
    def _update_importance(self, blocks: dict[int, Tensors], state: Tensors) -> None:
        """The EMAs of sensitivity |p * grad| and of its uncertainty |ipt - EMA|, per entry (PEFT's update_ipt)."""
        for layer, ts in blocks.items():
            for name, p in ts.items():
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg = self.beta1 * state[f"exp_avg_ipt.{layer}.{name}"] + (1 - self.beta1) * ipt
                unc = self.beta2 * state[f"exp_avg_unc.{layer}.{name}"] + (1 - self.beta2) * (ipt - avg).abs()
                state[f"exp_avg_ipt.{layer}.{name}"], state[f"exp_avg_unc.{layer}.{name}"] = avg, unc

    def _triplet_scores(self, state: Tensors, layer: int, module: str) -> torch.Tensor:
        """(r,) importance of each triplet: E's score plus the mean scores of A's row and B's column."""
        def score(n: str) -> torch.Tensor:
            return state[f"exp_avg_ipt.{layer}.{module}.{n}"] * state[f"exp_avg_unc.{layer}.{module}.{n}"]

        a = torch.mean(score("lora_A"), dim=1, keepdim=True)  # (r, 1)
        b = torch.mean(score("lora_B"), dim=0).view(-1, 1)  # (r, 1)
        return score("lora_E").view(-1) + (a + b).view(-1)  # (r,)

    @torch.no_grad()
    def _mask_to_budget(self, blocks: dict[int, Tensors], state: Tensors, modules: list[tuple[int, str]],
                        num_masked: int) -> None:
        """Mask the num_masked least important triplets of the whole adapter (ties: all at the threshold)."""
        scores = {(layer, m): self._triplet_scores(state, layer, m) for layer, m in modules}
        if num_masked > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=num_masked).values.item()
        else:  # target_r == init_r: nothing to give up (PEFT fails here)
            threshold = -math.inf
        for (layer, m), s in scores.items():
            state[f"rank_mask.{layer}.{m}"] = s > threshold
        self._apply_masks(blocks, state, modules)

    @torch.no_grad()
    def _apply_masks(self, blocks: dict[int, Tensors], state: Tensors, modules: list[tuple[int, str]]) -> None:
        for layer, m in modules:
            blocks[layer][f"{m}.lora_E"].masked_fill_(~state[f"rank_mask.{layer}.{m}"][:, None], 0.0)


def _modules(ts: Tensors) -> list[str]:
    """The targeted modules of one block's tensors, e.g. 'self_attn.q_proj'."""
    return [name.removesuffix(".lora_A") for name in ts if name.endswith(".lora_A")]


# =============================================================== the PEFT folder layout
# (hf_format imports this module, so its helpers are imported where they are used)
_ADALORA_KEYS = {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                 "total_step", "rank_pattern"}
PEFT_UNUSED_R = 8  # PEFT's AdaLoRA ignores LoraConfig's r and warns unless it is the default 8


def adalora_to_hf(m: AdaLoraConfig, model_config: ModelConfig | None) -> dict[str, Any]:
    """PEFT's AdaLoraConfig fields for `m` (rank_pattern: None; see shrink_to_rank_pattern).

    PEFT's AdaLoraConfig is a LoraConfig, so the LoRA fields are LoRA's. PEFT refuses a config
    whose total_step leaves no budget phase even for inference, so an untrained config (0)
    is written with the smallest total_step PEFT accepts."""
    from edgetune.runtime.peft import hf_format as hf
    from edgetune.runtime.peft.lora import LoraConfig

    lora = LoraConfig(r=PEFT_UNUSED_R, alpha=m.alpha, dropout=m.dropout, target_modules=m.target_modules,
                      layers_to_transform=m.layers_to_transform)
    return {**hf._lora_hf(lora, model_config), "init_r": m.init_r, "target_r": m.target_r, "tinit": m.tinit,
            "tfinal": m.tfinal, "deltaT": m.deltaT, "beta1": m.beta1, "beta2": m.beta2,
            "orth_reg_weight": m.orth_reg_weight, "total_step": m.total_step or m.tinit + m.tfinal + 1,
            "rank_pattern": None}


def adalora_from_hf(cfg: dict[str, Any], source: str) -> AdaLoraConfig:
    """The AdaLoraConfig of a PEFT `adapter_config.json` dict (its rank_pattern is read by
    expand_from_rank_pattern); the LoRA fields are checked as LoRA's are."""
    from edgetune.runtime.peft import hf_format as hf

    lora = hf._lora_from({k: v for k, v in cfg.items() if k not in _ADALORA_KEYS and k != "r"}, source)
    if lora.use_dora:
        raise AdapterError(f"{source}: use_dora is set, but AdaLoRA has no DoRA form (PEFT refuses it too)")
    fields = {k: cfg[k] for k in _ADALORA_KEYS - {"rank_pattern", "total_step"} if cfg.get(k) is not None}
    return AdaLoraConfig(alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                         layers_to_transform=lora.layers_to_transform, total_step=cfg.get("total_step") or 0, **fields)


def _pattern_key(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{module}.lora_E"  # PEFT's rank_pattern keys, adapter name removed


def shrink_to_rank_pattern(m: AdaLoraConfig, blocks: dict[int, Tensors], state: Tensors) -> tuple[dict[int, Tensors], dict[str, Any]]:
    """(blocks as PEFT saves them, config entries): only the triplets the last mask kept, and
    their rank_pattern; the blocks unchanged and no entry while every triplet is kept (PEFT's
    rank_pattern is None until its first allocation)."""
    masks = {(layer, mod): state.get(f"rank_mask.{layer}.{mod}") for layer, ts in blocks.items() for mod in _modules(ts)}
    if all(mask is None or bool(mask.all()) for mask in masks.values()):
        return blocks, {}
    pattern, out = {}, {layer: dict(ts) for layer, ts in blocks.items()}
    for (layer, mod), mask in masks.items():
        keep = torch.ones(m.init_r, dtype=torch.bool) if mask is None else mask.cpu()
        pattern[_pattern_key(layer, mod)] = keep.tolist()
        ts = out[layer]
        keep = keep.to(ts[f"{mod}.lora_A"].device)
        ts[f"{mod}.lora_A"], ts[f"{mod}.lora_E"] = ts[f"{mod}.lora_A"][keep], ts[f"{mod}.lora_E"][keep]  # (kept, in), (kept, 1)
        ts[f"{mod}.lora_B"] = ts[f"{mod}.lora_B"][:, keep]  # (out, kept)
    return out, {"rank_pattern": pattern}


def expand_from_rank_pattern(m: AdaLoraConfig, cfg: dict[str, Any], loaded: dict[str, torch.Tensor], state: Tensors,
                             source: str) -> dict[str, torch.Tensor]:
    """Saved triplets ('layers.{i}.{tensor}' -> tensor, shrunk to cfg's rank_pattern) placed back
    at their positions among init_r zero triplets; state's masks become the rank_pattern."""
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{source}: rank_pattern must be an object of module -> list of bools, got {pattern!r}")
    out = dict(loaded)
    for key, kept in pattern.items():
        layer, mod = _pattern_module(key, source)
        if f"layers.{layer}.{mod}.lora_A" not in loaded:
            continue  # a layer this model part does not hold, or a module _fill will report
        if not (isinstance(kept, list) and len(kept) == m.init_r and all(isinstance(v, bool) for v in kept)):
            raise AdapterError(f"{source}: rank_pattern[{key!r}] must list init_r={m.init_r} bools, got {kept!r}")
        mask = torch.tensor(kept, dtype=torch.bool)
        n = int(mask.sum())
        for name in TRIPLET:
            t = loaded[f"layers.{layer}.{mod}.{name}"]
            rows = t.T if name == "lora_B" else t  # (kept, out) for B
            if rows.shape[0] != n:
                raise AdapterError(f"{source}: tensor {mod}.{name} of layer {layer} has {rows.shape[0]} ranks, "
                                   f"but its rank_pattern keeps {n}")
            full = rows.new_zeros((m.init_r, *rows.shape[1:]))
            full[mask] = rows
            out[f"layers.{layer}.{mod}.{name}"] = full.T.contiguous() if name == "lora_B" else full
        own = state.get(f"rank_mask.{layer}.{mod}")
        if own is not None:
            state[f"rank_mask.{layer}.{mod}"] = mask.to(own.device)
    return out


def _pattern_module(key: Any, source: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj.lora_E' (PEFT's key; '.<adapter>' may follow) -> (3, 'self_attn.q_proj')."""
    match = re.fullmatch(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_E(?:\.[\w-]+)?", str(key))
    if match is None:
        raise AdapterError(f"{source}: rank_pattern key {key!r} is not 'model.layers.<i>.<module>.lora_E'")
    return int(match.group(1)), match.group(2)
