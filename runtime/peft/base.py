"""What every PEFT method is: a frozen config plus a rule, with its tensors passed in.

A method never owns tensors. `init_block` / `init_edge` create them, the
`Adapter` (adapter.py) holds the master copy, and the hooks below receive the
block's tensors explicitly -- so a node can run a block with tensors that
arrived over the wire, and the edge can run the same code locally.

Hooks default to "do nothing"; a method overrides only the ones it needs.
`BlockAdapter` calls only overridden hooks, so an unused hook costs nothing.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.model.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import Block, CausalLM

Tensors = dict[str, torch.Tensor]

HOOKS = ("pre_linear", "post_linear", "norm_weight", "prefix_kv", "after_attention", "after_mlp", "gates")
LINEAR_SHORT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matches_target(target_modules: str | Sequence[str], layer: int, name: str) -> bool:
    """Whether block module `name` (e.g. "self_attn.q_proj") of `layer` is targeted.

    A list matches by module-name suffix (as HF PEFT does: "q_proj" matches
    "model.layers.3.self_attn.q_proj"); "all-linear" matches every linear of a
    block; any other string is a regex matched against the full name.
    """
    full = f"model.layers.{layer}.{name}"
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return name.rsplit(".", 1)[-1] in LINEAR_SHORT_NAMES
        return re.fullmatch(target_modules, full) is not None
    return any(full == t or full.endswith("." + t) for t in target_modules)


@dataclass(frozen=True)
class Method:
    """Base of every method config. Subclasses are frozen dataclasses."""

    peft_type: ClassVar[str] = ""
    # Han et al. 2024 taxonomy: additive, selective, reparameterized or hybrid ("": not placed)
    survey_branch: ClassVar[str] = ""
    # True when folding into the base weights is exact (see merge()).
    mergeable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # Configs stay hashable and JSON-faithful: lists (from JSON/YAML) become tuples.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    # -- which tensors train ----------------------------------------------------
    def is_frozen(self, name: str) -> bool:
        """Whether block tensor `name` stays fixed while training (a sparse mask's indices).

        Frozen tensors are saved and checkpointed with the adapter and pushed to a node once per
        session, but they get no gradient, no optimizer state and no place in later pushes."""
        return False

    def constants(self, config: ModelConfig) -> Tensors:
        """Frozen tensors every targeted block of this method shares, rebuilt from the method
        config and the model's shapes alone, identically on every machine (VeRA's random
        projections). They are never trained nor pushed: a node rebuilds them, and the session's
        Open carries their digest so a node that would rebuild others refuses (see
        `constants_digest`). Hooks find them in their block tensors under the same names."""
        return {}

    # -- the edge's side of a training step ---------------------------------------
    def init_state(self, blocks: dict[int, Tensors]) -> Tensors:
        """Training state of the method beyond its tensors (AdaLoRA's importance averages),
        kept on the edge and saved in checkpoints; {} for most methods."""
        return {}

    def regularizer(self, blocks: dict[int, Tensors]) -> torch.Tensor | None:
        """A term added to the step's loss from the adapter's own tensors (AdaLoRA's
        orthogonality penalty), computed on the edge, which holds them; None: no term."""
        return None

    def after_optimizer_step(self, blocks: dict[int, Tensors], state: Tensors, step: int) -> dict[str, float]:
        """Runs on the edge after each optimizer step, gradients still in place and before the
        new version is pushed (AdaLoRA's rank allocation); returns values for metrics.jsonl."""
        return {}

    @property
    def init_reads_weights(self) -> bool:
        """True when init_block starts from the base weights (so it needs real blocks, not shapes)."""
        return False

    @property
    def reads_base_weight(self) -> bool:
        """True when the forward reads a linear's weight itself, not only through F.linear (a node
        holding quantized weights cannot serve such a method)."""
        return False

    # -- tensors ----------------------------------------------------------
    def init_block(self, config: ModelConfig, block: Block, generator: torch.Generator) -> Tensors:
        """Trainable tensors for one block ({} when the block is not targeted)."""
        return {}

    def init_edge(self, config: ModelConfig, model: CausalLM, generator: torch.Generator) -> Tensors:
        """Trainable tensors that live on the edge only (prompt embeddings, final-norm weight)."""
        return {}

    def derive_blocks(self, edge: Tensors, layers: Sequence[int]) -> dict[int, Tensors] | None:
        """Block tensors computed from edge tensors (prefix projection), or None."""
        return None

    # -- block hooks (override what you need) -----------------------------
    def pre_linear(self, t: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def post_linear(self, t: Tensors, name: str, x: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor | None, dropout_key: tuple | None) -> torch.Tensor:
        return y

    def norm_weight(self, t: Tensors, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def prefix_kv(self, t: Tensors, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def after_attention(self, t: Tensors, out: torch.Tensor) -> torch.Tensor:
        return out

    def after_mlp(self, t: Tensors, out: torch.Tensor, mlp_in: torch.Tensor, dropout_key: tuple | None) -> torch.Tensor:
        return out

    def gates(self, t: Tensors, sublayer: str, x: torch.Tensor) -> Tensors:
        """Per-token gates (B, T) in (0, 1) this method applies in the block's `sublayer`
        ("attention" or "mlp"), from that sublayer's normed input x (B, T, D): token t's gate
        reads token t alone, so gates stay causal (UniPELT's).

        BlockAdapter records each gate as `gate.{kind}.{layer}` (peft.stats: the layer is known
        there, not here), and a gate named "prefix" scales the share of the attention output
        that this method's prefix_kv keys bring (BlockAdapter.gated_attention). The method's own
        hooks compute the gates they apply themselves (the same function of the same input)."""
        return {}

    # -- edge hooks ----------------------------------------------------------
    def num_prefix_tokens(self) -> int:
        return 0

    def position_offset(self) -> int:
        """How far the new tokens' positions shift (HF prefix tuning counts the prefix)."""
        return 0

    def prepend_prompt(self, edge: Tensors, h: torch.Tensor, mask: torch.Tensor | None, first: bool):
        """Prompt tuning: add virtual tokens on the first call (first=True) and to every mask."""
        return h, mask

    def edge_norm_weight(self, edge: Tensors, weight: torch.Tensor) -> torch.Tensor:
        return weight

    # -- merging -------------------------------------------------------------
    def merge(self, t: Tensors, block: Block) -> Tensors:
        """Fold this method into the block's weights in place (mergeable methods only).

        Returns what unmerge() needs beyond the adapter tensors (often nothing).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, t: Tensors, block: Block, undo: Tensors) -> None:
        """Undo merge() in place."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def merge_edge(self, edge: Tensors, model: CausalLM) -> Tensors:
        if edge:
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")
        return {}

    def unmerge_edge(self, edge: Tensors, model: CausalLM, undo: Tensors) -> None:
        if edge:
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Method, hook)


@dataclass(frozen=True)
class WeightDeltaMethod(Method):
    """Base of the methods whose update is a weight delta added to targeted linears (AdaLoRA, VeRA,
    LoKr, sparse fine-tuning): merging adds each delta, unmerging subtracts it, both exact."""

    mergeable: ClassVar[bool] = True

    def weight_deltas(self, t: Tensors, block: Block) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(base weight, its delta in the weight's dtype and shape) for each linear of `block` in `t`."""
        raise NotImplementedError

    def merge(self, t: Tensors, block: Block) -> Tensors:
        for W, delta in self.weight_deltas(t, block):
            W.add_(delta)
        return {}

    def unmerge(self, t: Tensors, block: Block, undo: Tensors) -> None:
        for W, delta in self.weight_deltas(t, block):
            W.sub_(delta)


@dataclass(frozen=True)
class VirtualTokenMethod(Method):
    """Base of the methods that add P virtual tokens (prefix and prompt tuning)."""

    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"{self.peft_type.lower()}: num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
