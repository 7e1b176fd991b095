"""Tests of sparse fine-tuning (runtime/peft/sparse.py) and Fisher calibration (runtime/train/calibrate.py).

References: HF PEFT's SHIRA with edgetune's indices given as its mask (ShiraConfig);
transformers with W + a dense delta built from the indices (SparseConfig); per-sequence
`loss.backward()` on the transformers model for the Fisher scores. Saving is checked
both ways with PEFT, and against corrupt index tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.model.transformer import Block
from edgetune.runtime.peft import Adapter, FisherProbeConfig, LoraConfig, ShiraConfig, SparseConfig, attach_adapter
from edgetune.runtime.peft.adapter import methods_from_json, methods_to_json
from edgetune.runtime.peft.hf_format import load_adapter, save_adapter
from edgetune.runtime.peft.sparse import choose_masks, entries, magnitude_scores, random_indices, top_k_indices
from edgetune.runtime.train.calibrate import fisher_scores
from edgetune.runtime.train.data import Batch
from edgetune.tests.tiny import VOCAB, hf_model, max_diff, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# peft warns about a mask_type it does not know (edgetune's masks arrive as a custom mask_fn)
# and that it builds SHiRA's sparse delta without torch's invariant checks
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Argument self.mask_type:UserWarning",
                                        "ignore:Sparse invariant checks:UserWarning")

IDX, VAL = ".sparse_indices", ".sparse_values"


# ------------------------------------------------------------------ helpers
def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return max_diff(a, ref) / ref.abs().max().item()


def sparse_modules(adapter: Adapter, k: int = 0):
    """(layer, module, indices, values) of method k."""
    for layer in sorted(adapter.block_tensors[k]):
        ts = adapter.block_tensors[k][layer]
        for name in sorted(n for n in ts if n.endswith(IDX)):
            module = name.removesuffix(IDX)
            yield layer, module, ts[name], ts[module + VAL]


@torch.no_grad()
def randomize_values(adapter: Adapter, seed: int = 0) -> None:
    """Move the trained values off zero (indices are frozen integers and stay)."""
    gen = torch.Generator().manual_seed(seed)
    for _, t in adapter.named_parameters():
        t.add_(0.3 * torch.randn(t.shape, generator=gen))


def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    targets = torch.randint(0, VOCAB, logits.shape[:2], generator=torch.Generator().manual_seed(5))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def sparse_model(tiny_dir, arch: str, methods, seed: int = 1):
    """edgetune model with `methods` attached (a sparse one first), its masks chosen and values randomised."""
    model = load_model(tiny_dir(arch))
    adapter = attach_adapter(model, methods, seed=seed)
    first = adapter.methods[0]
    scores = None
    if first.mask == "fisher":
        probe = FisherProbeConfig(target_modules=first.target_modules, layers_to_transform=first.layers_to_transform)
        scores = fisher_scores(model, probe, calibration_batches())
    choose_masks(adapter, 0, scores, model=model)
    randomize_values(adapter, seed)
    return model, adapter


# ================================================================= ShiraConfig vs PEFT's SHIRA
SHIRA_CASES = {
    "qv_llama": ("llama", ShiraConfig(r=2, mask="random", seed=3), ["q_proj", "v_proj"]),
    "magnitude_all_linear_mistral": ("mistral", ShiraConfig(r=1, mask="magnitude", target_modules="all-linear"),
                                     "all-linear"),
    "layers_qwen2": ("qwen2", ShiraConfig(r=1, target_modules=("k_proj", "down_proj"), layers_to_transform=(1,)),
                     ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]),
}


def peft_shira(hf, adapter: Adapter, r: int, targets):
    """PEFT's SHIRA on `hf` with edgetune's masks (a custom mask_fn) and values copied in."""
    import peft

    masks = {}
    for layer, module, idx, _ in sparse_modules(adapter):
        linear = hf.get_submodule(f"model.layers.{layer}.{module}")
        mask = torch.zeros(linear.weight.numel(), dtype=linear.weight.dtype)
        mask[idx] = 1
        masks[id(linear)] = mask.view_as(linear.weight)
    config = peft.ShiraConfig(r=r, mask_type="edgetune", target_modules=targets)
    config.mask_fn = lambda base_layer, r, **kwargs: masks[id(base_layer)]
    pm = peft.get_peft_model(hf, config).eval()
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for layer, module, _, values in sparse_modules(adapter):
            params[f"base_model.model.model.layers.{layer}.{module}.shira_weight.default"].copy_(values)
    assert len(masks) == sum(1 for n in params if "shira_weight" in n)  # PEFT targets the same modules
    return pm, params


@pytest.mark.parametrize("case", list(SHIRA_CASES))
def test_shira_logits_and_grads_match_peft(tiny_dir, case):
    arch, method, targets = SHIRA_CASES[case]
    model, adapter = sparse_model(tiny_dir, arch, method)
    pm, params = peft_shira(hf_model(tiny_dir(arch)), adapter, method.r, targets)
    ids = token_ids()
    logits, ref = model(ids), pm(input_ids=ids).logits
    assert rel(logits, ref) <= 1e-5
    cross_entropy(logits).backward()
    cross_entropy(ref).backward()
    for layer, module, _, values in sparse_modules(adapter):
        g_ref = params[f"base_model.model.model.layers.{layer}.{module}.shira_weight.default"].grad
        assert values.grad is not None and g_ref.abs().max() > 0
        assert rel(values.grad, g_ref) <= 1e-5, (layer, module)


# ================================================================= SparseConfig vs a dense delta
def dense_reference(hf, adapter: Adapter, ids: torch.Tensor):
    """transformers logits with W + D for every targeted weight, D (out, in) zero but at the indices."""
    deltas, weights = {}, {}
    for layer, module, idx, values in sparse_modules(adapter):
        key = f"model.layers.{layer}.{module}.weight"
        W = hf.get_parameter(key).detach()
        D = torch.zeros(W.numel())
        D[idx] = values.detach()
        D = D.view_as(W).requires_grad_()
        deltas[(layer, module)], weights[key] = D, W + D
    return torch.func.functional_call(hf, weights, args=(), kwargs={"input_ids": ids}).logits, deltas


@pytest.mark.parametrize("arch, method", [
    ("llama", SparseConfig(density=0.1, mask="random", seed=2)),
    ("qwen2", SparseConfig(density=0.05, mask="magnitude", target_modules="all-linear")),
])
def test_sparse_matches_dense_delta_reference(tiny_dir, arch, method):
    model, adapter = sparse_model(tiny_dir, arch, method)
    ids = token_ids()
    logits = model(ids)
    ref, deltas = dense_reference(hf_model(tiny_dir(arch)), adapter, ids)
    assert rel(logits, ref) <= 1e-5
    cross_entropy(logits).backward()
    cross_entropy(ref).backward()
    for layer, module, idx, values in sparse_modules(adapter):
        g_ref = deltas[(layer, module)].grad.reshape(-1)[idx]  # dL/dv = dL/dD at the indices
        assert rel(values.grad, g_ref) <= 1e-5, (layer, module)


@pytest.mark.parametrize("method", [ShiraConfig(r=2, mask="random"), SparseConfig(density=0.2, mask="random")])
def test_identity_at_init_and_trainable_count(tiny_dir, method):
    model = load_model(tiny_dir("qwen2"))
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
        adapter = attach_adapter(model, method)
        adapted = model(ids)
    assert max_diff(adapted, base) <= 1e-6
    shapes = model.config.linear_shapes()
    expected = sum(entries(method, *shapes[m]) for _, m, _, _ in sparse_modules(adapter))
    assert expected == adapter.num_parameters() > 0
    names = [n for n, _ in adapter.named_parameters()]
    assert names and all(n.endswith(VAL) for n in names)  # the indices never train
    for _, _, idx, values in sparse_modules(adapter):
        assert idx.dtype == torch.int64 and not idx.requires_grad and values.requires_grad
    assert method.is_frozen("self_attn.q_proj" + IDX) and not method.is_frozen("self_attn.q_proj" + VAL)


# ================================================================= masks
def test_top_k_breaks_ties_by_lower_flat_index():
    scores = torch.zeros(3, 4)
    scores[0, 3] = scores[1, 0] = scores[2, 2] = 1.0
    assert top_k_indices(scores, 2).tolist() == [3, 4]
    assert top_k_indices(torch.zeros(3, 4), 3).tolist() == [0, 1, 2]
    assert top_k_indices(scores, 12).tolist() == list(range(12))
    with pytest.raises(ValueError):
        top_k_indices(scores, 13)


def test_entries():
    assert entries(ShiraConfig(r=2), 16, 32) == 2 * (16 + 32)
    assert entries(ShiraConfig(r=32), 16, 32) == 16 * 32  # capped at the whole weight
    assert entries(SparseConfig(density=0.1), 16, 32) == round(0.1 * 16 * 32)
    assert entries(SparseConfig(density=1e-6), 16, 32) == 1
    assert entries(SparseConfig(density=1.0), 16, 32) == 16 * 32


def _assert_mask(idx: torch.Tensor, k: int, n: int) -> None:
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx[0]) and int(idx[-1]) < n  # sorted, unique, in range


def test_random_and_magnitude_masks(tiny_dir):
    gen = lambda: np.random.Generator(np.random.PCG64(4))  # noqa: E731
    idx = random_indices(16, 32, 100, gen())
    _assert_mask(idx, 100, 16 * 32)
    assert torch.equal(idx, random_indices(16, 32, 100, gen()))
    W = torch.randn(16, 32)
    mag = top_k_indices(magnitude_scores(W), 50)
    _assert_mask(mag, 50, 16 * 32)
    assert set(mag.tolist()) == set(torch.topk(W.abs().reshape(-1), 50).indices.tolist())

    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, SparseConfig(density=0.1, mask="magnitude"))
    choose_masks(adapter, 0, model=model)
    for layer, module, idx, values in sparse_modules(adapter):
        W = model.block(layer).linears()[module].weight
        _assert_mask(idx, values.numel(), W.numel())
        assert set(idx.tolist()) == set(torch.topk(W.abs().reshape(-1), values.numel()).indices.tolist())


def test_random_mask_is_reproducible_and_drawn_from_shapes(tiny_dir):
    model = load_model(tiny_dir("llama"))
    method = ShiraConfig(r=2, mask="random", seed=7)

    def masks(m, **kw):
        return {(l, n): idx.clone() for l, n, idx, _ in sparse_modules(Adapter.create(model, [m], **kw))}

    first = masks(method)
    # the adapter's own seed plays no part: the mask is a function of (seed, layer, module)
    assert all(torch.equal(first[k], v) for k, v in masks(method, seed=99).items())

    def meta_blocks():  # what a distributed edge initialises from: shapes, no weights
        for layer in range(model.config.num_layers):
            with torch.device("meta"):
                block = Block(model.config, layer)
            yield block
    assert all(torch.equal(first[k], v) for k, v in masks(method, block_source=meta_blocks).items())
    other = masks(ShiraConfig(r=2, mask="random", seed=8))
    assert not any(torch.equal(first[k], other[k]) for k in first)
    assert not torch.equal(first[(0, "self_attn.q_proj")], first[(1, "self_attn.q_proj")])
    for (_, n), idx in first.items():
        out, inp = model.config.linear_shapes()[n]
        _assert_mask(idx, entries(method, out, inp), out * inp)


def test_choose_masks_refusals(tiny_dir):
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, [SparseConfig(density=0.1, mask="fisher"), LoraConfig(r=2, alpha=4)])
    with pytest.raises(AdapterError, match="needs Fisher scores"):
        choose_masks(adapter, 0)
    with pytest.raises(AdapterError, match="not a sparse method"):
        choose_masks(adapter, 1, model=model)
    with pytest.raises(AdapterError, match="no scores for layer 0"):
        choose_masks(adapter, 0, {})
    scores = {(l, m): magnitude_scores(w) for l in (0, 1) for m, w in
              ((m, model.block(l).linears()[m].weight) for m in ("self_attn.q_proj", "self_attn.v_proj"))}
    scores[(1, "self_attn.v_proj")] = torch.full_like(scores[(1, "self_attn.v_proj")], float("nan"))
    before = [idx.clone() for _, _, idx, _ in sparse_modules(adapter)]
    with pytest.raises(AdapterError, match="layer 1 self_attn.v_proj are not all finite"):
        choose_masks(adapter, 0, scores)
    assert all(torch.equal(a, b) for a, (_, _, b, _) in zip(before, sparse_modules(adapter)))  # nothing changed
    randomize_values(adapter)
    with pytest.raises(AdapterError, match="trained values"):
        choose_masks(adapter, 0, scores)


def test_configs_validate_and_round_trip_json():
    with pytest.raises(ConfigError) as e:
        ShiraConfig(r=0, mask="largest", target_modules=())
    assert all(s in str(e.value) for s in ("r must be", "mask must be", "target_modules is empty"))
    for density in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="density"):
            SparseConfig(density=density)
    methods = [ShiraConfig(r=4, mask="magnitude", seed=3, layers_to_transform=(1,)),
               SparseConfig(density=0.02, target_modules="all-linear"),
               FisherProbeConfig(target_modules=("q_proj", "down_proj"), layers_to_transform=(0, 1))]
    assert methods_from_json(methods_to_json(methods)) == methods
    assert [ShiraConfig.peft_type, SparseConfig.peft_type] == ["SHIRA", "EDGETUNE_SPARSE"]
    assert ShiraConfig.mergeable and SparseConfig.mergeable


# ================================================================= Fisher scores
def calibration_batches() -> list[Batch]:
    ids = token_ids(batch=3, length=9, seed=2)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt without loss
    ids[1, 6:], labels[1, 6:] = 0, -100  # right padding
    labels[2] = -100  # nothing supervised: skipped
    mask = (labels != -100).long()
    more = token_ids(batch=1, length=5, seed=3)
    return [Batch(ids, labels, mask, int(mask.sum())), Batch(more, more.clone(), torch.ones_like(more), 5)]


def test_fisher_scores_match_per_sequence_transformers_gradients(tiny_dir):
    probe = FisherProbeConfig(target_modules=("q_proj", "v_proj", "down_proj"))
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, ShiraConfig(r=2, mask="fisher"))
    scores = fisher_scores(model, probe, calibration_batches())
    assert model.adapter is adapter  # restored

    hf = hf_model(tiny_dir("llama"))
    ref = {key: torch.zeros_like(hf.get_parameter(f"model.layers.{key[0]}.{key[1]}.weight")) for key in scores}
    for batch in calibration_batches():
        for row in range(batch.input_ids.shape[0]):
            hf.zero_grad()
            logits = hf(input_ids=batch.input_ids[row:row + 1]).logits[0]  # (T, V)
            loss = F.cross_entropy(logits[:-1], batch.labels[row, 1:], ignore_index=-100, reduction="sum")
            if batch.labels[row].eq(-100).all():
                continue
            loss.backward()
            for (layer, module), total in ref.items():
                total += hf.get_parameter(f"model.layers.{layer}.{module}.weight").grad ** 2
    assert set(scores) == {(l, m) for l in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    for key, s in scores.items():
        assert s.shape == ref[key].shape and ref[key].abs().max() > 0
        assert rel(s, ref[key]) <= 1e-5, key

    choose_masks(adapter, 0, scores)
    for layer, module, idx, values in sparse_modules(adapter):
        _assert_mask(idx, values.numel(), scores[(layer, module)].numel())
        assert torch.equal(idx, top_k_indices(scores[(layer, module)], values.numel()))


# ================================================================= saving and loading
def _save(adapter: Adapter, folder: Path, tiny: Path) -> Path:
    return save_adapter(adapter, folder, base_model_name_or_path=str(tiny))


@pytest.mark.parametrize("case", ["qv_llama", "magnitude_all_linear_mistral", "layers_qwen2"])
def test_saved_shira_loads_in_peft(tiny_dir, tmp_path, case):
    import peft

    arch, method, _ = SHIRA_CASES[case]
    model, adapter = sparse_model(tiny_dir, arch, method)
    with torch.no_grad():
        ours = model(token_ids())
    folder = _save(adapter, tmp_path / "adapter", tiny_dir(arch))
    saved = load_file(folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["mask_type"], cfg["random_seed"]) == ("SHIRA", method.r, method.mask, method.seed)
    for layer, module, idx, values in sparse_modules(adapter):
        key = f"base_model.model.model.layers.{layer}.{module}"
        d_in = model.config.linear_shapes()[module][1]
        assert saved[f"{key}.shira_indices"].dtype == torch.int32
        assert torch.equal(saved[f"{key}.shira_indices"].long(), torch.stack([idx // d_in, idx % d_in]))
        assert torch.equal(saved[f"{key}.shira_weight"], values.detach())
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_dir(arch)), str(folder)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    assert rel(ours, theirs) <= 1e-5
    pm.save_pretrained(tmp_path / "resaved")  # PEFT writes back exactly what edgetune wrote
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(resaved) == set(saved) and all(torch.equal(resaved[k], saved[k]) for k in saved)
    back = load_model(tiny_dir(arch))
    load_adapter(back, folder)
    with torch.no_grad():
        assert rel(back(token_ids()), ours) <= 1e-5


def test_peft_saved_shira_loads_here(tiny_dir, tmp_path):
    import peft

    config = peft.ShiraConfig(r=2, random_seed=11, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(hf_model(tiny_dir("qwen2")), config).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    model = load_model(tiny_dir("qwen2"))
    adapter = load_adapter(model, tmp_path / "peft")
    (method,) = adapter.methods
    assert (type(method), method.r, method.mask, method.seed) == (ShiraConfig, 2, "random", 11)
    assert sorted(method.target_modules) == ["down_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        assert rel(model(token_ids()), theirs) <= 1e-5


def test_edgetune_sparse_round_trip(tiny_dir, tmp_path):
    methods = [SparseConfig(density=0.05, mask="magnitude", seed=4, target_modules=("o_proj", "up_proj")),
               LoraConfig(r=2, alpha=4)]
    model, adapter = sparse_model(tiny_dir, "llama", methods)
    with torch.no_grad():
        ours = model(token_ids())
    folder = _save(adapter, tmp_path / "stack", tiny_dir("llama"))
    single = _save(Adapter([methods[0]], adapter.block_tensors[:1], adapter.edge_tensors[:1]), tmp_path / "one",
                   tiny_dir("llama"))
    cfg = json.loads((single / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["density"], cfg["mask"], cfg["seed"]) == ("EDGETUNE_SPARSE", 0.05, "magnitude", 4)
    saved = load_file(single / "adapter_model.safetensors")
    for layer, module, idx, values in sparse_modules(adapter):
        key = f"base_model.model.model.layers.{layer}.{module}"
        assert saved[key + IDX].dtype == torch.int64 and torch.equal(saved[key + IDX], idx)
        assert torch.equal(saved[key + VAL], values.detach())
    back = load_model(tiny_dir("llama"))
    loaded = load_adapter(back, folder)
    assert loaded.methods == methods
    with torch.no_grad():
        assert max_diff(back(token_ids()), ours) <= 1e-6


def _edit(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, str(path))


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _set(key: str, fn):
    return lambda s: s.__setitem__(key, fn(s[key].clone()))


def _put(t: torch.Tensor, where, value) -> torch.Tensor:
    t[where] = value
    return t


@pytest.mark.parametrize("method, edit, message", [
    (ShiraConfig(r=2), _set(Q + ".shira_indices", lambda t: _put(t, (1, 0), 32)), "outside the \\(32, 32\\) weight"),
    (ShiraConfig(r=2), _set(Q + ".shira_indices", lambda t: _put(t, (0, 0), -1)), "outside"),
    (ShiraConfig(r=2), _set(Q + ".shira_indices", lambda t: t[:, :-1].contiguous()), "expected \\(2, 128\\)"),
    (ShiraConfig(r=2), _set(Q + ".shira_indices", lambda t: t.float() + 0.5), "must be integers"),
    (ShiraConfig(r=2), _set(Q + ".shira_indices", lambda t: _put(t, (slice(None), 1), t[:, 0])), "repeat"),
    (ShiraConfig(r=2), _set(Q + ".shira_weight", lambda t: t[:-1]), "128 indices but values of shape \\(127,\\)"),
    (SparseConfig(density=0.1), _set(Q + IDX, lambda t: _put(t, -1, 32 * 32)), "outside \\[0, 1024\\)"),
    (SparseConfig(density=0.1), _set(Q + IDX, lambda t: t.double()), "must be integers"),
    (SparseConfig(density=0.1), _set(Q + IDX, lambda t: t.view(1, -1)), "expected \\(102,\\)"),
    (SparseConfig(density=0.1), _set(Q + IDX, lambda t: t.bool()), "must be integers"),
], ids=["shira-column", "shira-negative", "shira-count", "shira-fraction", "shira-repeat", "shira-values",
        "sparse-range", "sparse-float", "sparse-shape", "sparse-bool"])
def test_corrupt_indices_are_refused(tiny_dir, tmp_path, method, edit, message):
    _, adapter = sparse_model(tiny_dir, "llama", method)
    folder = _save(adapter, tmp_path / "adapter", tiny_dir("llama"))
    _edit(folder, edit)
    with pytest.raises(AdapterError, match=f"layer 0 self_attn.q_proj: .*{message}"):
        load_adapter(load_model(tiny_dir("llama")), folder)


def test_unsorted_and_float_shira_indices_load(tiny_dir, tmp_path):
    """PEFT's own order need not be ascending, and PEFT on Windows saves indices as float32."""
    model, adapter = sparse_model(tiny_dir, "llama", ShiraConfig(r=2))
    with torch.no_grad():
        ours = model(token_ids())
    folder = _save(adapter, tmp_path / "adapter", tiny_dir("llama"))

    def shuffle(state):
        order = torch.randperm(state[Q + ".shira_weight"].numel(), generator=torch.Generator().manual_seed(0))
        state[Q + ".shira_weight"] = state[Q + ".shira_weight"][order]
        state[Q + ".shira_indices"] = state[Q + ".shira_indices"][:, order].float()
    _edit(folder, shuffle)
    back = load_model(tiny_dir("llama"))
    loaded = load_adapter(back, folder)
    idx = loaded.block_tensors[0][0]["self_attn.q_proj" + IDX]
    assert idx.dtype == torch.int64 and torch.equal(idx, adapter.block_tensors[0][0]["self_attn.q_proj" + IDX])
    with torch.no_grad():
        assert max_diff(back(token_ids()), ours) <= 1e-6
