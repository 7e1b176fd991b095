"""Tests of LoKr (runtime/peft/lokr.py) against HF PEFT's LoKr on the tiny models.

The tiny models' linears are (32, 32), (16, 32), (64, 32) and (32, 64): split
by `factorize`, their w2 factors are (8, 8) or (4, 8), so r < 4 makes w2 a
rank-r product and r >= 4 keeps it full; with decompose_both, w1 ((4, 4),
(8, 4) or (4, 8)) is a product where r < 2, or r < 4 on the MLP.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import METHODS, LoKrConfig, attach_adapter
from edgetune.runtime.peft.adapter import methods_from_json, methods_to_json
from edgetune.runtime.peft.hf_format import hf_config_from_method, load_adapter, method_from_hf_config
from edgetune.runtime.peft.lokr import factorize
from edgetune.tests.test_hf_format import TOL, _edit_config, _load, edgetune_logits, saved_adapter
from edgetune.tests.tiny import VOCAB, hf_model, max_diff, randomize, randomized_peft, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _peft_config(ours: LoKrConfig):
    """The same LoKr as PEFT's config (field by field; a string target never comes with layers here)."""
    import peft

    targets = ours.target_modules if isinstance(ours.target_modules, str) else list(ours.target_modules)
    layers = None if ours.layers_to_transform is None else list(ours.layers_to_transform)
    return peft.LoKrConfig(r=ours.r, alpha=ours.alpha, target_modules=targets, layers_to_transform=layers,
                           decompose_both=ours.decompose_both, decompose_factor=ours.decompose_factor)


def _counterparts(adapter, pm) -> list[tuple[str, torch.Tensor, torch.nn.Parameter]]:
    """(edgetune name, tensor, PEFT parameter) for every LoKr tensor; PEFT has no others."""
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    out = []
    for name, t in adapter.named_tensors():
        _, _, layer, tensor = name.split(".", 3)  # m0.layers.{i}.{module}.lokr_*
        out.append((name, t, params.pop(f"base_model.model.model.layers.{layer}.{tensor}.default")))
    assert not params, f"PEFT has parameters edgetune lacks: {sorted(params)[:5]}"
    return out


def _lokr_pair(tiny_dir, arch: str, ours: LoKrConfig, seed: int = 1):
    """edgetune model + randomised LoKr adapter, and PEFT's model holding the same tensors."""
    import peft

    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, ours, seed=seed)
    randomize(adapter, seed)
    pm = peft.get_peft_model(hf_model(folder), _peft_config(ours)).eval()
    with torch.no_grad():
        for name, t, p in _counterparts(adapter, pm):
            assert p.shape == t.shape, name
            p.copy_(t)
    return model, adapter, pm


def _suffixes(adapter) -> set[str]:
    return {name.rsplit(".", 1)[1] for name, _ in adapter.named_tensors()}


# ------------------------------------------------------------------ factorisation
def test_factorize_splits_as_peft_does():
    from peft.tuners.lokr.layer import factorization

    for dim in (*range(1, 400), 896, 4096, 11008, 14336):  # and real models' widths
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 100):
            assert factorize(dim, factor) == factorization(dim, factor), (dim, factor)


