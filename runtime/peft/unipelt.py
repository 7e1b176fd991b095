"""UniPELT (Mao et al. 2022): gated LoRA + gated prefix + gated bottleneck adapter in every block.

Each submodule's change is scaled by a per-token gate in (0, 1) that reads only that token's
own hidden state at the input of the sublayer it controls, so no gate ever sees a later token
(a gate averaged over the sequence, as some implementations do, would leak the future):

    g_K(x_t) = sigmoid(x_t . w_K + b_K)               w_K: (1, D), b_K: (1,), K in {lora, prefix, adapter}

    LoRA (q/k/v):  y_t + g_L(x_t) * s * (x_t A^T) B^T           x: the attention's normed input
    prefix:        out_t = sum_{j real} softmax_real(s_t)_j v_j + g_P(x_t) * sum_{j prefix} softmax_all(s_t)_j pv_j
    adapter:       m_t + g_A(u_t) * up(act(down(m_t)))          m: the MLP's output, u: its normed input

The LoRA, prefix and adapter parts reuse lora.py, prefix.py and bottleneck.py. A per-token
scalar commutes with LoRA's linear branch, so the gated LoRA is LoRA fed g_L(x_t) * x_t.

Why the prefix is not simply one more set of keys in the attention's softmax: a key there
takes weight from the real keys whatever its value and whatever the gate (sigmoid never
reaches 0), so the model could not start exactly at the base model nor could a closed gate
switch the prefix off. Here the real keys keep their own softmax -- the base attention,
untouched -- and the prefix adds its share: its values weighted by one softmax over prefix
and real keys (prefix tuning's weights), times the gate. See BlockAdapter.gated_attention.

Initialisation starts at the base model exactly: LoRA's B = 0, the adapter's up = 0, and the
prefix values pv = 0 (its share is a sum of weights times zeros); prefix keys ~ N(0, 1) as in
prefix.py, LoRA's A and the adapter's down as in lora.py / bottleneck.py, and each gate
(w, b) as torch's nn.Linear(D, 1), so gates start near 1/2. The zeros also mean that at the
first step only pv, B and up get gradients; the rest follow once they move (as LoRA's A does).

As in prefix tuning, the prefix counts as P past tokens (real tokens start at position P).

Block tensors (P = num_virtual_tokens, n = bottleneck_size):

    self_attn.{q,k,v}_proj.lora_A (r, D), .lora_B (out, r)     for the modules in lora_targets
    prefix_key, prefix_value (P, kv_heads, head_dim)
    mlp_adapter.down.weight (n, D), .down.bias (n,), .up.weight (D, n), .up.bias (D,)
    gate_lora.weight, gate_prefix.weight, gate_adapter.weight (1, D); their .bias (1,)

The gates are recorded (peft.stats) as gate.{lora,prefix,adapter}.{layer} in every forward.
Not mergeable (the gates depend on the input); saved with edgetune's own peft_type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.peft.base import Method, Tensors
from edgetune.runtime.peft.bottleneck import _ACTIVATIONS, _bottleneck, _bottleneck_init
from edgetune.runtime.peft.lora import LoraConfig
from edgetune.runtime.peft.prefix import PrefixTuningConfig, _linear_init

GATES = ("lora", "prefix", "adapter")
# The LoRA gate reads the attention's normed input, which is the input of these modules only.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class UniPeltConfig(Method):
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    num_virtual_tokens: int = 10
    bottleneck_size: int = 64
    activation: str = "relu"
    layers_to_transform: tuple[int, ...] | None = None

    peft_type = "EDGETUNE_UNIPELT"
    survey_branch = "hybrid"

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if not isinstance(self.lora_r, int) or self.lora_r <= 0:
            problems.append(f"lora_r must be a positive int, got {self.lora_r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        targets = self.lora_targets
        if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
            problems.append(f"lora_targets must be a non-empty list of {list(LORA_TARGETS)} (the gate reads the "
                            f"attention's input, which only they share), got {targets!r}")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            problems.append(f"bottleneck_size must be a positive int, got {self.bottleneck_size!r}")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation {self.activation!r} not in {sorted(_ACTIVATIONS)}")
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, tuple) or not layers
                                   or not all(isinstance(l, int) and l >= 0 for l in layers)):
            problems.append(f"layers_to_transform must be None or a non-empty list of layer indices, got {layers!r}")
        if problems:
            raise ConfigError("UniPELT config: " + "; ".join(problems))
        # the parts whose rules are reused (not fields: derived from the fields above)
        object.__setattr__(self, "_lora", LoraConfig(r=self.lora_r, alpha=self.lora_alpha, target_modules=targets,
                                                     layers_to_transform=layers))
        object.__setattr__(self, "_prefix", PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens))

    @property
    def lora_scaling(self) -> float:
        """LoRA's s = lora_alpha / lora_r."""
        return self._lora.scaling

    def _applies(self, layer: int) -> bool:
        return self.layers_to_transform is None or layer in self.layers_to_transform

    # -- tensors ------------------------------------------------------------
    def init_block(self, config, block, generator: torch.Generator) -> Tensors:
        if not self._applies(block.layer_idx):
            return {}
        d = config.hidden_size
        t = self._lora.init_block(config, block, generator)  # A kaiming-uniform, B = 0
        t.update(self._prefix.init_block(config, block, generator))  # keys and values ~ N(0, 1)
        t["prefix_value"] = torch.zeros_like(t["prefix_value"])  # a zero share: the base model at init
        t.update(_bottleneck_init("mlp_adapter", d, self.bottleneck_size, generator))  # up = 0
        for kind in GATES:
            w, b = _linear_init(1, d, generator)  # nn.Linear(D, 1)
            t[f"gate_{kind}.weight"], t[f"gate_{kind}.bias"] = w, b
        return t

    def gate(self, t: Tensors, kind: str, x: torch.Tensor) -> torch.Tensor:
        """g_kind(x_t) for every token: (B, T) from x (B, T, D)."""
        return torch.sigmoid(F.linear(x, t[f"gate_{kind}.weight"], t[f"gate_{kind}.bias"]))[..., 0]

    # -- rules ----------------------------------------------------------------
    def gates(self, t: Tensors, sublayer: str, x: torch.Tensor) -> Tensors:
        if sublayer == "attention":
            return {"lora": self.gate(t, "lora", x), "prefix": self.gate(t, "prefix", x)}
        return {"adapter": self.gate(t, "adapter", x)}

    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        if f"{name}.lora_A" not in t:
            return y
        g = self.gate(t, "lora", x)[..., None]  # (B, T, 1)
        return self._lora.post_linear(t, name, g * x, y, weight, bias, None)  # y + s ((g x) A^T) B^T

    def prefix_kv(self, t: Tensors, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prefix.prefix_kv(t, k, v)  # (B, KVH, P + S, hd): gated in BlockAdapter.gated_attention

    def after_mlp(self, t: Tensors, out: torch.Tensor, mlp_in: torch.Tensor, dropout_key) -> torch.Tensor:
        g = self.gate(t, "adapter", mlp_in)[..., None]  # (B, T, 1)
        return out + g * _bottleneck(t, "mlp_adapter", out, _ACTIVATIONS[self.activation])

    # -- edge hooks ----------------------------------------------------------
    def num_prefix_tokens(self) -> int:
        return self.num_virtual_tokens

    def position_offset(self) -> int:
        return self.num_virtual_tokens
