"""Tests of edgetune's PEFT methods on tiny models, against HF PEFT where PEFT has the method.

References are computed here: transformers + peft run the same tiny checkpoints
with the same (randomised) adapter tensors, copied over by PEFT's parameter
names. Merging is checked against the unmerged adapter, unmerging against the
untouched base weights.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from edgetune.runtime.errors import AdapterError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import (
    AdaLoraConfig,
    Adapter,
    BitFitConfig,
    IA3Config,
    LNTuningConfig,
    LoKrConfig,
    LoraConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SerialAdapterConfig,
    ShiraConfig,
    SparseConfig,
    VeraConfig,
    attach_adapter,
)
from edgetune.tests.tiny import VOCAB, hf_model, max_diff, randomize, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers / peft are local references, never downloads
# the references' own deprecation chatter and peft's note that LN tuning wraps RMSNorm
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Unsupported layer type:UserWarning")


# ------------------------------------------- edgetune tensor <-> peft parameter
def _peft_block_param(layer: int, tensor: str, mc) -> tuple[str, Callable]:
    base = f"base_model.model.model.layers.{layer}."
    ident = lambda p: p  # noqa: E731
    if tensor.endswith((".lora_A", ".lora_B", ".lora_magnitude_vector")):
        module, kind = tensor.rsplit(".", 1)
        return f"{base}{module}.{kind}.default.weight", ident
    if tensor.endswith(".ia3_l"):
        return f"{base}{tensor}.default", ident
    if tensor.endswith("layernorm.weight"):
        return f"{base}{tensor.rsplit('.', 1)[0]}.ln_tuning_layers.default.weight", ident
    if tensor in ("prefix_key", "prefix_value"):
        slot = 2 * layer + (tensor == "prefix_value")  # PEFT: (P, 2L, kv_heads, head_dim), key then value per layer
        view = lambda p: p.view(p.shape[0], 2 * mc.num_layers, mc.num_kv_heads, mc.head_dim)[:, slot]  # noqa: E731
        return "prompt_encoder.default.embedding.weight", view
    raise KeyError(tensor)


def _peft_edge_param(tensor: str, mc) -> tuple[str, Callable]:
    if tensor == "prompt_embeddings":
        return "prompt_encoder.default.embedding.weight", lambda p: p
    if tensor == "norm.weight":
        return "base_model.model.model.norm.ln_tuning_layers.default.weight", lambda p: p
    if tensor == "embedding":  # prefix projection input (P, kv_heads, hd); PEFT's is (P, kv_dim)
        return "prompt_encoder.default.embedding.weight", lambda p: p.view(p.shape[0], mc.num_kv_heads, mc.head_dim)
    if tensor.startswith("transform."):
        return f"prompt_encoder.default.{tensor}", lambda p: p
    raise KeyError(tensor)


def peft_counterparts(adapter: Adapter, peft_model, mc) -> list[tuple[str, torch.Tensor, torch.nn.Parameter, Callable]]:
    """(edgetune name, edgetune tensor, peft parameter, view of the parameter shaped like the tensor)."""
    params = dict(peft_model.named_parameters())
    out = []
    for name, t in adapter.named_tensors():
        _, where, rest = name.split(".", 2)
        if where == "edge":
            pname, view = _peft_edge_param(rest, mc)
        else:
            layer, tensor = rest.split(".", 1)
            pname, view = _peft_block_param(int(layer), tensor, mc)
        out.append((name, t, params[pname], view))
    return out


def peft_pair(tiny_dir, arch: str, ours, theirs, seed: int = 1):
    """edgetune model + randomised adapter, and the peft model holding the same tensors."""
    import peft

    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, ours, seed=seed)
    randomize(adapter, seed)
    pm = peft.get_peft_model(hf_model(folder), theirs).eval()
    with torch.no_grad():
        for _, t, p, view in peft_counterparts(adapter, pm, model.config):
            view(p.data).copy_(t)
    return model, adapter, pm


# ------------------------------------------------------------------ cases
def _peft_cases():
    import peft

    kv = dict(num_virtual_tokens=4, task_type="CAUSAL_LM")
    return {
        "lora_qv": ("llama", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        "lora_all_linear_qwen2": ("qwen2", LoraConfig(r=4, alpha=8, target_modules="all-linear"),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
        "rslora": ("llama", LoraConfig(r=4, alpha=16, target_modules="all-linear", use_rslora=True),
                   peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
        "lora_layers": ("mistral", LoraConfig(r=2, alpha=4, target_modules=("k_proj", "down_proj"), layers_to_transform=(1,)),
                        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"], layers_to_transform=[1])),
        "dora": ("llama", LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True),
                 peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
        "dora_qwen2": ("qwen2", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), use_dora=True),
                       peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)),
        "ia3": ("llama", IA3Config(),
                peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
        "ia3_qwen2": ("qwen2", IA3Config(target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), feedforward_modules=("down_proj",)),
                      peft.IA3Config(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])),
        "prefix": ("llama", PrefixTuningConfig(num_virtual_tokens=4), peft.PrefixTuningConfig(**kv)),
        "prefix_qwen2": ("qwen2", PrefixTuningConfig(num_virtual_tokens=4), peft.PrefixTuningConfig(**kv)),
        "prefix_projection": ("llama", PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=12),
                              peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=12, **kv)),
        "prompt": ("llama", PromptTuningConfig(num_virtual_tokens=4), peft.PromptTuningConfig(**kv)),
        "ln_tuning": ("llama", LNTuningConfig(),
                      peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])),
    }


PEFT_CASES = ["lora_qv", "lora_all_linear_qwen2", "rslora", "lora_layers", "dora", "dora_qwen2", "ia3", "ia3_qwen2",
              "prefix", "prefix_qwen2", "prefix_projection", "prompt", "ln_tuning"]

IDENTITY_AT_INIT = {
    "lora": LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "dora": LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True),
    "ia3": IA3Config(),
    "ln_tuning": LNTuningConfig(),
    "serial_adapter": SerialAdapterConfig(bottleneck_size=8),
    "parallel_adapter": ParallelAdapterConfig(bottleneck_size=8),
    "bitfit": BitFitConfig(),
}


# =================================================================== tests
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(IDENTITY_AT_INIT))
def test_identity_at_initialisation(tiny_dir, arch, name):
    model = load_model(tiny_dir(arch))
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
        adapter = attach_adapter(model, IDENTITY_AT_INIT[name], seed=3)
        adapted = model(ids)
    assert adapter.num_parameters() > 0
    assert max_diff(adapted, base) <= 1e-6


@pytest.mark.parametrize("case", PEFT_CASES)
def test_logits_and_grads_match_peft(tiny_dir, case):
    arch, ours, theirs = _peft_cases()[case]
    model, adapter, pm = peft_pair(tiny_dir, arch, ours, theirs)
    ids = token_ids()
    logits = model(ids)
    ref = pm(input_ids=ids).logits
    assert max_diff(logits, ref) <= 1e-5
    targets = torch.randint(0, VOCAB, logits.shape[:2], generator=torch.Generator().manual_seed(5))
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()
    for name, t, p, view in peft_counterparts(adapter, pm, model.config):
        g_ref = view(p.grad)
        assert t.grad is not None and g_ref.abs().max() > 0, name
        rel = max_diff(t.grad, g_ref) / g_ref.abs().max().item()
        assert rel <= 1e-5, f"{name}: relative grad error {rel:.2e}"


MERGEABLE = {
    "lora": [LoraConfig(r=4, alpha=8, target_modules="all-linear")],
    "rslora": [LoraConfig(r=4, alpha=8, target_modules=("q_proj", "o_proj"), use_rslora=True)],
    "dora": [LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)],
    "ia3": [IA3Config()],
    "ln_tuning": [LNTuningConfig()],
    "bitfit": [BitFitConfig()],
    "lora+ia3": [LoraConfig(r=4, alpha=8, target_modules="all-linear"), IA3Config()],
    "ia3+lora": [IA3Config(), LoraConfig(r=4, alpha=8, target_modules="all-linear")],
    "dora+ia3": [LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True), IA3Config()],
    "bitfit+ln+lora": [BitFitConfig(), LNTuningConfig(), LoraConfig(r=2, alpha=4)],
    "lokr_w2_low_rank": [LoKrConfig(r=2, alpha=4, target_modules="all-linear")],
    "lokr_w2_full": [LoKrConfig(r=4, alpha=2, target_modules="all-linear", decompose_both=True)],
    "lokr_both_low_rank+ia3": [LoKrConfig(r=1, alpha=2, target_modules="all-linear", decompose_both=True), IA3Config()],
    "lora+lokr": [LoraConfig(r=2, alpha=4, target_modules="all-linear"), LoKrConfig(r=2, alpha=4, target_modules=("q_proj", "up_proj"))],
    "vera": [VeraConfig(r=8, target_modules="all-linear")],
    "vera+lora": [VeraConfig(r=4, target_modules=("q_proj", "down_proj")), LoraConfig(r=2, alpha=4, target_modules="all-linear")],
    "adalora": [AdaLoraConfig(init_r=4, target_r=2, target_modules=("q_proj", "o_proj", "down_proj"))],
    "shira": [ShiraConfig(r=2, mask="random", target_modules="all-linear")],
    "sparse+lora": [SparseConfig(density=0.1, mask="random"), LoraConfig(r=2, alpha=4)],
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(MERGEABLE))
def test_merge_equals_adapter_and_unmerge_restores_base(tiny_dir, arch, name):
    model = load_model(tiny_dir(arch))
    base = {k: v.detach().clone() for k, v in model.hf_state_dict().items()}
    adapter = attach_adapter(model, MERGEABLE[name], seed=2)
    randomize(adapter, seed=2)
    ids = token_ids()
    with torch.no_grad():
        unmerged = model(ids)
        adapter.merge_into(model)
        merged = model(ids)
        adapter.unmerge_from(model)
        again = model(ids)
    assert max_diff(merged, unmerged) <= 1e-5
    assert max_diff(again, unmerged) <= 1e-5
    with torch.no_grad():
        assert max_diff(merged, load_model(tiny_dir(arch))(ids)) > 1e-3  # the merge did change the model
    restored = model.hf_state_dict()
    assert set(restored) == set(base)  # BitFit's created biases are gone again
    for key, w in base.items():
        assert max_diff(restored[key], w) <= 1e-6, key


@pytest.mark.parametrize("methods", [
    [PrefixTuningConfig(num_virtual_tokens=3)],
    [PromptTuningConfig(num_virtual_tokens=3)],
    [SerialAdapterConfig(bottleneck_size=4)],
    [ParallelAdapterConfig(bottleneck_size=4)],
    [LoraConfig(r=2, alpha=4), ParallelAdapterConfig(bottleneck_size=4)],
], ids=["prefix", "prompt", "serial", "parallel", "lora+parallel"])
def test_merge_refused_for_unmergeable_methods(tiny_dir, methods):
    model = load_model(tiny_dir("llama"))
    base = {k: v.detach().clone() for k, v in model.hf_state_dict().items()}
    adapter = attach_adapter(model, methods, seed=0)
    randomize(adapter)
    with pytest.raises(AdapterError, match=type(methods[-1]).__name__):
        adapter.merge_into(model)
    assert not adapter.merged
    for key, w in model.hf_state_dict().items():
        assert torch.equal(w, base[key]), key


@pytest.mark.parametrize("methods", [
    [PrefixTuningConfig(num_virtual_tokens=3), ParallelAdapterConfig(bottleneck_size=8)],  # MAM adapter
    [LoraConfig(r=4, alpha=8, target_modules="all-linear"), IA3Config()],
], ids=["mam", "lora+ia3"])
def test_stack_runs_and_trains(tiny_dir, methods):
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, methods, seed=0).train()
    ids = token_ids(batch=2, length=8, seed=1)
    optimizer = torch.optim.AdamW(list(adapter.parameters()), lr=2e-2)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        logits = model(ids[:, :-1], dropout_key=(0, step, 0))
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if step == 0:  # every method of the stack gets a gradient
            for k in range(len(methods)):
                grads = [t.grad for n, t in adapter.named_tensors() if n.startswith(f"m{k}.")]
                assert any(g is not None and g.abs().max() > 0 for g in grads), f"method {k} got no gradient"
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    assert not any(p.requires_grad for p in model.parameters())


def _ks_uniform(values: torch.Tensor, bound: float) -> float:
    """Kolmogorov-Smirnov distance of `values` from U(-bound, bound)."""
    x = torch.sort(values.flatten().double() / bound).values
    n = x.numel()
    cdf = ((x + 1) / 2).clamp(0, 1)
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    emp_lo = torch.arange(0, n, dtype=torch.float64) / n
    return max((emp_hi - cdf).abs().max().item(), (cdf - emp_lo).abs().max().item())


def test_lora_init_statistics_match_peft(tiny_dir):
    import peft

    folder = tiny_dir("llama")
    model = load_model(folder)
    adapter = attach_adapter(model, LoraConfig(r=64, alpha=16, target_modules="all-linear"), seed=0)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_model(folder), peft.LoraConfig(r=64, lora_alpha=16, target_modules="all-linear"))
    checked = 0
    for name, t, p, _ in peft_counterparts(adapter, pm, model.config):
        assert t.shape == p.shape, name
        if name.endswith("lora_B"):
            assert torch.count_nonzero(t) == 0 and torch.count_nonzero(p) == 0, name
            continue
        bound = 1 / math.sqrt(t.shape[1])  # A: (r, in)
        n = t.numel()
        for label, values in (("edgetune", t.detach()), ("peft", p.detach())):
            assert values.abs().max() <= bound, (label, name)
            assert _ks_uniform(values, bound) < 1.63 / math.sqrt(n), (label, name)  # KS test at alpha = 0.01
        assert abs(t.std().item() - p.std().item()) < 0.1 * bound / math.sqrt(3), name
        checked += 1
    assert checked == 2 * 7  # every A of every linear in both layers


def _peft_targets(tiny_dir, peft_config) -> set[str]:
    import peft

    pm = peft.get_peft_model(hf_model(tiny_dir("llama")), peft_config)
    return set(pm.base_model.targeted_module_names)


def _our_targets(tiny_dir, method) -> set[str]:
    adapter = attach_adapter(load_model(tiny_dir("llama")), method)
    names = set()
    for name, _ in adapter.named_tensors():
        _, where, rest = name.split(".", 2)
        if where == "edge":
            names.add("model." + rest.rsplit(".", 1)[0])  # the final norm
        else:
            layer, tensor = rest.split(".", 1)
            names.add(f"model.layers.{layer}.{tensor.rsplit('.', 1)[0]}")
    return names


@pytest.mark.parametrize("ours, theirs", [
    (dict(target_modules=("q_proj", "v_proj")), dict(target_modules=["q_proj", "v_proj"])),
    (dict(target_modules=["o_proj", "gate_proj"]), dict(target_modules={"o_proj", "gate_proj"})),
    (dict(target_modules="all-linear"), dict(target_modules="all-linear")),
    (dict(target_modules=r".*\.(k_proj|up_proj)"), dict(target_modules=r".*\.(k_proj|up_proj)")),
    (dict(target_modules=r"model\.layers\.1\.self_attn\..*"), dict(target_modules=r"model\.layers\.1\.self_attn\..*")),
    (dict(target_modules=("q_proj", "down_proj"), layers_to_transform=(1,)),
     dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
    (dict(target_modules=("mlp.up_proj",), layers_to_transform=(0,)), dict(target_modules=["mlp.up_proj"], layers_to_transform=0)),
], ids=["list", "set", "all-linear", "regex", "regex_layer", "layers_list", "layers_int"])
def test_lora_targets_the_modules_peft_targets(tiny_dir, ours, theirs):
    import peft

    expected = _peft_targets(tiny_dir, peft.LoraConfig(r=2, lora_alpha=4, **theirs))
    assert expected  # the case selects something
    assert _our_targets(tiny_dir, LoraConfig(r=2, alpha=4, **ours)) == expected


def test_ia3_and_ln_tuning_target_the_modules_peft_targets(tiny_dir):
    import peft

    assert _our_targets(tiny_dir, IA3Config()) == _peft_targets(
        tiny_dir, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert _our_targets(tiny_dir, LNTuningConfig()) == _peft_targets(
        tiny_dir, peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"]))


@pytest.mark.parametrize("method", [
    LoraConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear"),
    LoraConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear", use_dora=True),
    VeraConfig(r=8, dropout=0.3, target_modules="all-linear"),
], ids=["lora", "dora", "vera"])
def test_dropout_masks_are_reproducible(tiny_dir, method):
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, method)
    randomize(adapter)
    ids = token_ids()
    with torch.no_grad():
        adapter.train()
        first = model(ids, dropout_key=(7, 1, 0))
        same = model(ids, dropout_key=(7, 1, 0))
        other_micro = model(ids, dropout_key=(7, 1, 1))
        other_step = model(ids, dropout_key=(7, 2, 0))
        adapter.eval()
        no_dropout = model(ids)
        eval_with_key = model(ids, dropout_key=(7, 1, 0))
    assert torch.equal(first, same)
    assert max_diff(first, other_micro) > 1e-3
    assert max_diff(first, other_step) > 1e-3
    assert max_diff(first, no_dropout) > 1e-3
    assert torch.equal(eval_with_key, no_dropout)  # dropout is off outside training
