"""Saving and loading adapters in the Hugging Face PEFT folder layout.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`.
Methods HF PEFT has are written exactly as PEFT writes them, so
`peft.PeftModel.from_pretrained(transformers_model, folder)` loads them, and
adapters PEFT saved load here. Saved keys carry no adapter name.

| method | peft_type | saved tensors (`P.` = `base_model.model.model.`, `i` = layer) |
|---|---|---|
| LoRA / rsLoRA | LORA | `P.layers.i.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r) |
| DoRA | LORA, use_dora | as LoRA plus `P.layers.i.<module>.lora_magnitude_vector` (out,) |
| LoKr | LOKR | `P.layers.i.<module>.lokr_w1` (a, c) or `...lokr_w1_{a,b}` (a, r), (r, c); `...lokr_w2` (b, d) or `...lokr_w2_{a,b}` (b, r), (r, d); out = a b, in = c d |
| (IA)^3 | IA3 | `P.layers.i.<module>.ia3_l`: (out, 1), feed-forward modules (1, in) |
| prefix tuning | PREFIX_TUNING | `prompt_embeddings` (P, L * 2 * kv_dim): token p, then layer l's key at slot 2l and value at 2l + 1, each (kv_heads, head_dim) |
| prompt tuning | PROMPT_TUNING | `prompt_embeddings` (P, hidden) |
| LayerNorm tuning | LN_TUNING | `P.layers.i.<norm>.ln_tuning_layers.weight`, `P.norm.ln_tuning_layers.weight` (hidden,) |
| serial adapter | EDGETUNE_SERIAL_ADAPTER | `P.layers.i.{attn,mlp}_adapter.{down,up}.{weight,bias}` |
| parallel adapter | EDGETUNE_PARALLEL_ADAPTER | `P.layers.i.parallel_adapter.{down,up}.{weight,bias}` |
| BitFit | EDGETUNE_BITFIT | `P.layers.i.<module>.bitfit_bias` (out,): added to the base bias (or stands in for it) |
| SHiRA | SHIRA | `P.layers.i.<module>.shira_weight` (k,), `...shira_indices` int32 (2, k): rows, then columns of W; k = r (in + out) |
| sparse fine-tuning | EDGETUNE_SPARSE | `P.layers.i.<module>.sparse_values` (k,), `...sparse_indices` int64 (k,): flat row-major positions in W, ascending; k = round(density in out) |
| AdaLoRA | ADALORA | `P.layers.i.<module>.lora_A` (k, in), `...lora_E` (k, 1), `...lora_B` (out, k): the k triplets the config's `rank_pattern` keeps of init_r (all, where it is null); loaded back into init_r triplets, zeros where dropped |
| VeRA | VERA | `P.layers.i.<module>.vera_lambda_b` (out,), `...vera_lambda_d` (r,); `base_model.vera_A` (r, max_in), `base_model.vera_B` (max_out, r): the shared projections (PEFT's save_projection) |
| UniPELT | EDGETUNE_UNIPELT | `P.layers.i.` + its block tensors' names (unipelt.py): LoRA, `prefix_key`/`prefix_value`, `mlp_adapter.*`, `gate_{lora,prefix,adapter}.*` |
| several methods | EDGETUNE_STACK | method k's keys above, prefixed `m{k}.`; the config's `methods` lists each method's config |

The EDGETUNE_* configs hold the method's own fields (edgetune's dataclass
field names) next to PEFT's common ones; PEFT cannot load them.

Prefix tuning with `prefix_projection` is saved as PEFT saves it: the
projected prefixes, not the MLP. It therefore loads back as a prefix without
projection -- the same model at inference, but the MLP is gone (resume
training from a training checkpoint, not from this folder).

Where PEFT's config cannot say what an edgetune config says (`layers_to_transform`
for (IA)^3 and LN tuning, or with a regex `target_modules`), the targeted
modules are written out as full module names, which PEFT matches exactly.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgetune.runtime.atomic import atomic_write
from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.model.transformer import LINEAR_NAMES, NORM_NAMES
from edgetune.runtime.peft.adalora import (
    AdaLoraConfig,
    adalora_from_hf,
    adalora_to_hf,
    expand_from_rank_pattern,
    shrink_to_rank_pattern,
)
from edgetune.runtime.peft.adapter import Adapter, attach_adapter
from edgetune.runtime.peft.base import Method, Tensors, matches_target
from edgetune.runtime.peft.bitfit import BitFitConfig
from edgetune.runtime.peft.bottleneck import ParallelAdapterConfig, SerialAdapterConfig
from edgetune.runtime.peft.ia3 import IA3Config
from edgetune.runtime.peft.ln_tuning import LNTuningConfig
from edgetune.runtime.peft.lokr import LOKR_TENSORS, LoKrConfig, lokr_from_hf, lokr_to_hf
from edgetune.runtime.peft.lora import LoraConfig
from edgetune.runtime.peft.prefix import PrefixTuningConfig
from edgetune.runtime.peft.prompt import PromptTuningConfig
from edgetune.runtime.peft.sparse import (
    ShiraConfig,
    SparseConfig,
    shira_from_hf,
    shira_tensors_to_hf,
    shira_to_hf,
    sparse_tensors_from_hf,
)
from edgetune.runtime.peft.unipelt import UniPeltConfig
from edgetune.runtime.peft.vera import SAVED_PROJECTION, VeraConfig, vera_from_hf, vera_to_hf

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import CausalLM

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STACK = "EDGETUNE_STACK"
KEY_PREFIX = "base_model.model.model."

PEFT_TYPES = ("LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LN_TUNING", "LOKR", "VERA", "SHIRA", "ADALORA")
EDGETUNE_TYPES: dict[str, type[Method]] = {
    cls.peft_type: cls for cls in (SerialAdapterConfig, ParallelAdapterConfig, BitFitConfig, SparseConfig, UniPeltConfig)
}
SUPPORTED_TYPES = (*PEFT_TYPES, *EDGETUNE_TYPES, STACK)

# (edgetune tensor-name suffix, saved-key suffix) per method, for block and edge tensors
_SUFFIXES: dict[type[Method], tuple[tuple[str, str], ...]] = {
    LoraConfig: ((".lora_A", ".lora_A.weight"), (".lora_B", ".lora_B.weight"),
                 (".lora_magnitude_vector", ".lora_magnitude_vector")),
    IA3Config: ((".ia3_l", ".ia3_l"),),
    AdaLoraConfig: tuple((f".{n}", f".{n}") for n in ("lora_A", "lora_E", "lora_B")),  # PEFT saves no ".weight"
    LoKrConfig: tuple((f".{n}", f".{n}") for n in LOKR_TENSORS),  # PEFT saves its parameters' own names
    LNTuningConfig: ((".weight", ".ln_tuning_layers.weight"),),
    BitFitConfig: ((".bias", ".bitfit_bias"),),
    VeraConfig: ((".vera_lambda_b", ".vera_lambda_b"), (".vera_lambda_d", ".vera_lambda_d")),
    SerialAdapterConfig: (("", ""),),
    ParallelAdapterConfig: (("", ""),),
    UniPeltConfig: (("", ""),),  # its block tensors' own names
    ShiraConfig: ((".sparse_values", ".shira_weight"), (".sparse_indices", ".shira_indices")),
    SparseConfig: ((".sparse_values", ".sparse_values"), (".sparse_indices", ".sparse_indices")),
}
# methods whose saved tensors differ from edgetune's beyond their names (SHiRA's (2, k) indices):
# (edgetune's -> saved, applied to the saved keys; loaded 'layers.{i}.{tensor}' -> checked edgetune's)
_TENSOR_FORMS: dict[type[Method], tuple[Callable | None, Callable]] = {
    ShiraConfig: (shira_tensors_to_hf, sparse_tensors_from_hf),
    SparseConfig: (None, sparse_tensors_from_hf),
}
# shared constants (Method.constants) a folder stores too, constant name -> saved key: PEFT saves
# VeRA's projections so that loading never depends on regenerating them
_SAVED_CONSTANTS: dict[type[Method], dict[str, str]] = {VeraConfig: SAVED_PROJECTION}
# methods whose saved tensors depend on their training state: AdaLoRA saves only the ranks its
# allocator kept, listed in the config's rank_pattern. (method, blocks, state) -> (blocks as saved,
# config entries); (method, its config, loaded 'layers.{i}.{tensor}', state, source) -> the adapter's
# shapes, the state set to match
_RANK_PATTERNS: dict[type[Method], tuple[Callable, Callable]] = {
    AdaLoraConfig: (shrink_to_rank_pattern, expand_from_rank_pattern),
}

# config keys that never change the math: metadata and initialisation-only options
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
            "auto_mapping", "peft_version", "edgetune_version"}
_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")
# LoRA initialisations after which the saved A, B are all there is; the others
# (pissa, olora, corda, loftq, lora_ga) also rewrite the base weights.
_PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# =============================================================== configs
def _json_targets(value: str | tuple[str, ...]) -> str | list[str]:
    return value if isinstance(value, str) else list(value)


def _targeted(target_modules, layers, num_layers: int, names: Sequence[str]) -> list[tuple[int, str]]:
    """(layer, module) pairs a target spec and a layer filter select, in model order."""
    return [(l, n) for l in range(num_layers) if layers is None or l in layers
            for n in names if matches_target(target_modules, l, n)]


def _full(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def _common(peft_type: str, base: str | None) -> dict[str, Any]:
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "revision": None, "inference_mode": True}


def _need(model_config: ModelConfig | None, method: Method) -> ModelConfig:
    if model_config is None:
        raise AdapterError(f"saving {type(method).__name__} needs the base model's config: pass model_config=")
    return model_config


def _lora_hf(m: LoraConfig, mc: ModelConfig | None) -> dict[str, Any]:
    targets, layers = _json_targets(m.target_modules), m.layers_to_transform
    if layers is not None and isinstance(m.target_modules, str):
        # PEFT refuses a string target together with layers_to_transform: name the modules instead.
        mc = _need(mc, m)
        targets, layers = [_full(l, n) for l, n in _targeted(m.target_modules, layers, mc.num_layers, LINEAR_NAMES)], None
    return {"r": m.r, "lora_alpha": _number(m.alpha), "lora_dropout": m.dropout, "target_modules": targets,
            "layers_to_transform": None if layers is None else list(layers), "layers_pattern": None,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": m.use_rslora, "use_dora": m.use_dora,
            "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def _ia3_hf(m: IA3Config, mc: ModelConfig | None) -> dict[str, Any]:
    targets, ff = _json_targets(m.target_modules), _json_targets(m.feedforward_modules)
    if m.layers_to_transform is not None:  # PEFT's IA3Config has no layers_to_transform
        pairs = _targeted(m.target_modules, m.layers_to_transform, _need(mc, m).num_layers, LINEAR_NAMES)
        targets = [_full(l, n) for l, n in pairs]
        ff = [_full(l, n) for l, n in pairs if m.is_feedforward(l, n)]
    return {"target_modules": targets, "feedforward_modules": ff, "fan_in_fan_out": False,
            "init_ia3_weights": True, "modules_to_save": None}


def _ln_hf(m: LNTuningConfig, mc: ModelConfig | None) -> dict[str, Any]:
    targets = _json_targets(m.target_modules)
    if m.layers_to_transform is not None:  # PEFT's LNTuningConfig has no layers_to_transform
        pairs = _targeted(m.target_modules, m.layers_to_transform, _need(mc, m).num_layers, NORM_NAMES)
        targets = [_full(l, n) for l, n in pairs] + (["model.norm"] if m.targets_final_norm() else [])
    return {"target_modules": targets, "exclude_modules": None, "modules_to_save": None}


def _prefix_hf(m: PrefixTuningConfig, mc: ModelConfig | None) -> dict[str, Any]:
    mc = _need(mc, m)
    # PEFT sizes prefixes by the KV heads on GQA models, as edgetune does
    return {"num_virtual_tokens": m.num_virtual_tokens, "token_dim": mc.kv_dim, "num_layers": mc.num_layers,
            "num_attention_heads": mc.num_kv_heads, "num_transformer_submodules": 1,
            "prefix_projection": m.prefix_projection, "encoder_hidden_size": m.encoder_hidden_size or mc.kv_dim,
            "modules_to_save": None}


def _prompt_hf(m: PromptTuningConfig, mc: ModelConfig | None) -> dict[str, Any]:
    mc = _need(mc, m)
    # the trained embeddings are saved, so how they were initialised does not matter: RANDOM
    return {"num_virtual_tokens": m.num_virtual_tokens, "token_dim": mc.hidden_size, "num_layers": mc.num_layers,
            "num_attention_heads": mc.num_heads, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
            "modules_to_save": None}


def _edgetune_hf(m: Method, mc: ModelConfig | None) -> dict[str, Any]:
    from edgetune import __version__

    fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}, "edgetune_version": __version__}


_TO_HF: dict[type[Method], Callable[[Any, ModelConfig | None], dict[str, Any]]] = {
    LoraConfig: _lora_hf, IA3Config: _ia3_hf, LNTuningConfig: _ln_hf, PrefixTuningConfig: _prefix_hf,
    PromptTuningConfig: _prompt_hf, SerialAdapterConfig: _edgetune_hf, ParallelAdapterConfig: _edgetune_hf,
    BitFitConfig: _edgetune_hf,
    ShiraConfig: shira_to_hf, SparseConfig: _edgetune_hf,
    LoKrConfig: lokr_to_hf,
    VeraConfig: vera_to_hf,
    AdaLoraConfig: adalora_to_hf,
    UniPeltConfig: _edgetune_hf,
}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def hf_config_from_method(method: Method, model_config: ModelConfig | None,
                          base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` dict for one method (what PEFT writes for its own types).

    `model_config` (the base model's) is needed for prefix / prompt tuning and
    for configs PEFT can only express by naming modules; otherwise it may be None.
    """
    try:
        to_hf = _TO_HF[type(method)]
    except KeyError:
        raise AdapterError(f"no saved format for {type(method).__name__}") from None
    return {**_common(method.peft_type, base_model_name_or_path), **to_hf(method, model_config)}


