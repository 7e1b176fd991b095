"""LoKr (Kronecker-product low-rank update; LyCORIS, Yeh et al.) on a block's linear layers.

For a targeted linear y = x W^T + b (W: (out, in)), with out = a * b and in = c * d
split by `factorize`:

    y + s * x (w1 ⊗ w2)^T,    w1: (a, c),  w2: (b, d),  s = alpha / r

so a (out, in) update costs a*c + b*d numbers instead of out*in. A factor is a
rank-r product (w1 = w1_a w1_b, w2 = w2_a w2_b) where r is well below its size
(r < max(rows, cols) / 2, HF PEFT's rule); w1 only when `decompose_both`.

Tensors per targeted module (HF PEFT's names), in this order:
    lokr_w1 (a, c)            or  lokr_w1_a (a, r), lokr_w1_b (r, c)
    lokr_w2 (b, d)            or  lokr_w2_a (b, r), lokr_w2_b (r, d)

Initialisation matches HF PEFT: w1 (or w1_a) is zero, so training starts at the
base model; every other tensor is kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(cols),
1/sqrt(cols)). The forward never builds the (out, in) product: (w1 ⊗ w2) x is
w1 X w2^T with x viewed as X: (c, d). It merges exactly into W.

Saving and loading in PEFT's folder layout (`lokr_to_hf`, `lokr_from_hf`) is
registered in hf_format.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.model.transformer import LINEAR_NAMES
from edgetune.runtime.peft.base import Tensors, WeightDeltaMethod, matches_target

# every tensor a targeted module may hold, in creation order
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# the ones that start at zero (the left factor), so the update starts at zero
_ZERO_AT_INIT = ("lokr_w1", "lokr_w1_a")


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dim, as LyCORIS and HF PEFT split a dimension for LoKr.

    A positive `factor` that divides `dim` gives (factor, dim // factor) as is.
    Otherwise the divisors of `dim` are tried upwards while they are at most
    `factor` (any size for -1), stopping at the first one at or past sqrt(dim);
    the last one tried and its cofactor come back, smaller first:

        >>> factorize(256), factorize(128), factorize(127), factorize(128, 4), factorize(128, 3)
        ((16, 16), (8, 16), (1, 127), (4, 32), (2, 64))
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = 1
    for d in range(2, dim + 1):
        if d > limit:
            break
        if dim % d:
            continue
        m = d
        if d * d >= dim:
            break
    return min(m, dim // m), max(m, dim // m)


@dataclass(frozen=True)
class LoKrConfig(WeightDeltaMethod):
    r: int = 8
    alpha: float = 8.0
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    decompose_both: bool = False  # also make w1 a rank-r product (where r is small enough)
    decompose_factor: int = -1  # factorize's `factor`: -1 splits each dimension near its square root

    peft_type = "LOKR"
    survey_branch = "reparameterized"  # low-rank decomposition: a Kronecker product of (low-rank) factors

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.r <= 0:
            problems.append(f"rank r must be positive, got {self.r}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        if self.decompose_factor != -1 and self.decompose_factor <= 0:
            problems.append(f"decompose_factor must be -1 or positive, got {self.decompose_factor}")
        if problems:
            raise ConfigError("LoKr config: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, layer: int, names: Sequence[str]) -> list[str]:
        if self.layers_to_transform is not None and layer not in self.layers_to_transform:
            return []
        return [n for n in names if matches_target(self.target_modules, layer, n)]

    def shapes(self, d_out: int, d_in: int) -> dict[str, tuple[int, int]]:
        """The LoKr tensors of one (d_out, d_in) linear: suffix -> shape, in creation order."""
        a, b = factorize(d_out, self.decompose_factor)  # out = a * b
        c, d = factorize(d_in, self.decompose_factor)  # in = c * d
        r, out = self.r, {}
        if self.decompose_both and r < max(a, c) / 2:
            out.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            out.update(lokr_w1=(a, c))
        if r < max(b, d) / 2:
            out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
        else:
            out.update(lokr_w2=(b, d))
        return out

    # -- tensors ------------------------------------------------------------
    def init_block(self, config, block, generator: torch.Generator) -> Tensors:
        out: Tensors = {}
        for name, linear in block.linears().items():
            if name not in self.targets(block.layer_idx, [name]):
                continue
            for suffix, shape in self.shapes(*linear.weight.shape).items():
                if suffix in _ZERO_AT_INIT:
                    out[f"{name}.{suffix}"] = torch.zeros(shape)
                else:  # kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = columns
                    bound = shape[1] ** -0.5
                    out[f"{name}.{suffix}"] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        return out

    # -- rule -----------------------------------------------------------------
    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        w1 = _factor(t, name, "w1")  # (a, c)
        if w1 is None:
            return y
        w2 = _factor(t, name, "w2")  # (b, d)
        X = x.unflatten(-1, (w1.shape[1], w2.shape[1]))  # (..., c, d): x[p * d + q] = X[p, q]
        # (w1 ⊗ w2) x, entry i * b + j = sum_pq w1[i, p] X[p, q] w2[j, q] = (w1 X w2^T)[i, j]
        delta = (w1 @ X @ w2.T).flatten(-2)  # (..., a, d) -> (..., a, b) -> (..., out)
        return y + self.scaling * delta

    def delta_weight(self, t: Tensors, name: str) -> torch.Tensor | None:
        """s * (w1 ⊗ w2): (out, in), what merging adds to the linear's weight; None if not targeted."""
        w1 = _factor(t, name, "w1")
        return None if w1 is None else self.scaling * torch.kron(w1, _factor(t, name, "w2"))

    # -- merging --------------------------------------------------------------
    def weight_deltas(self, t: Tensors, block):
        for name, linear in block.linears().items():
            delta = self.delta_weight(t, name)
            if delta is not None:
                yield linear.weight, delta.to(linear.weight.dtype)



