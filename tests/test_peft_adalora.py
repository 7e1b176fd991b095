"""Tests of AdaLoRA (runtime/peft/adalora.py) against HF PEFT's AdaLoRA on tiny models.

The same A / E / B (E randomised off its zero start) are copied into a PEFT AdaLoraModel by
parameter name; logits, gradients, the orthogonality term, every step of the rank allocator
(fed identical synthetic gradients), and saving / loading in both directions are compared.
"""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import AdaLoraConfig, attach_adapter
from edgetune.runtime.peft.adapter import methods_from_json, methods_to_json
from edgetune.runtime.peft.hf_format import hf_config_from_method, load_adapter, method_from_hf_config, save_adapter
from edgetune.tests.tiny import hf_model, max_diff, randomize, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers / peft are local references, never downloads
# the references' chatter; PEFT also warns that its own AdaLoRA rank_pattern keys match no module
# (its LoRA-level check) while it resizes by them all the same
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:The following rank_pattern keys:RuntimeWarning")


def peft_config(m: AdaLoraConfig):
    """PEFT's AdaLoraConfig with the same fields."""
    import peft

    return peft.AdaLoraConfig(
        init_r=m.init_r, target_r=m.target_r, lora_alpha=m.alpha, lora_dropout=m.dropout,
        target_modules=list(m.target_modules), layers_to_transform=None if m.layers_to_transform is None else list(m.layers_to_transform),
        tinit=m.tinit, tfinal=m.tfinal, deltaT=m.deltaT, beta1=m.beta1, beta2=m.beta2,
        orth_reg_weight=m.orth_reg_weight, total_step=m.total_step, task_type="CAUSAL_LM")


def peft_name(name: str, prefix: str = "base_model.model.") -> str:
    """'m0.layers.1.self_attn.q_proj.lora_E' -> PEFT's parameter name (the RankAllocator's: prefix '')."""
    _, _, layer, rest = name.split(".", 3)
    return f"{prefix}model.layers.{layer}.{rest}.default"


def pair(tiny_dir, arch: str, method: AdaLoraConfig, seed: int = 1):
    """edgetune model + randomised adapter, and a PEFT model holding the same tensors."""
    import peft

    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, method, seed=seed)
    randomize(adapter, seed)  # E too: from its zero start every A and B gradient would vanish
    pm = peft.get_peft_model(hf_model(folder), peft_config(method))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, t in adapter.named_tensors():
            params[peft_name(name)].copy_(t)
    return model, adapter, pm


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: next-token cross entropy, mean over positions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def assert_grads_match(adapter, pm) -> None:
    params = dict(pm.named_parameters())
    for name, t in adapter.named_tensors():
        g_ref = params[peft_name(name)].grad
        assert t.grad is not None and g_ref.abs().max() > 0, name
        rel = max_diff(t.grad, g_ref) / g_ref.abs().max().item()
        assert rel <= 1e-5, f"{name}: relative grad error {rel:.2e}"