def hf_config_from_methods(methods: Sequence[Method], model_config: ModelConfig | None,
                           base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The config of a whole adapter: one method's own config, or an EDGETUNE_STACK of several."""
    if len(methods) == 1:
        return hf_config_from_method(methods[0], model_config, base_model_name_or_path)
    from edgetune import __version__

    return {**_common(STACK, base_model_name_or_path), "edgetune_version": __version__,
            "methods": [hf_config_from_method(m, model_config, base_model_name_or_path) for m in methods]}


# ---------------------------------------------------------------- reading
def _refuse_unknown(cfg: dict[str, Any], handled: set[str], source: str) -> None:
    """Every option edgetune does not implement must be off (None / False / empty)."""
    for key, value in cfg.items():
        if key not in _IGNORED and key not in handled and value:
            raise AdapterError(f"{source}: option {key}={value!r} is not supported by edgetune for "
                               f"peft_type {cfg.get('peft_type')}; only adapters without it can be loaded")


def _targets_from(cfg: dict[str, Any], key: str, source: str) -> str | tuple[str, ...]:
    value = cfg.get(key)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{source}: {key} must be a module-name list or a regex string, got {value!r}")


def _layers_from(cfg: dict[str, Any], source: str) -> tuple[int, ...] | None:
    value = cfg.get("layers_to_transform")
    if value is None or value == []:  # PEFT: an empty list selects every layer
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise AdapterError(f"{source}: layers_to_transform must be an int or a list of ints, got {value!r}")


def _lora_from(cfg: dict[str, Any], source: str) -> LoraConfig:
    _refuse_unknown(cfg, {"r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "layers_pattern",
                          "use_rslora", "use_dora", "bias", "init_lora_weights", "megatron_core", "qalora_group_size",
                          "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying"}, source)
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={cfg['bias']!r} (trained base biases) is not supported; only \"none\"")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_LORA_INITS:
        raise AdapterError(f"{source}: init_lora_weights={init!r} also changes the base weights, which this folder "
                           "does not hold; convert it to a plain LoRA with PEFT first")
    if cfg.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        raise AdapterError(f"{source}: layers_pattern={cfg['layers_pattern']!r} is not supported (only \"layers\")")
    return LoraConfig(r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout") or 0.0,
                      target_modules=_targets_from(cfg, "target_modules", source),
                      layers_to_transform=_layers_from(cfg, source),
                      use_rslora=bool(cfg.get("use_rslora")), use_dora=bool(cfg.get("use_dora")))


