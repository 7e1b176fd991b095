"""VeRA (Kopiczko et al., "Vector-based Random Matrix Adaptation") on a block's linear layers.

One pair of frozen random projections serves every targeted linear of the model;
each linear trains only two scaling vectors. For a targeted y = x W^T + b
(W: (out, in)):

    y + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))

    A: (r, max_in), B: (max_out, r)   shared, frozen; max over every targeted linear
    lambda_d: (r,)   starts at d_initial
    lambda_b: (out,) starts at 0, so training starts at the base model

A and B are `Method.constants`: rebuilt from `projection_prng_key` and the model's
shapes on every machine, never trained nor pushed. They are drawn as HF PEFT draws
them -- kaiming-uniform (gain sqrt(2), fan-in), A then B, from one CPU generator
seeded with the key -- so PEFT's projections and edgetune's agree for the same key
and torch build, and both hold them in fp32.

Saving follows PEFT with `save_projection=True`: `base_model.vera_A` (r, max_in) and
`base_model.vera_B` (max_out, r) sit beside each linear's `vera_lambda_b` (out,) and
`vera_lambda_d` (r,). Loading honours a saved projection even where the key would
regenerate another (one drawn by another torch build, or edited): it replaces the
edge adapter's constants, so local inference, merging, export and training use it.
A distributed session needs nodes that rebuild the same constants; with a projection
the key does not regenerate, the node's constants digest check refuses the session
rather than computing a different model. A folder without the projection (PEFT's
`save_projection=False`) is loaded with the regenerated one, as PEFT itself does.

VeRA merges exactly: W += (lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in]).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.peft.base import Tensors, WeightDeltaMethod, matches_target
from edgetune.runtime.peft.rng import keyed_dropout

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import Block

# torch.Generator.manual_seed accepts these seeds
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


@dataclass(frozen=True)
class VeraConfig(WeightDeltaMethod):
    r: int = 256
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    peft_type = "VERA"
    survey_branch = "reparameterized"  # a LoRA derivative: a low-rank update, here from shared random factors

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"rank r must be a positive integer, got {self.r!r}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        if self.layers_to_transform is not None and not all(_is_int(l) and l >= 0 for l in self.layers_to_transform):
            problems.append(f"layers_to_transform must hold layer indices >= 0, got {self.layers_to_transform!r}")
        if not _is_int(self.projection_prng_key) or not _SEED_RANGE[0] <= self.projection_prng_key <= _SEED_RANGE[1]:
            problems.append(f"projection_prng_key must be an integer in [-2^63, 2^64), got {self.projection_prng_key!r}")
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool) or not math.isfinite(self.d_initial):
            problems.append(f"d_initial must be a finite number, got {self.d_initial!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if problems:
            raise ConfigError("VeRA config: " + "; ".join(problems))

    def targets(self, layer: int, name: str) -> bool:
        """Whether linear `name` (e.g. "self_attn.q_proj") of `layer` gets VeRA."""
        if self.layers_to_transform is not None and layer not in self.layers_to_transform:
            return False
        return matches_target(self.target_modules, layer, name)

    def projection_shape(self, config: ModelConfig) -> tuple[int, int] | None:
        """(max_out, max_in) over every targeted linear of the whole model; None when none is targeted.

        From the model config, not from the blocks at hand: a node holding a few blocks
        must size the shared projections as the edge does."""
        shapes = [shape for layer in range(config.num_layers) for name, shape in config.linear_shapes().items()
                  if self.targets(layer, name)]
        if not shapes:
            return None
        return max(o for o, _ in shapes), max(i for _, i in shapes)

    # -- tensors ------------------------------------------------------------
    def constants(self, config: ModelConfig) -> Tensors:
        """{"vera_A": (r, max_in), "vera_B": (max_out, r)} fp32, from projection_prng_key alone."""
        shape = self.projection_shape(config)
        if shape is None:
            return {}
        max_out, max_in = shape
        # a CPU generator: the same draws on every machine, whatever device the model runs on
        gen = torch.Generator(device="cpu").manual_seed(self.projection_prng_key)
        A = _kaiming_uniform((self.r, max_in), gen)  # (r, max_in)
        B = _kaiming_uniform((max_out, self.r), gen)  # (max_out, r)
        return {"vera_A": A, "vera_B": B}

    def init_block(self, config: ModelConfig, block: Block, generator: torch.Generator) -> Tensors:
        out: Tensors = {}
        for name, (d_out, _) in config.linear_shapes().items():
            if self.targets(block.layer_idx, name):
                out[f"{name}.vera_lambda_d"] = torch.full((self.r,), float(self.d_initial))  # (r,)
                out[f"{name}.vera_lambda_b"] = torch.zeros(d_out)  # (out,)
        return out

    # -- rule -----------------------------------------------------------------
    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        lambda_d = t.get(f"{name}.vera_lambda_d")
        if lambda_d is None:
            return y
        lambda_b = t[f"{name}.vera_lambda_b"]
        A = t["vera_A"][:, : x.shape[-1]]  # (r, in)
        B = t["vera_B"][: y.shape[-1]]  # (out, r)
        x_d = x if dropout_key is None else keyed_dropout(x, self.dropout, dropout_key)
        h = lambda_d * (x_d @ A.T)  # (..., r)
        return y + lambda_b * (h @ B.T)  # (..., out)

    # -- merging --------------------------------------------------------------
    def weight_deltas(self, t: Tensors, block: Block) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(W, its VeRA delta (out, in)) for each targeted linear; `t` holds the constants too."""
        for name, linear in block.linears().items():
            if f"{name}.vera_lambda_d" in t:
                W = linear.weight
                d_out, d_in = W.shape
                A = t["vera_A"][:, :d_in] * t[f"{name}.vera_lambda_d"][:, None]  # (r, in)
                B = t["vera_B"][:d_out] * t[f"{name}.vera_lambda_b"][:, None]  # (out, r)
                yield W, (B @ A).to(W.dtype)