CASES = {
    "llama_qv": ("llama", AdaLoraConfig(init_r=4, target_r=2, alpha=8, total_step=10)),
    "qwen2_all_linear": ("qwen2", AdaLoraConfig(init_r=3, target_r=2, alpha=6, total_step=10,
                                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"))),
    "mistral_layers": ("mistral", AdaLoraConfig(init_r=4, target_r=1, alpha=16, total_step=10,
                                                target_modules=("k_proj", "down_proj"), layers_to_transform=(1,))),
}


# =================================================================== forward / backward
def test_starts_at_the_base_model_with_peft_init(tiny_dir):
    model = load_model(tiny_dir("llama"))
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
        adapter = attach_adapter(model, AdaLoraConfig(init_r=64, target_modules=("q_proj", "v_proj", "up_proj"), total_step=5))
        assert max_diff(model(ids), base) == 0
    for name, t in adapter.named_tensors():
        if name.endswith("lora_E"):
            assert t.shape == (64, 1) and torch.count_nonzero(t) == 0
        else:  # N(0, 0.02^2), as PEFT's reset_lora_parameters
            assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002, name
    assert adapter.block_tensors[0][0]["self_attn.q_proj.lora_A"].shape == (64, 32)
    assert adapter.block_tensors[0][0]["self_attn.v_proj.lora_B"].shape == (16, 64)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_grads_match_peft(tiny_dir, case):
    arch, method = CASES[case]
    model, adapter, pm = pair(tiny_dir, arch, method)
    ids = token_ids()
    logits, ref = model(ids), pm(input_ids=ids).logits
    assert max_diff(logits, ref) <= 1e-5 * ref.abs().max().item()
    lm_loss(logits, ids).backward()
    lm_loss(ref, ids).backward()
    assert_grads_match(adapter, pm)


@pytest.mark.parametrize("case", ["llama_qv", "qwen2_all_linear"])
def test_regularizer_is_peft_orthogonality_term(tiny_dir, case):
    arch, method = CASES[case]
    model, adapter, pm = pair(tiny_dir, arch, method)
    ids = token_ids()
    pm.peft_config["default"].orth_reg_weight = 0.0  # PEFT's loss without its orthogonality term
    with torch.no_grad():
        without = pm(input_ids=ids, labels=ids).loss
    pm.peft_config["default"].orth_reg_weight = method.orth_reg_weight
    loss = pm(input_ids=ids, labels=ids).loss  # + orth_reg_weight * mean ||P P^T - I||_F
    reg = adapter.regularizer()
    assert (loss - without).item() > 0.1
    assert abs(reg.item() - (loss - without).item()) <= 1e-5 * reg.item()
    loss.backward()
    (lm_loss(model(ids), ids) + reg).backward()  # the loop adds it to the step's loss this way
    assert_grads_match(adapter, pm)


def test_no_regularizer_at_weight_zero(tiny_dir):
    adapter = attach_adapter(load_model(tiny_dir("llama")), AdaLoraConfig(orth_reg_weight=0.0))
    assert adapter.regularizer() is None


# =================================================================== rank allocation
ALLOC = AdaLoraConfig(init_r=4, target_r=2, alpha=8, tinit=1, tfinal=2, deltaT=2, total_step=9,
                      target_modules=("q_proj", "v_proj", "down_proj"))


def synthetic_step(adapter, pm, step: int) -> None:
    """The same gradients on both sides, then the same plain SGD step (it revives masked E entries)."""
    gen = torch.Generator().manual_seed(100 + step)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, t in adapter.named_tensors():
            g = torch.randn(t.shape, generator=gen)
            p = params[peft_name(name)]
            t.grad, p.grad = g.clone(), g.clone()
            t.sub_(0.05 * g)
            p.sub_(0.05 * g)


def peft_masks(pm) -> dict[str, list[bool]]:
    pattern = pm.peft_config["default"].rank_pattern or {}
    return {k.replace(".default", ""): list(v) for k, v in pattern.items()}


def our_masks(adapter) -> dict[str, list[bool]]:
    state = adapter.state[0]
    return {f"model.layers.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}.lora_E": state[k].tolist()
            for k in state if k.startswith("rank_mask.")}


def test_allocator_matches_peft_step_by_step(tiny_dir):
    model, adapter, pm = pair(tiny_dir, "llama", ALLOC)
    allocator = pm.base_model.rankallocator
    final = ALLOC.total_step - ALLOC.tfinal
    seen_masked = False
    for step in range(ALLOC.total_step):
        synthetic_step(adapter, pm, step)
        pm.base_model.update_and_allocate(step)
        metrics = adapter.after_optimizer_step(step)
        assert metrics["adalora_budget"] == allocator.budget_schedule(step)[0], step
        state = adapter.state[0]
        for name, _ in adapter.named_tensors():
            ours = name.split(".", 2)[2]  # 'm0.layers.0.self_attn.q_proj.lora_A' -> '0.self_attn.q_proj.lora_A'
            for kind, theirs in (("exp_avg_ipt", allocator.exp_avg_ipt), ("exp_avg_unc", allocator.exp_avg_unc)):
                if step >= final:  # PEFT resets its averages at the final allocation
                    assert not theirs and torch.count_nonzero(state[f"{kind}.{ours}"]) == 0
                else:
                    assert torch.equal(state[f"{kind}.{ours}"], theirs[peft_name(name, prefix='')]), (step, name, kind)
        theirs = peft_masks(pm)
        if theirs:  # PEFT has allocated at least once
            assert our_masks(adapter) == theirs, step
            seen_masked = True
        else:
            assert all(all(v) for v in our_masks(adapter).values()), step
        assert metrics["adalora_rank"] == sum(sum(v) for v in our_masks(adapter).values())
        params = dict(pm.named_parameters())
        for name, t in adapter.named_tensors():
            assert torch.equal(t, params[peft_name(name)]), (step, name)
    assert seen_masked
    # the final mask holds: every targeted module keeps target_r ranks on average
    assert sum(sum(v) for v in our_masks(adapter).values()) == ALLOC.target_r * 2 * 3
    for name, t in adapter.named_tensors():
        if name.endswith("lora_E"):
            mask = adapter.state[0]["rank_mask." + name.split(".", 2)[2].removesuffix(".lora_E")]
            assert torch.count_nonzero(t[~mask]) == 0, name


def test_budget_schedule_phases():
    m = AdaLoraConfig(init_r=12, target_r=8, tinit=10, tfinal=20, deltaT=5, total_step=100)
    assert m.budget(0, 120, 80) == (120, False)
    assert m.budget(10, 120, 80) == (120, False)  # warmup holds the initial budget
    assert m.budget(15, 120, 80) == (int(40 * (1 - 5 / 70) ** 3 + 80), True)
    assert m.budget(16, 120, 80)[1] is False  # only every deltaT steps
    assert m.budget(80, 120, 80) == (80, True)
    assert m.budget(81, 120, 80) == (80, True)


def test_training_needs_total_step(tiny_dir):
    adapter = attach_adapter(load_model(tiny_dir("llama")), AdaLoraConfig())
    with pytest.raises(ConfigError, match="total_step"):
        adapter.after_optimizer_step(0)


def test_no_masking_when_target_r_is_init_r(tiny_dir):
    method = AdaLoraConfig(init_r=3, target_r=3, total_step=4)
    model, adapter, pm = pair(tiny_dir, "llama", method)
    for step in range(method.total_step):
        synthetic_step(adapter, pm, step)
        assert adapter.after_optimizer_step(step) == {"adalora_budget": 12, "adalora_rank": 12}
    assert all(torch.count_nonzero(t) == t.numel() for n, t in adapter.named_tensors() if n.endswith("lora_E"))


def test_checkpointed_state_resumes_identically(tiny_dir):
    method = AdaLoraConfig(init_r=4, target_r=2, total_step=6, tfinal=1)
    model, adapter, pm = pair(tiny_dir, "llama", method)
    for step in range(3):
        synthetic_step(adapter, pm, step)
        adapter.after_optimizer_step(step)
    buf = io.BytesIO()
    torch.save({"method_state": adapter.state_tensors(), "tensors": adapter.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as checkpoints.py reads it
    assert any(k.startswith("m0.rank_mask.") for k in saved["method_state"])
    assert not all(v.all() for k, v in saved["method_state"].items() if ".rank_mask." in k)
    resumed = attach_adapter(load_model(tiny_dir("llama")), method)
    resumed.load_state_dict(saved["tensors"])
    resumed.load_state_tensors(saved["method_state"])
    for step in range(3, 6):
        gen = torch.Generator().manual_seed(step)
        for a in (adapter, resumed):
            gen.manual_seed(step)
            for _, t in a.named_tensors():
                t.grad = torch.randn(t.shape, generator=gen)
        assert adapter.after_optimizer_step(step) == resumed.after_optimizer_step(step)
    for (name, a), (_, b) in zip(adapter.state_tensors().items(), resumed.state_tensors().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(adapter.named_tensors(), resumed.named_tensors()):
        assert torch.equal(a, b), name


# =================================================================== saving / loading
def masked_adapter(tiny_dir, method: AdaLoraConfig, steps: int):
    """A randomised adapter after `steps` allocations (some triplets masked), with its PEFT twin."""
    model, adapter, pm = pair(tiny_dir, "llama", method)
    for step in range(steps):
        synthetic_step(adapter, pm, step)
        adapter.after_optimizer_step(step)
    return model, adapter


def test_saved_after_masking_loads_in_peft(tiny_dir, tmp_path):
    import peft

    method = AdaLoraConfig(init_r=4, target_r=1, total_step=4, target_modules=("q_proj", "v_proj", "up_proj"))
    model, adapter = masked_adapter(tiny_dir, method, steps=3)
    masks = our_masks(adapter)
    assert any(not all(v) for v in masks.values())
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids)
    folder = save_adapter(adapter, tmp_path / "a", base_model_name_or_path=str(tiny_dir("llama")))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == masks
    saved = load_file(folder / "adapter_model.safetensors")
    for key, kept in masks.items():
        stem = "base_model.model." + key.removesuffix(".lora_E")
        assert saved[f"{stem}.lora_A"].shape == (sum(kept), 32)
        assert saved[f"{stem}.lora_E"].shape == (sum(kept), 1)
        assert saved[f"{stem}.lora_B"].shape[1] == sum(kept)
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_dir("llama")), str(folder)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
    assert max_diff(ours, theirs) <= 1e-5 * theirs.abs().max().item()
    # back into edgetune: full init_r triplets, zeros where dropped, masks = rank_pattern
    again = load_model(tiny_dir("llama"))
    loaded = load_adapter(again, folder)
    assert our_masks(loaded) == masks
    with torch.no_grad():
        assert max_diff(again(ids), ours) <= 1e-5 * ours.abs().max().item()
    resaved = save_adapter(loaded, tmp_path / "b", base_model_name_or_path=str(tiny_dir("llama")))
    assert json.loads((resaved / "adapter_config.json").read_text()) == config
    twice = load_file(resaved / "adapter_model.safetensors")
    assert set(twice) == set(saved) and all(torch.equal(twice[k], saved[k]) for k in saved)


def test_unmasked_adapter_saves_without_rank_pattern(tiny_dir, tmp_path):
    import peft

    model = load_model(tiny_dir("qwen2"))
    adapter = attach_adapter(model, AdaLoraConfig(init_r=3, target_r=2))  # total_step 0: never trained
    randomize(adapter)
    folder = save_adapter(adapter, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank_pattern"] is None and config["total_step"] == 1
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_dir("qwen2")), str(folder)).eval()
    ids = token_ids()
    with torch.no_grad():
        assert max_diff(model(ids), pm(input_ids=ids).logits) <= 1e-5


def test_peft_trained_adapter_loads_here(tiny_dir, tmp_path):
    """PEFT trains with its own allocator, saves (rank_pattern, shrunk tensors); edgetune loads it."""
    import peft

    folder = tiny_dir("qwen2")
    method = AdaLoraConfig(init_r=4, target_r=2, alpha=8, tinit=1, total_step=5, target_modules=("q_proj", "v_proj", "o_proj"))
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_model(folder), peft_config(method))
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    ids = token_ids(length=9, seed=3)
    for step in range(method.total_step):
        pm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        pm.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pm.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(ranks) < method.init_r * len(ranks)  # PEFT dropped triplets
    ref = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path / "peft")).eval()
    model = load_model(folder)
    adapter = load_adapter(model, tmp_path / "peft")
    assert adapter.methods[0] == AdaLoraConfig(init_r=4, target_r=2, alpha=8, tinit=1, total_step=5,
                                               target_modules=adapter.methods[0].target_modules)
    assert set(adapter.methods[0].target_modules) == {"q_proj", "v_proj", "o_proj"}
    assert our_masks(adapter) == config["rank_pattern"]
    test_ids = token_ids()
    with torch.no_grad():
        theirs = ref(input_ids=test_ids).logits
        assert max_diff(model(test_ids), theirs) <= 1e-5 * theirs.abs().max().item()


