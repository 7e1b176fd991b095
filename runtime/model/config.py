"""Model configuration: one frozen dataclass read from a Hugging Face `config.json`.

Both config layouts are read: the one most published checkpoints use
(`rope_theta` / `rope_scaling` at top level) and the one transformers 5 writes
(`rope_parameters`). Anything edgetune does not implement is refused with an
error that names the feature -- never silently wrong numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.runtime.errors import ConfigError, ModelLoadError, UnsupportedModelError
from edgetune.runtime.jsonfile import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of type `llama3` (the only scaled type supported)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for llama) biases
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear layer in a block, by HF name."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_dim, d),
            "self_attn.k_proj": (self.kv_dim, d),
            "self_attn.v_proj": (self.kv_dim, d),
            "self_attn.o_proj": (d, self.q_dim),
            "mlp.gate_proj": (f, d),
            "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f),
        }

    def linear_has_bias(self, name: str) -> bool:
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return self.attention_bias
        if name == "self_attn.o_proj":
            return self.o_proj_bias
        return self.mlp_bias

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a transformers `config.json` dict; `source` names it in errors."""
        try:
            return _parse_hf(raw)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{source}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: missing or malformed field ({type(e).__name__}: {e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = read_json_object(path, ModelLoadError)
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: config file not found") from None
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers (and edgetune) read back to this config."""
        model_type = {v: k for k, v in _MODEL_TYPES.items()}[self.architecture]
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        out.update(self.special_token_fields())
        return out

    def special_token_fields(self) -> dict[str, Any]:
        """bos/eos/pad ids as config.json and generation_config.json spell them (unset ones omitted)."""
        out: dict[str, Any] = {}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        return out


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if archs:
        if len(archs) != 1:
            raise UnsupportedModelError(f"several architectures {archs}; expected one")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        return arch
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} and no 'architectures' field")
    return _MODEL_TYPES[model_type]


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope theta and scaling from either config layout."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:  # transformers 5 layout
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling: dict[str, Any] | None = params
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"unsupported rope_scaling type {rope_type!r} (supported: llama3)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _check_unsupported(raw: dict[str, Any], arch: str, max_pos: int) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {act!r} (supported: silu)")
    if int(raw.get("pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError(f"unsupported pretraining_tp {raw['pretraining_tp']} (supported: 1)")
    # Sliding-window attention is refused unless the window covers the whole
    # context edgetune will ever attend over (then it is plain causal attention).
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", arch == "MistralForCausalLM")
    if window is not None and uses_window and int(window) < max_pos:
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos}) is not supported; "
            "only windows that cover the whole context are"
        )
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and uses_window:
        raise UnsupportedModelError(f"unsupported layer_types {sorted(set(layer_types))} (supported: full_attention)")


def _parse_hf(raw: dict[str, Any]) -> ModelConfig:
    arch = _architecture(raw)
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    max_pos = int(raw.get("max_position_embeddings", 2048))
    _check_unsupported(raw, arch, max_pos)
    theta, scaling = _rope(raw)
    head_dim = raw.get("head_dim") or hidden // heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    is_qwen = arch == "Qwen2ForCausalLM"
    attention_bias = True if is_qwen else bool(raw.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        # Llama's attention_bias also covers o_proj; Qwen2 has q/k/v biases only.
        o_proj_bias=attention_bias and arch == "LlamaForCausalLM",
        mlp_bias=bool(raw.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        pad_token_id=raw.get("pad_token_id"),
        extra={k: v for k, v in raw.items() if k == "torch_dtype" or k == "dtype"},
    )