def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2) (kaiming-uniform for ReLU).

    The bound is computed in this order, and drawn with `uniform_`, because that is how
    PEFT draws VeRA's projections: the same key then gives PEFT's tensors bit for bit."""
    std = math.sqrt(2.0) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


# =============================================================== HF PEFT format
# where a saved folder keeps the shared projections (PEFT's save_projection=True keys)
SAVED_PROJECTION = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}

# adapter_config.json keys vera_from_hf reads; any other set option is refused
_HF_KEYS = {"r", "target_modules", "layers_to_transform", "layers_pattern", "projection_prng_key", "save_projection",
            "vera_dropout", "d_initial", "fan_in_fan_out", "bias", "init_weights"}


def vera_to_hf(m: VeraConfig, mc: ModelConfig | None) -> dict[str, Any]:
    """PEFT's VeraConfig fields for `m` (the projection is always saved)."""
    from edgetune.runtime.model.transformer import LINEAR_NAMES
    from edgetune.runtime.peft import hf_format as hf

    targets = list(m.target_modules) if isinstance(m.target_modules, tuple) else m.target_modules
    layers = m.layers_to_transform
    if layers is not None and isinstance(m.target_modules, str):
        # PEFT's VeRA ignores layers_to_transform beside a string target ("all-linear" too): name the modules
        pairs = hf._targeted(m.target_modules, layers, hf._need(mc, m).num_layers, LINEAR_NAMES)
        targets, layers = [hf._full(l, n) for l, n in pairs], None
    return {"r": m.r, "target_modules": targets, "layers_to_transform": None if layers is None else list(layers),
            "layers_pattern": None, "projection_prng_key": m.projection_prng_key, "save_projection": True,
            "vera_dropout": m.dropout, "d_initial": m.d_initial, "fan_in_fan_out": False, "bias": "none",
            "init_weights": True, "modules_to_save": None}


def vera_from_hf(cfg: dict[str, Any], source: str) -> VeraConfig:
    """The VeraConfig of a PEFT `adapter_config.json` dict; AdapterError for options edgetune lacks.

    `save_projection` needs no field: a saved projection is loaded whenever the folder has
    one (see the module docstring). `fan_in_fan_out` is ignored as PEFT ignores it on
    nn.Linear, and `init_weights` only chose the lambdas' start, which the file overwrites."""
    from edgetune.runtime.peft import hf_format as hf

    hf._refuse_unknown(cfg, _HF_KEYS, source)
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={cfg['bias']!r} (trained base biases) is not supported; only \"none\"")
    if cfg.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        raise AdapterError(f"{source}: layers_pattern={cfg['layers_pattern']!r} is not supported (only \"layers\")")
    targets = hf._targets_from(cfg, "target_modules", source)
    # as PEFT: layers_to_transform selects among listed modules only, never beside a string target
    return VeraConfig(r=cfg.get("r", 256), target_modules=targets,
                      layers_to_transform=None if isinstance(targets, str) else hf._layers_from(cfg, source),
                      projection_prng_key=cfg.get("projection_prng_key", 0), d_initial=cfg.get("d_initial", 0.1),
                      dropout=cfg.get("vera_dropout") or 0.0)