def test_rank_pattern_errors(tiny_dir, tmp_path):
    model, adapter = masked_adapter(tiny_dir, AdaLoraConfig(init_r=4, target_r=1, total_step=4), steps=2)
    folder = save_adapter(adapter, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    key = next(k for k, v in pattern.items() if not all(v))
    for bad, match in (({**pattern, key: [True, False]}, "must list init_r=4 bools"),
                       ({**pattern, "layers.0.q.lora_E": [True] * 4}, "rank_pattern key"),
                       ({**pattern, key: [True] * 4}, "but its rank_pattern keeps 4"),
                       ([1, 2], "must be an object")):
        (folder / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": bad}))
        with pytest.raises(AdapterError, match=match):
            load_adapter(load_model(tiny_dir("llama")), folder)


def test_hf_config_round_trip():
    m = AdaLoraConfig(init_r=6, target_r=3, alpha=12, dropout=0.1, target_modules=("q_proj", "down_proj"),
                      layers_to_transform=(1,), tinit=2, tfinal=3, deltaT=4, beta1=0.8, beta2=0.9,
                      orth_reg_weight=0.25, total_step=50)
    cfg = hf_config_from_method(m, None)
    assert cfg["peft_type"] == "ADALORA" and cfg["lora_alpha"] == 12 and cfg["init_r"] == 6
    assert method_from_hf_config(json.loads(json.dumps(cfg))) == m
    with pytest.raises(AdapterError, match="use_dora"):
        method_from_hf_config({**cfg, "use_dora": True})
    with pytest.raises(AdapterError, match="total_step"):
        method_from_hf_config({**cfg, "total_step": 5})


# =================================================================== merging, config, the loop
def test_config_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        AdaLoraConfig(init_r=0, target_r=3, alpha=0, dropout=1.0, target_modules=(), tinit=-1, deltaT=0,
                      beta1=1.0, beta2=0.0, orth_reg_weight=-1)
    text = str(err.value)
    for part in ("init_r must be positive", "target_r must be in [1, init_r=0]", "alpha must be positive",
                 "dropout must be in [0, 1)", "target_modules is empty", "tinit must be >= 0", "deltaT must be positive",
                 "beta1 must be in (0, 1)", "beta2 must be in (0, 1)", "orth_reg_weight must be >= 0"):
        assert part in text, part
    with pytest.raises(ConfigError, match=r"total_step \(5\) must exceed tinit \+ tfinal \(2 \+ 3\)"):
        AdaLoraConfig(tinit=2, tfinal=3, total_step=5)
    m = AdaLoraConfig(target_modules=["q_proj"], layers_to_transform=[0], total_step=3)
    assert m.target_modules == ("q_proj",) and m.layers_to_transform == (0,)
    assert methods_from_json(methods_to_json([m])) == [m]  # what a node rebuilds


def test_train_step_runs_the_allocator(tiny_dir):
    """edgetune's local loop: the orthogonality term joins the loss, the allocator runs after each step."""
    from edgetune.runtime.train.data import IGNORE_INDEX, BatchStream, Example
    from edgetune.runtime.train.loop import LocalEngine, TrainConfig, TrainState, lr_lambda, train_step

    method = AdaLoraConfig(init_r=4, target_r=2, alpha=8, tfinal=1, total_step=5)
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, method).train()
    cfg = TrainConfig(data="unused.jsonl", method="adalora", steps=method.total_step, batch_size=2, micro_batches=1, lr=2e-2,
                      progress=False, rank=2, init_rank=4, tfinal=1, alpha=8)
    assert cfg.methods() == [method]
    ids = token_ids(batch=4, length=8, seed=2).tolist()
    stream = BatchStream([Example(row, [IGNORE_INDEX] + row[1:]) for row in ids], cfg.batch_size, 0, pad_id=0)
    params = list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
    engine, state = LocalEngine(model, "eager"), TrainState()
    records = [train_step(engine, params, optimizer, scheduler, stream, cfg, state, "cpu") for _ in range(cfg.steps)]
    assert all(r["regularizer"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert [r["adalora_budget"] for r in records][0] == 16 and records[-1]["adalora_budget"] == 8
    assert records[0]["adalora_rank"] == 16 and records[-1]["adalora_rank"] <= 8
    for layer, ts in adapter.block_tensors[0].items():
        for module in ("self_attn.q_proj", "self_attn.v_proj"):
            mask = adapter.state[0][f"rank_mask.{layer}.{module}"]
            assert torch.count_nonzero(ts[f"{module}.lora_E"][~mask]) == 0