def _ia3_from(cfg: dict[str, Any], source: str) -> IA3Config:
    _refuse_unknown(cfg, {"target_modules", "feedforward_modules", "init_ia3_weights"}, source)
    targets = _targets_from(cfg, "target_modules", source)
    if cfg.get("feedforward_modules") is None:
        # PEFT's default for Llama, Mistral and Qwen2 is down_proj (when targeted)
        ff = tuple(t for t in targets if t.endswith("down_proj")) if isinstance(targets, tuple) else ("down_proj",)
    else:
        ff = _targets_from(cfg, "feedforward_modules", source)
    return IA3Config(target_modules=targets, feedforward_modules=ff)


def _ln_from(cfg: dict[str, Any], source: str) -> LNTuningConfig:
    _refuse_unknown(cfg, {"target_modules"}, source)
    return LNTuningConfig(target_modules=_targets_from(cfg, "target_modules", source))


_PROMPT_KEYS = {"num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"}


def _virtual_tokens(cfg: dict[str, Any], source: str) -> int:
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError(f"{source}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                           "(encoder-decoder models) is not supported; edgetune runs decoder-only models")
    value = cfg.get("num_virtual_tokens")
    if not isinstance(value, int) or isinstance(value, bool):
        raise AdapterError(f"{source}: num_virtual_tokens must be an int, got {value!r}")
    return value


def _prefix_from(cfg: dict[str, Any], source: str) -> PrefixTuningConfig:
    # The saved prefixes are already projected: load without the projection MLP.
    _refuse_unknown(cfg, _PROMPT_KEYS | {"prefix_projection", "encoder_hidden_size", "init_weights"}, source)
    return PrefixTuningConfig(num_virtual_tokens=_virtual_tokens(cfg, source))


def _prompt_from(cfg: dict[str, Any], source: str) -> PromptTuningConfig:
    _refuse_unknown(cfg, _PROMPT_KEYS | {"prompt_tuning_init", "prompt_tuning_init_text",
                                         "tokenizer_name_or_path", "tokenizer_kwargs"}, source)
    return PromptTuningConfig(num_virtual_tokens=_virtual_tokens(cfg, source))


def _edgetune_from(cls: type[Method]) -> Callable[[dict[str, Any], str], Method]:
    def parse(cfg: dict[str, Any], source: str) -> Method:
        names = {f.name for f in dataclasses.fields(cls)}
        _refuse_unknown(cfg, names, source)
        return cls(**{k: v for k, v in cfg.items() if k in names})
    return parse


_FROM_HF: dict[str, Callable[[dict[str, Any], str], Method]] = {
    "LORA": _lora_from, "IA3": _ia3_from, "LN_TUNING": _ln_from,
    "PREFIX_TUNING": _prefix_from, "PROMPT_TUNING": _prompt_from,
    "LOKR": lokr_from_hf,
    "VERA": vera_from_hf,
    "ADALORA": adalora_from_hf,
    "SHIRA": shira_from_hf,
    **{t: _edgetune_from(cls) for t, cls in EDGETUNE_TYPES.items()},
}


def _peft_type(cfg: Any, source: str) -> str:
    if not isinstance(cfg, dict):
        raise AdapterError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    if cfg.get("task_type") not in _TASK_TYPES:
        raise AdapterError(f"{source}: task_type {cfg['task_type']!r} is not supported; edgetune loads CAUSAL_LM adapters")
    return peft_type


def method_from_hf_config(cfg: dict[str, Any], source: str = CONFIG_NAME) -> Method:
    """The method config of a one-method `adapter_config.json` dict (PEFT's or edgetune's own type).

    Accepts what PEFT writes: `target_modules` as a list (a saved set) or a
    regex string, `layers_to_transform` as an int or a list. Options edgetune
    does not implement raise AdapterError naming the option; `source` names the file.
    """
    peft_type = _peft_type(cfg, source)
    if peft_type == STACK:
        raise AdapterError(f"{source}: an {STACK} config holds several methods; use methods_from_hf_config")
    try:
        return _FROM_HF[peft_type](cfg, source)
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{source}: invalid {peft_type} config: {e}") from None


def methods_from_hf_config(cfg: dict[str, Any], source: str = CONFIG_NAME) -> list[Method]:
    """The method stack of an `adapter_config.json` dict: one method, or every method of an EDGETUNE_STACK."""
    if _peft_type(cfg, source) != STACK:
        return [method_from_hf_config(cfg, source)]
    _refuse_unknown(cfg, {"methods"}, source)
    subs = cfg.get("methods")
    if not isinstance(subs, list) or not subs:
        raise AdapterError(f"{source}: an {STACK} config needs a non-empty list 'methods'")
    return [method_from_hf_config(sub, f"{source} methods[{k}]") for k, sub in enumerate(subs)]


def _method_configs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return cfg["methods"] if cfg.get("peft_type") == STACK else [cfg]


def _check_fits(cfg: dict[str, Any], mc: ModelConfig, source: str) -> None:
    """Prompt-learning configs state the model's dimensions: they must be this model's."""
    if cfg.get("peft_type") == "PREFIX_TUNING":
        need = {"token_dim": mc.kv_dim, "num_layers": mc.num_layers, "num_attention_heads": mc.num_kv_heads}
    elif cfg.get("peft_type") == "PROMPT_TUNING":
        need = {"token_dim": mc.hidden_size}
    else:
        return
    for key, value in need.items():
        if cfg.get(key) is not None and cfg[key] != value:
            raise AdapterError(f"{source}: {key}={cfg[key]} but this model needs {value}; "
                               "the adapter was trained for another base model")


# =============================================================== tensors
def _suffixes(method: Method) -> tuple[tuple[str, str], ...]:
    return _SUFFIXES[type(method)]


def _saved_name(method: Method, name: str) -> str:
    """edgetune tensor name -> saved suffix, e.g. 'self_attn.q_proj.lora_A' -> 'self_attn.q_proj.lora_A.weight'."""
    for ours, theirs in _suffixes(method):
        if name.endswith(ours):
            return name[: len(name) - len(ours)] + theirs
    raise AdapterError(f"{type(method).__name__}: no saved name for tensor {name!r}")


def _our_name(method: Method, saved: str) -> str | None:
    for ours, theirs in _suffixes(method):
        if saved.endswith(theirs):
            return saved[: len(saved) - len(theirs)] + ours
    return None


def _saved_key(method: Method, name: str) -> str:
    """'layers.{i}.{tensor}' / 'edge.{tensor}' -> the saved key."""
    if isinstance(method, (PrefixTuningConfig, PromptTuningConfig)):
        return "prompt_embeddings"
    where, rest = name.split(".", 1)
    if where == "edge":
        return KEY_PREFIX + _saved_name(method, rest)
    layer, tensor = rest.split(".", 1)
    return f"{KEY_PREFIX}layers.{layer}.{_saved_name(method, tensor)}"


def _prefix_embeddings(method: PrefixTuningConfig, blocks: dict[int, Tensors], edge: Tensors, mc: ModelConfig) -> torch.Tensor:
    """(P, L * 2 * kv_dim): PEFT's prefix layout (what get_prompt_embedding_to_save returns)."""
    if method.prefix_projection and edge:
        prefixes = method.project(edge)  # (P, 2L, KVH, hd)
    else:
        missing = [l for l in range(mc.num_layers) if l not in blocks]
        if missing:
            raise AdapterError(f"prefix tuning: the adapter lacks layers {missing}; save the edge's whole adapter")
        prefixes = torch.stack([blocks[l][kv] for l in range(mc.num_layers)
                                for kv in ("prefix_key", "prefix_value")], dim=1)  # (P, 2L, KVH, hd)
    return prefixes.reshape(prefixes.shape[0], -1)


def _encode(method: Method, blocks: dict[int, Tensors], edge: Tensors, mc: ModelConfig | None) -> dict[str, torch.Tensor]:
    """One method's tensors under their saved keys."""
    if isinstance(method, PrefixTuningConfig):
        return {"prompt_embeddings": _prefix_embeddings(method, blocks, edge, _need(mc, method))}
    if isinstance(method, PromptTuningConfig):
        if "prompt_embeddings" not in edge:
            raise AdapterError("prompt tuning: the adapter has no prompt embeddings; save it from the edge")
        return {"prompt_embeddings": edge["prompt_embeddings"]}
    out = {f"{KEY_PREFIX}{_saved_name(method, name)}": t for name, t in edge.items()}
    for layer in sorted(blocks):
        out.update({f"{KEY_PREFIX}layers.{layer}.{_saved_name(method, n)}": t for n, t in blocks[layer].items()})
    to_saved = _TENSOR_FORMS.get(type(method), (None,))[0]
    return out if to_saved is None else to_saved(method, out, mc)


def _encode_constants(method: Method, constants: Tensors, mc: ModelConfig | None) -> dict[str, torch.Tensor]:
    """The method's stored constants under their saved keys: the adapter's own, so a loaded projection stays."""
    keys = _SAVED_CONSTANTS.get(type(method), {})
    if keys and not constants:
        constants = method.constants(_need(mc, method))
    return {key: constants[name] for name, key in keys.items()}


def _decode_prompt(method: Method, state: dict[str, torch.Tensor], model: CausalLM, source: str) -> dict[str, torch.Tensor]:
    mc, P = model.config, method.num_virtual_tokens
    extra = sorted(set(state) - {"prompt_embeddings"})
    if extra:
        raise AdapterError(f"{source}: unexpected tensors {extra[:5]} for {method.peft_type}")
    if "prompt_embeddings" not in state:
        raise AdapterError(f"{source}: missing tensor 'prompt_embeddings'")
    emb = state["prompt_embeddings"]
    if isinstance(method, PromptTuningConfig):
        _check_shape(emb, (P, mc.hidden_size), "prompt_embeddings", source)
        return {"edge.prompt_embeddings": emb} if model.has_edge else {}
    _check_shape(emb, (P, mc.num_layers * 2 * mc.kv_dim), "prompt_embeddings", source)
    prefixes = emb.reshape(P, 2 * mc.num_layers, mc.num_kv_heads, mc.head_dim)  # key of layer l at 2l, value at 2l + 1
    out = {}
    for l in range(model.start, model.end):
        out[f"layers.{l}.prefix_key"] = prefixes[:, 2 * l]
        out[f"layers.{l}.prefix_value"] = prefixes[:, 2 * l + 1]
    return out


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def _decode(method: Method, state: dict[str, torch.Tensor], model: CausalLM, source: str) -> dict[str, torch.Tensor]:
    """Saved keys -> 'layers.{i}.{tensor}' / 'edge.{tensor}' for the parts of the model present."""
    if isinstance(method, (PrefixTuningConfig, PromptTuningConfig)):
        return _decode_prompt(method, state, model, source)
    out, unexpected = {}, []
    for key, t in state.items():
        rest = key.removeprefix("base_model.model.")
        rest = rest.removeprefix("model.")  # keys of a bare LlamaModel lack it
        m = _LAYER_KEY.fullmatch(rest)
        name = _our_name(method, m.group(2) if m else rest)
        if name is None or (m is None and not isinstance(method, LNTuningConfig)):
            unexpected.append(key)
        elif m is None:
            if model.has_edge:
                out[f"edge.{name}"] = t
        elif int(m.group(1)) >= model.config.num_layers:
            raise AdapterError(f"{source}: tensor {key} is for layer {m.group(1)}, but the model has "
                               f"{model.config.num_layers} layers; the adapter was trained for another base model")
        elif model.start <= int(m.group(1)) < model.end:
            out[f"layers.{m.group(1)}.{name}"] = t
    if unexpected:
        raise AdapterError(f"{source}: tensors edgetune cannot place for {method.peft_type}: {sorted(unexpected)[:5]}")
    forms = _TENSOR_FORMS.get(type(method))
    return out if forms is None else forms[1](method, out, model.config, source)


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], key: str, source: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise AdapterError(f"{source}: tensor {key} has shape {tuple(t.shape)} but this model needs {tuple(shape)}; "
                           "the adapter was trained for another base model")