def _factor(t: Tensors, name: str, which: str) -> torch.Tensor | None:
    """Kronecker factor `which` ("w1" | "w2") of module `name`: the full matrix or its rank-r product."""
    full = t.get(f"{name}.lokr_{which}")
    if full is not None:
        return full
    left = t.get(f"{name}.lokr_{which}_a")  # (rows, r)
    return None if left is None else left @ t[f"{name}.lokr_{which}_b"]  # (rows, r) @ (r, cols)


# ---------------------------------------------------------- HF PEFT's adapter_config.json
# (hf_format imports this module, so its helpers are imported where they are used)
def lokr_to_hf(m: LoKrConfig, model_config: ModelConfig | None) -> dict[str, Any]:
    """PEFT's LoKrConfig fields for `m` (what `peft.LoKrConfig.save_pretrained` writes)."""
    from edgetune.runtime.peft import hf_format as hf

    targets, layers = hf._json_targets(m.target_modules), m.layers_to_transform
    if layers is not None and isinstance(m.target_modules, str):
        # PEFT ignores layers_to_transform beside a string target: name the modules instead.
        mc = hf._need(model_config, m)
        targets, layers = [hf._full(l, n) for l, n in hf._targeted(m.target_modules, layers, mc.num_layers, LINEAR_NAMES)], None
    return {"r": m.r, "alpha": hf._number(m.alpha), "rank_dropout": 0.0, "module_dropout": 0.0,
            "rank_dropout_scale": False, "use_effective_conv2d": False, "decompose_both": m.decompose_both,
            "decompose_factor": m.decompose_factor, "target_modules": targets, "exclude_modules": None,
            "layers_to_transform": None if layers is None else list(layers), "layers_pattern": None,
            "init_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def lokr_from_hf(cfg: dict[str, Any], source: str) -> LoKrConfig:
    """The LoKrConfig of a PEFT `adapter_config.json` dict; AdapterError names what edgetune lacks.

    rank_dropout, module_dropout, per-module rank / alpha patterns and the rest must be off.
    init_weights (the saved tensors replace the initial ones), use_effective_conv2d (convolutions
    only) and rank_dropout_scale (only with rank_dropout) do not change a linear's math."""
    from edgetune.runtime.peft import hf_format as hf

    hf._refuse_unknown(cfg, {"r", "alpha", "target_modules", "layers_to_transform", "layers_pattern",
                             "decompose_both", "decompose_factor", "init_weights", "use_effective_conv2d",
                             "rank_dropout_scale"}, source)
    if cfg.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        raise AdapterError(f"{source}: layers_pattern={cfg['layers_pattern']!r} is not supported (only \"layers\")")
    targets, layers = hf._targets_from(cfg, "target_modules", source), hf._layers_from(cfg, source)
    if isinstance(targets, str) or all(n.startswith("model.layers.") for n in targets):
        # PEFT applies layers_to_transform neither to a string target nor to full module names
        # (what it saves for "all-linear"); it adapted every module they name.
        layers = None
    factor = cfg.get("decompose_factor", -1)
    if not isinstance(factor, int) or isinstance(factor, bool):
        raise AdapterError(f"{source}: decompose_factor must be an int, got {factor!r}")
    return LoKrConfig(r=cfg.get("r", 8), alpha=cfg.get("alpha", 8), target_modules=targets, layers_to_transform=layers,
                      decompose_both=bool(cfg.get("decompose_both")), decompose_factor=factor)
