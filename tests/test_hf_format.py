"""Tests of edgetune.runtime.peft.hf_format: adapters in the HF PEFT folder layout.

(a) an adapter edgetune saves loads with `peft.PeftModel.from_pretrained` and
gives edgetune's logits, and PEFT re-saves exactly the keys and tensors
edgetune wrote; (b) an adapter PEFT creates and saves loads into edgetune with
PEFT's logits; (c) edgetune-only types and stacks round-trip; (d) malformed or
mismatched folders raise AdapterError naming the problem.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edgetune
from edgetune.runtime.errors import AdapterError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import (
    BitFitConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SerialAdapterConfig,
    attach_adapter,
    hf_format,
)
from edgetune.runtime.peft.hf_format import (
    hf_config_from_method,
    load_adapter,
    method_from_hf_config,
    methods_from_hf_config,
    save_adapter,
)
from edgetune.tests.tiny import hf_model, make_tiny_model, max_diff, randomize, randomized_peft, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Unsupported layer type:UserWarning")

TOL = 1e-4


def saved_adapter(tiny_dir, tmp_path: Path, arch: str, methods, seed: int = 1):
    """(edgetune logits, folder): a randomised edgetune adapter saved to tmp_path / 'adapter'."""
    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, methods, seed=seed)
    randomize(adapter, seed)
    with torch.no_grad():
        logits = model(token_ids())
    out = save_adapter(adapter, tmp_path / "adapter", base_model_name_or_path=str(folder))
    return logits, out, adapter


def edgetune_logits(folder: Path, adapter_dir: Path) -> torch.Tensor:
    model = load_model(folder)
    load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(token_ids())


# ================================================== (a) edgetune -> peft
EDGETUNE_TO_PEFT = {
    "lora_llama": ("llama", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))),
    "lora_all_linear_qwen2": ("qwen2", LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "rslora": ("llama", LoraConfig(r=4, alpha=16, target_modules="all-linear", use_rslora=True)),
    "lora_layers_qwen2": ("qwen2", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "down_proj"), layers_to_transform=(1,))),
    "lora_all_linear_layers": ("llama", LoraConfig(r=2, alpha=4, target_modules="all-linear", layers_to_transform=(0,))),
    "lora_regex_layers": ("llama", LoraConfig(r=2, alpha=4, target_modules=r".*\.mlp\..*_proj", layers_to_transform=(1,))),
    "lora_mistral": ("mistral", LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=("o_proj", "up_proj"))),
    "dora": ("llama", LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)),
    "dora_qwen2": ("qwen2", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_dora=True)),
    "ia3": ("llama", IA3Config()),
    "ia3_layers_qwen2": ("qwen2", IA3Config(layers_to_transform=(1,))),
    "prefix": ("llama", PrefixTuningConfig(num_virtual_tokens=3)),
    "prefix_qwen2": ("qwen2", PrefixTuningConfig(num_virtual_tokens=3)),
    "prefix_projection": ("llama", PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=10)),
    "prompt": ("llama", PromptTuningConfig(num_virtual_tokens=4)),
    "prompt_tied": ("llama_tied", PromptTuningConfig(num_virtual_tokens=2)),
    "ln_tuning": ("llama", LNTuningConfig()),
    "ln_tuning_layers_qwen2": ("qwen2", LNTuningConfig(layers_to_transform=(0,))),
}


@pytest.mark.parametrize("case", list(EDGETUNE_TO_PEFT))
def test_edgetune_adapter_loads_in_peft(tiny_dir, tmp_path, case):
    import peft

    arch, method = EDGETUNE_TO_PEFT[case]
    ours, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, arch, method)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == method.peft_type and config["task_type"] == "CAUSAL_LM"
    assert peft.PeftConfig.from_pretrained(str(adapter_dir)).peft_type == method.peft_type
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_dir(arch)), str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    assert max_diff(ours, theirs) <= TOL
    # PEFT writes back exactly the keys (and values) edgetune wrote
    pm.save_pretrained(tmp_path / "resaved")
    written = load_file(adapter_dir / "adapter_model.safetensors")
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(written) == set(resaved)
    for key in written:
        assert max_diff(written[key], resaved[key]) <= 1e-6, key
    # and it loads back into edgetune as the same model
    assert max_diff(edgetune_logits(tiny_dir(arch), adapter_dir), ours) <= TOL


def test_saved_names_and_config_fields(tiny_dir, tmp_path):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", LoraConfig(r=4, alpha=8, use_dora=True))
    keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 2 * 3
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir("llama"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["bias"], cfg["inference_mode"]) == (4, 8, True, "none", True)
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert not list(adapter_dir.glob("*.tmp"))  # the atomic writes left nothing behind


def test_prefix_config_uses_kv_heads(tiny_dir, tmp_path):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", PrefixTuningConfig(num_virtual_tokens=3))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    hf = json.loads((tiny_dir("llama") / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    assert cfg["num_attention_heads"] == hf["num_key_value_heads"]
    assert cfg["token_dim"] == hf["num_key_value_heads"] * head_dim
    assert cfg["num_layers"] == hf["num_hidden_layers"] and cfg["num_transformer_submodules"] == 1
    emb = load_file(adapter_dir / "adapter_model.safetensors")["prompt_embeddings"]
    assert emb.shape == (3, hf["num_hidden_layers"] * 2 * cfg["token_dim"])


# ================================================== (b) peft -> edgetune
def _peft_configs():
    import peft

    pt = dict(num_virtual_tokens=4, task_type="CAUSAL_LM")
    return {
        "lora_layers_int": ("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=1)),
        "lora_set": ("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules={"k_proj", "gate_proj"}, task_type="CAUSAL_LM")),
        "lora_all_linear_qwen2": ("qwen2", peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")),
        "lora_regex": ("llama", peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.layers\.0\..*\.(q_proj|up_proj)")),
        "rslora_qwen2": ("qwen2", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], use_rslora=True)),
        "lora_dropout": ("mistral", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["v_proj", "down_proj"])),
        "dora": ("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
        "dora_qwen2": ("qwen2", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], use_dora=True)),
        "ia3": ("llama", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                        task_type="CAUSAL_LM")),
        "ia3_qwen2": ("qwen2", peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
        "prefix": ("llama", peft.PrefixTuningConfig(**pt)),
        "prefix_qwen2": ("qwen2", peft.PrefixTuningConfig(**pt)),
        "prefix_projection": ("llama", peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=12, **pt)),
        "prompt": ("llama", peft.PromptTuningConfig(**pt)),
        "ln_tuning": ("llama", peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"],
                                                   task_type="CAUSAL_LM")),
        "ln_tuning_qwen2": ("qwen2", peft.LNTuningConfig(target_modules=["post_attention_layernorm"])),
    }


PEFT_TO_EDGETUNE = ["lora_layers_int", "lora_set", "lora_all_linear_qwen2", "lora_regex", "rslora_qwen2", "lora_dropout",
                    "dora", "dora_qwen2", "ia3", "ia3_qwen2", "prefix", "prefix_qwen2", "prefix_projection", "prompt",
                    "ln_tuning", "ln_tuning_qwen2"]  # keys of _peft_configs() (built lazily: peft is imported in tests)


@pytest.mark.parametrize("case", PEFT_TO_EDGETUNE)
def test_peft_adapter_loads_in_edgetune(tiny_dir, tmp_path, case):
    arch, config = _peft_configs()[case]
    pm = randomized_peft(tiny_dir(arch), config)
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    pm.save_pretrained(tmp_path / "peft")
    assert max_diff(edgetune_logits(tiny_dir(arch), tmp_path / "peft"), theirs) <= TOL


def test_peft_int_layers_and_expanded_targets_parse():
    lora = method_from_hf_config({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                                  "layers_to_transform": 1})
    assert lora == LoraConfig(r=2, alpha=4, target_modules=("q_proj",), layers_to_transform=(1,))
    regex = method_from_hf_config({"peft_type": "LORA", "target_modules": r".*q_proj", "task_type": None})
    assert regex.target_modules == r".*q_proj"
    ia3 = method_from_hf_config({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": None})
    assert ia3.feedforward_modules == ("down_proj",)  # PEFT's default for these architectures


# ================================================== (c) edgetune round trips
ROUND_TRIPS = {
    "serial": ("llama", [SerialAdapterConfig(bottleneck_size=4, activation="gelu")]),
    "parallel": ("qwen2", [ParallelAdapterConfig(bottleneck_size=4, scaling=2.0, layers_to_transform=(1,))]),
    "bitfit": ("llama", [BitFitConfig(target_modules=("q_proj", "down_proj"))]),
    "bitfit_qwen2": ("qwen2", [BitFitConfig()]),
    "mam": ("llama", [PrefixTuningConfig(num_virtual_tokens=3), ParallelAdapterConfig(bottleneck_size=4)]),
    "lora+ia3": ("qwen2", [LoraConfig(r=2, alpha=4, target_modules="all-linear", use_dora=True), IA3Config()]),
    "prompt+lora+ln": ("llama", [PromptTuningConfig(num_virtual_tokens=2), LoraConfig(r=2, alpha=4), LNTuningConfig()]),
    "prefix_projection+bitfit": ("llama", [PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True), BitFitConfig()]),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_within_edgetune(tiny_dir, tmp_path, case):
    arch, methods = ROUND_TRIPS[case]
    ours, adapter_dir, adapter = saved_adapter(tiny_dir, tmp_path, arch, methods)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == (methods[0].peft_type if len(methods) == 1 else "EDGETUNE_STACK")
    model = load_model(tiny_dir(arch))
    loaded = load_adapter(model, adapter_dir)
    assert model.adapter is loaded
    with torch.no_grad():
        assert max_diff(model(token_ids()), ours) <= 1e-6
    # the same methods come back (a projected prefix as a plain one), every tensor trainable
    expect = [PrefixTuningConfig(num_virtual_tokens=m.num_virtual_tokens) if isinstance(m, PrefixTuningConfig) else m
              for m in methods]
    expect = [PromptTuningConfig(num_virtual_tokens=m.num_virtual_tokens) if isinstance(m, PromptTuningConfig) else m
              for m in expect]
    assert loaded.methods == expect
    assert all(t.requires_grad for t in loaded.parameters())
    if not any(getattr(m, "prefix_projection", False) for m in methods):
        assert loaded.state_dict().keys() == adapter.state_dict().keys()
        for name, t in loaded.state_dict().items():
            assert torch.equal(t, adapter.state_dict()[name]), name


def test_load_into_a_model_part_keeps_its_blocks_only(tiny_dir, tmp_path):
    methods = [LoraConfig(r=2, alpha=4, target_modules="all-linear"), PrefixTuningConfig(num_virtual_tokens=2), LNTuningConfig()]
    _, adapter_dir, full = saved_adapter(tiny_dir, tmp_path, "llama", methods)
    part = load_model(tiny_dir("llama"), start=1, end=2, edge=False)
    loaded = load_adapter(part, adapter_dir, attach=False)
    assert part.adapter is None
    for k in range(len(methods)):
        assert set(loaded.block_tensors[k]) == {1} and loaded.edge_tensors[k] == {}
        for name, t in loaded.block_tensors[k][1].items():
            assert torch.equal(t, full.block_tensors[k][1][name]), name


def test_config_helpers_round_trip(tiny_dir):
    mc = load_model(tiny_dir("llama")).config
    for method in (LoraConfig(r=3, alpha=5.5, dropout=0.05, target_modules=("q_proj",), use_rslora=True),
                   LoraConfig(target_modules=r".*v_proj", use_dora=True), IA3Config(), LNTuningConfig(),
                   SerialAdapterConfig(bottleneck_size=3), ParallelAdapterConfig(activation="silu", scaling=1.5),
                   BitFitConfig(layers_to_transform=(0,)), PrefixTuningConfig(num_virtual_tokens=5),
                   PromptTuningConfig(num_virtual_tokens=5)):
        cfg = json.loads(json.dumps(hf_config_from_method(method, mc)))
        assert method_from_hf_config(cfg) == method
        assert methods_from_hf_config(cfg) == [method]


def test_lazy_top_level_names():
    assert edgetune.load_adapter is load_adapter and edgetune.save_adapter is save_adapter


# ================================================== (d) errors
@pytest.fixture
def lora_dir(tiny_dir, tmp_path) -> Path:
    return saved_adapter(tiny_dir, tmp_path, "llama", LoraConfig(r=2, alpha=4))[1]


def _edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _load(tiny_dir, adapter_dir, arch="llama"):
    return load_adapter(load_model(tiny_dir(arch)), adapter_dir)


def test_missing_folder_and_files(tiny_dir, tmp_path, lora_dir):
    with pytest.raises(AdapterError, match="nowhere.*not found"):
        _load(tiny_dir, tmp_path / "nowhere")
    (lora_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not found"):
        _load(tiny_dir, lora_dir)
    (lora_dir / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="never pickles"):
        _load(tiny_dir, lora_dir)
    (lora_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        _load(tiny_dir, lora_dir)


def test_bad_json(tiny_dir, lora_dir):
    (lora_dir / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(AdapterError, match=r"adapter_config.json: not valid JSON .*line 1"):
        _load(tiny_dir, lora_dir)


def test_corrupt_safetensors(tiny_dir, lora_dir):
    (lora_dir / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(AdapterError, match="cannot read safetensors"):
        _load(tiny_dir, lora_dir)


def test_unknown_peft_type_lists_supported(tiny_dir, lora_dir):
    _edit_config(lora_dir, peft_type="LOHA")
    with pytest.raises(AdapterError, match=r"peft_type 'LOHA' is not supported; supported: LORA, IA3, .*EDGETUNE_STACK"):
        _load(tiny_dir, lora_dir)


@pytest.mark.parametrize("changes, message", [
    (dict(bias="all"), r"bias='all'"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_qalora=True), "use_qalora"),
    (dict(alpha_pattern={"q_proj": 32}), "alpha_pattern"),
    (dict(rank_pattern={"v_proj": 8}), "rank_pattern"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(layers_pattern="blocks"), "layers_pattern"),
    (dict(target_modules=None), "target_modules"),
    (dict(layers_to_transform="1"), "layers_to_transform"),
    (dict(r=0), "rank r must be positive"),
    (dict(task_type="SEQ_CLS"), "task_type 'SEQ_CLS'"),
])
def test_unsupported_lora_options_are_refused(tiny_dir, lora_dir, changes, message):
    _edit_config(lora_dir, **changes)
    with pytest.raises(AdapterError, match=message):
        _load(tiny_dir, lora_dir)


def test_harmless_peft_options_are_accepted(tiny_dir, lora_dir):
    # what PEFT 0.21 writes besides the fields edgetune writes: metadata and init-only options
    _edit_config(lora_dir, peft_version="0.21.2", init_lora_weights="gaussian", qalora_group_size=16,
                 megatron_core="megatron.core", loftq_config={}, exclude_modules=None, auto_mapping=None,
                 layers_pattern=None, lora_bias=False, use_qalora=False, target_parameters=None)
    _load(tiny_dir, lora_dir)


def test_shape_mismatch_names_key_and_shapes(tiny_dir, tmp_path, lora_dir):
    other = tmp_path / "other_base"
    make_tiny_model("llama", other, intermediate_size=48, num_key_value_heads=4)
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.v_proj\.lora_B\.weight has shape \(16, 2\) "
                                           r"but this model needs \(32, 2\)"):
        load_adapter(load_model(other), lora_dir)


def test_prefix_for_another_base_is_refused(tiny_dir, tmp_path):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(AdapterError, match="token_dim=16 but this model needs 32"):
        _load(tiny_dir, adapter_dir, arch="llama_tied")  # 4 KV heads instead of 2
    _edit_config(adapter_dir, token_dim=None, num_attention_heads=None, num_layers=None)
    with pytest.raises(AdapterError, match=r"prompt_embeddings has shape \(3, 64\) but this model needs \(3, 128\)"):
        _load(tiny_dir, adapter_dir, arch="llama_tied")
    _edit_config(adapter_dir, num_transformer_submodules=2)
    with pytest.raises(AdapterError, match="num_transformer_submodules=2"):
        _load(tiny_dir, adapter_dir)


def _edit_tensors(adapter_dir: Path, edit) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_and_unexpected_tensors(tiny_dir, lora_dir):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    _edit_tensors(lora_dir, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=f"missing tensors \\['{key}'\\]"):
        _load(tiny_dir, lora_dir)
    _edit_tensors(lora_dir, lambda t: t.update({key: torch.zeros(2, 32)}))
    _load(tiny_dir, lora_dir)  # complete again

    not_targeted = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    _edit_tensors(lora_dir, lambda t: t.update({not_targeted: torch.zeros(2, 32)}))
    with pytest.raises(AdapterError, match=f"{not_targeted}.*does not target"):
        _load(tiny_dir, lora_dir)
    _edit_tensors(lora_dir, lambda t: t.pop(not_targeted))

    lm_head = "base_model.model.lm_head.lora_A.weight"
    _edit_tensors(lora_dir, lambda t: t.update({lm_head: torch.zeros(2, 32)}))
    with pytest.raises(AdapterError, match=f"cannot place.*{lm_head}"):
        _load(tiny_dir, lora_dir)
    _edit_tensors(lora_dir, lambda t: t.pop(lm_head))

    deep = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"
    _edit_tensors(lora_dir, lambda t: t.update({deep: torch.zeros(2, 32)}))
    with pytest.raises(AdapterError, match="layer 5, but the model has 2 layers"):
        _load(tiny_dir, lora_dir)


def test_stack_errors(tiny_dir, tmp_path):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", [LoraConfig(r=2, alpha=4), IA3Config()])
    assert all(k.startswith(("m0.base_model.", "m1.base_model.")) for k in load_file(adapter_dir / "adapter_model.safetensors"))
    _edit_tensors(adapter_dir, lambda t: t.update({"m2.x": torch.zeros(1)}))
    with pytest.raises(AdapterError, match="m2.x names no method"):
        _load(tiny_dir, adapter_dir)
    _edit_config(adapter_dir, methods=[])
    with pytest.raises(AdapterError, match="non-empty list 'methods'"):
        _load(tiny_dir, adapter_dir)
    _edit_config(adapter_dir, methods=[{"peft_type": "LORA", "target_modules": ["q_proj"], "bias": "lora_only"}])
    with pytest.raises(AdapterError, match=r"methods\[0\].*bias='lora_only'"):
        _load(tiny_dir, adapter_dir)


def test_edgetune_type_with_unknown_option(tiny_dir, tmp_path):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", SerialAdapterConfig(bottleneck_size=4))
    _edit_config(adapter_dir, adapter_dropout=0.1)
    with pytest.raises(AdapterError, match="adapter_dropout=0.1"):
        _load(tiny_dir, adapter_dir)
    _edit_config(adapter_dir, adapter_dropout=None, activation="swish")
    with pytest.raises(AdapterError, match="activation 'swish'"):
        _load(tiny_dir, adapter_dir)


def test_save_needs_the_model_config_for_prompt_methods(tiny_dir, tmp_path):
    adapter = attach_adapter(load_model(tiny_dir("llama")), PromptTuningConfig(num_virtual_tokens=2))
    adapter.model_config = None
    with pytest.raises(AdapterError, match="model_config"):
        save_adapter(adapter, tmp_path / "a")
    # the base folder's config.json serves too
    save_adapter(adapter, tmp_path / "a", base_model_name_or_path=str(tiny_dir("llama")))
    assert hf_format.read_adapter_config(tmp_path / "a")["token_dim"] == 32