def _fill(adapter: Adapter, k: int, loaded: dict[str, torch.Tensor], source: str) -> None:
    """Copy method k's loaded tensors into the freshly created adapter, checking names and shapes."""
    method = adapter.methods[k]
    own = {f"edge.{n}": t for n, t in adapter.edge_tensors[k].items()}
    own.update({f"layers.{l}.{n}": t for l, ts in adapter.block_tensors[k].items() for n, t in ts.items()})
    missing = sorted(_saved_key(method, n) for n in set(own) - set(loaded))
    if missing:
        raise AdapterError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"({len(missing)} in all) for {method.peft_type}")
    unexpected = sorted(_saved_key(method, n) for n in set(loaded) - set(own))
    if unexpected:
        raise AdapterError(f"{source}: tensors {unexpected[:5]} are for modules that adapter_config.json does not "
                           "target (check target_modules / layers_to_transform)")
    with torch.no_grad():
        for name, t in own.items():
            _check_shape(loaded[name], tuple(t.shape), _saved_key(method, name), source)
            t.copy_(loaded[name])


def _take_constants(adapter: Adapter, k: int, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Move method k's saved constants from `state` into adapter.constants[k]; return the other tensors.

    A saved constant wins over the one the method config regenerates: what the folder's model
    was trained with is the model (another torch build may have drawn other VeRA projections;
    a node rebuilding other constants then refuses the session by their digest). One the
    folder lacks (PEFT's save_projection=False) stays regenerated, as PEFT does."""
    rest = dict(state)
    own = adapter.constants[k]
    for name, key in _SAVED_CONSTANTS.get(type(adapter.methods[k]), {}).items():
        if key not in rest:
            continue
        t = rest.pop(key)
        if name not in own:
            raise AdapterError(f"{source}: tensor {key} is saved, but adapter_config.json targets no module of this model")
        _check_shape(t, tuple(own[name].shape), key, source)
        own[name] = t.to(device=own[name].device, dtype=own[name].dtype)
    return rest


# =============================================================== files
def _model_config_for(adapter: Adapter, model_config: ModelConfig | None, base: str | None) -> ModelConfig | None:
    if model_config is not None:
        return model_config
    if getattr(adapter, "model_config", None) is not None:
        return adapter.model_config
    if base is not None and (Path(base) / "config.json").is_file():
        return ModelConfig.from_file(Path(base) / "config.json")
    return None


def save_adapter(adapter: Adapter, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                 model_config: ModelConfig | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in HF PEFT's layout; returns the folder.

    Methods PEFT has load with `peft.PeftModel.from_pretrained`; see the module
    docstring for the formats. The weights are written first and the config
    last, each atomically, so a folder with a config is complete.
    `model_config` defaults to the config of the model the adapter was made for.

        >>> save_adapter(adapter, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    mc = _model_config_for(adapter, model_config, base_model_name_or_path)
    config = hf_config_from_methods(adapter.methods, mc, base_model_name_or_path)
    tensors: dict[str, torch.Tensor] = {}
    stacked = len(adapter.methods) > 1
    for k, (method, blocks, edge) in enumerate(zip(adapter.methods, adapter.block_tensors, adapter.edge_tensors)):
        if type(method) in _RANK_PATTERNS:
            blocks, entries = _RANK_PATTERNS[type(method)][0](method, blocks, adapter.state[k])
            _method_configs(config)[k].update(entries)
        saved = {**_encode(method, blocks, edge, mc), **_encode_constants(method, adapter.constants[k], mc)}
        for key, t in saved.items():
            tensors[f"m{k}.{key}" if stacked else key] = t.detach().to("cpu").contiguous()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The parsed `adapter_config.json` of an adapter folder (AdapterError if absent or not JSON)."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found")
    path = folder / CONFIG_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: not found; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        hint = " (only adapter_model.bin is there: edgetune reads safetensors, never pickles)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: not found{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read safetensors ({e})") from None


def _split_stack(state: dict[str, torch.Tensor], n: int, source: str) -> list[dict[str, torch.Tensor]]:
    if n == 1:
        return [state]
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in state.items():
        m = re.fullmatch(r"m(\d+)\.(.+)", key)
        if m is None or int(m.group(1)) >= n:
            raise AdapterError(f"{source}: tensor {key} names no method of the {n}-method stack (keys start m0. .. m{n - 1}.)")
        parts[int(m.group(1))][m.group(2)] = t
    return parts


def load_adapter(model: CausalLM, adapter_dir: str | Path, *, attach: bool = True) -> Adapter:
    """Read an adapter folder (PEFT's or edgetune's layout) for `model`'s blocks and edge.

    Only tensors of blocks [model.start, model.end) (and the edge's, if the
    model has one) are kept. Raises AdapterError naming the file and key when
    the folder is missing or malformed, or does not fit this base model.

        >>> model = load_model("path/to/base"); adapter = load_adapter(model, "out/adapter")
    """
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    source = str(folder / CONFIG_NAME)
    methods = methods_from_hf_config(cfg, source)
    for k, sub in enumerate(_method_configs(cfg)):
        _check_fits(sub, model.config, source if len(methods) == 1 else f"{source} methods[{k}]")
    weights = str(folder / WEIGHTS_NAME)
    parts = _split_stack(_read_tensors(folder), len(methods), weights)
    adapter = Adapter.create(model, methods, seed=0)  # the tensors this model needs, to be overwritten
    for k, (method, state) in enumerate(zip(methods, parts)):
        state = _take_constants(adapter, k, state, weights)
        loaded = _decode(method, state, model, weights)
        if type(method) in _RANK_PATTERNS:
            loaded = _RANK_PATTERNS[type(method)][1](method, _method_configs(cfg)[k], loaded, adapter.state[k], weights)
        _fill(adapter, k, loaded, weights)
    return attach_adapter(model, adapter) if attach else adapter