# ------------------------------------------------------------------ numbers against PEFT
LW1, LW2 = {"lokr_w1_a", "lokr_w1_b"}, {"lokr_w2_a", "lokr_w2_b"}
CASES = {  # name: (arch, config, the tensor kinds it makes)
    "w2_low_rank": ("llama", LoKrConfig(r=2, alpha=4, target_modules="all-linear"), {"lokr_w1"} | LW2),
    "w2_full": ("qwen2", LoKrConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                {"lokr_w1", "lokr_w2"}),
    "both_w1_full_w2_full": ("qwen2", LoKrConfig(r=8, alpha=4, decompose_both=True), {"lokr_w1", "lokr_w2"}),
    "both_w1_mixed": ("llama", LoKrConfig(r=3, alpha=6, target_modules="all-linear", decompose_both=True),
                      {"lokr_w1"} | LW1 | LW2),
    "both_low_rank": ("mistral", LoKrConfig(r=1, alpha=2, target_modules=("q_proj", "gate_proj"), decompose_both=True),
                      LW1 | LW2),
    "factor_layers": ("qwen2", LoKrConfig(r=3, alpha=3, target_modules=("k_proj", "up_proj"), layers_to_transform=(1,),
                                          decompose_factor=2), {"lokr_w1"} | LW2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_grads_match_peft(tiny_dir, case):
    arch, ours, kinds = CASES[case]
    model, adapter, pm = _lokr_pair(tiny_dir, arch, ours)
    assert _suffixes(adapter) == kinds
    ids = token_ids()
    logits = model(ids)
    ref = pm(input_ids=ids).logits
    assert max_diff(logits, ref) <= 1e-5
    targets = torch.randint(0, VOCAB, logits.shape[:2], generator=torch.Generator().manual_seed(5))
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()
    for name, t, p in _counterparts(adapter, pm):
        assert t.grad is not None and p.grad.abs().max() > 0, name
        rel = max_diff(t.grad, p.grad) / p.grad.abs().max().item()
        assert rel <= 1e-5, f"{name}: relative grad error {rel:.2e}"


@pytest.mark.parametrize("case", ["w2_low_rank", "both_w1_mixed"])
def test_initial_tensors_are_distributed_as_peft_makes_them(tiny_dir, case):
    import peft

    arch, ours, _ = CASES[case]
    adapter = attach_adapter(load_model(tiny_dir(arch)), ours, seed=0)
    pm = peft.get_peft_model(hf_model(tiny_dir(arch)), _peft_config(ours))
    for name, t, p in _counterparts(adapter, pm):
        if name.endswith(("lokr_w1", "lokr_w1_a")):  # the zero factor: the update starts at zero
            assert torch.count_nonzero(t) == 0 and torch.count_nonzero(p) == 0, name
            continue
        bound = t.shape[1] ** -0.5  # kaiming-uniform(a=sqrt(5)) over the columns
        assert t.abs().max() <= bound and p.abs().max() <= bound, name
        assert t.abs().max() > 0.5 * bound, name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("ours", [LoKrConfig(r=2, target_modules="all-linear"),
                                  LoKrConfig(r=1, target_modules="all-linear", decompose_both=True)],
                         ids=["w2_low_rank", "both_low_rank"])
def test_identity_at_initialisation(tiny_dir, arch, ours):
    model = load_model(tiny_dir(arch))
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
        adapter = attach_adapter(model, ours, seed=3)
        adapted = model(ids)
    assert adapter.num_parameters() > 0
    assert max_diff(adapted, base) <= 1e-6


# ------------------------------------------------------------------ merging and training
def test_merged_weights_equal_peft_merge(tiny_dir):
    arch, ours, _ = CASES["both_w1_mixed"]
    model, adapter, pm = _lokr_pair(tiny_dir, arch, ours)
    adapter.merge_into(model)
    theirs = pm.merge_and_unload().state_dict()
    for key, w in model.hf_state_dict().items():
        assert max_diff(w, theirs[key]) <= 1e-6, key


def test_training_moves_off_the_base_model(tiny_dir):
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, LoKrConfig(r=2, alpha=8, target_modules="all-linear"), seed=0).train()
    ids = token_ids(batch=2, length=8, seed=1)
    optimizer = torch.optim.AdamW(list(adapter.parameters()), lr=2e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


# ------------------------------------------------------------------ configs
def test_config_validation_reports_every_problem():
    with pytest.raises(ConfigError, match=r"rank r must be positive.*target_modules is empty.*decompose_factor"):
        LoKrConfig(r=0, target_modules=(), decompose_factor=0)
    assert METHODS["lokr"] is LoKrConfig
    m = LoKrConfig(r=3, alpha=1.5, target_modules=["q_proj"], layers_to_transform=[0], decompose_both=True, decompose_factor=4)
    assert m.target_modules == ("q_proj",) and methods_from_json(methods_to_json([m])) == [m]


def test_config_round_trips_through_peft_json(tiny_dir):
    mc = load_model(tiny_dir("llama")).config
    for m in (LoKrConfig(), LoKrConfig(r=3, alpha=5.5, target_modules=("q_proj", "down_proj"), layers_to_transform=(1,)),
              LoKrConfig(target_modules=r".*v_proj", decompose_both=True, decompose_factor=4)):
        cfg = json.loads(json.dumps(hf_config_from_method(m, mc)))
        assert cfg["peft_type"] == "LOKR" and method_from_hf_config(cfg) == m


# ------------------------------------------------------------------ PEFT's folder layout
SAVED = {
    "default_llama": ("llama", LoKrConfig()),
    "w2_full_qwen2": ("qwen2", LoKrConfig(r=4, alpha=2, target_modules=("k_proj", "o_proj", "up_proj"))),
    "both_all_linear_layer": ("mistral", LoKrConfig(r=1, alpha=3, target_modules="all-linear", layers_to_transform=(1,),
                                                    decompose_both=True)),
    "regex_factor": ("llama", LoKrConfig(r=2, alpha=4, target_modules=r".*\.mlp\.(gate|down)_proj", decompose_factor=4)),
}


@pytest.mark.parametrize("case", list(SAVED))
def test_saved_adapter_loads_in_peft(tiny_dir, tmp_path, case):
    import peft

    arch, method = SAVED[case]
    ours, adapter_dir, adapter = saved_adapter(tiny_dir, tmp_path, arch, method)
    written = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(written) == len(list(adapter.named_tensors()))
    assert all(k.startswith("base_model.model.model.layers.") and ".lokr_w" in k for k in written)
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_dir(arch)), str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    assert max_diff(ours, theirs) <= TOL
    pm.save_pretrained(tmp_path / "resaved")  # PEFT writes back exactly the keys and values edgetune wrote
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(written) == set(resaved)
    for key in written:
        assert torch.equal(written[key], resaved[key]), key
    assert max_diff(edgetune_logits(tiny_dir(arch), adapter_dir), ours) <= TOL


def _peft_saved():
    import peft

    return {
        "qv": ("llama", peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
        "w2_full_layer_int": ("qwen2", peft.LoKrConfig(r=4, alpha=8, target_modules=["k_proj", "down_proj"],
                                                       layers_to_transform=1)),
        # PEFT ignores layers_to_transform beside "all-linear": it adapts both layers
        "all_linear_layers_ignored": ("llama", peft.LoKrConfig(r=1, alpha=2, target_modules="all-linear",
                                                               layers_to_transform=[1], decompose_both=True)),
        "lycoris_init_factor": ("mistral", peft.LoKrConfig(r=3, alpha=3, target_modules=r".*(o_proj|up_proj)",
                                                           decompose_factor=4, init_weights="lycoris")),
    }


@pytest.mark.parametrize("case", ["qv", "w2_full_layer_int", "all_linear_layers_ignored", "lycoris_init_factor"])
def test_peft_adapter_loads_in_edgetune(tiny_dir, tmp_path, case):
    arch, config = _peft_saved()[case]
    pm = randomized_peft(tiny_dir(arch), config)
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    pm.save_pretrained(tmp_path / "peft")
    assert max_diff(edgetune_logits(tiny_dir(arch), tmp_path / "peft"), theirs) <= TOL
    loaded = load_adapter(load_model(tiny_dir(arch)), tmp_path / "peft", attach=False)
    assert len(list(loaded.named_tensors())) == len(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


@pytest.mark.parametrize("changes, message", [
    (dict(rank_dropout=0.1), "rank_dropout=0.1"),
    (dict(module_dropout=0.2), "module_dropout=0.2"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(alpha_pattern={"v_proj": 16}), "alpha_pattern"),
    (dict(exclude_modules=["q_proj"]), "exclude_modules"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(layers_pattern="blocks"), "layers_pattern='blocks'"),
    (dict(decompose_factor="4"), "decompose_factor must be an int"),
    (dict(decompose_factor=0), "decompose_factor must be -1 or positive"),
    (dict(r=0), "rank r must be positive"),
])
def test_unsupported_options_are_refused(tiny_dir, tmp_path, changes, message):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", LoKrConfig(r=2))
    _edit_config(adapter_dir, **changes)
    with pytest.raises(AdapterError, match=message):
        _load(tiny_dir, adapter_dir)


def test_harmless_peft_options_are_accepted(tiny_dir, tmp_path):
    _, adapter_dir, _ = saved_adapter(tiny_dir, tmp_path, "llama", LoKrConfig(r=2))
    _edit_config(adapter_dir, init_weights=False, use_effective_conv2d=True, rank_dropout_scale=True,
                 peft_version="0.21.2", auto_mapping={"base_model_class": "LlamaForCausalLM"}, layers_pattern="layers")
    _load(tiny_dir, adapter_dir)
