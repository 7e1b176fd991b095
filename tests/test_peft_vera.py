"""Tests of VeRA (runtime/peft/vera.py) on tiny models, against HF PEFT's VeraConfig.

PEFT runs the same tiny checkpoints with edgetune's projections and (randomised)
scaling vectors copied in; logits and gradients must agree. The projections are
checked against a reconstruction from the seed written here, and saved folders
must load both ways (PEFT's save_projection=True layout).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import VeraConfig, attach_adapter
from edgetune.runtime.peft.adapter import constants_digest, methods_from_json, methods_to_json
from edgetune.runtime.peft.hf_format import hf_config_from_method, load_adapter, method_from_hf_config, save_adapter
from edgetune.tests.tiny import VOCAB, hf_model, max_diff, randomize, randomized_peft, tiny_hf_config, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers / peft are local references, never downloads
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PEFT_PREFIX = "base_model.model.model."


def _cases():
    import peft

    return {
        "llama_mixed_shapes": ("llama", VeraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")),
                               peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        "qwen2_all_linear": ("qwen2", VeraConfig(r=6, target_modules="all-linear", d_initial=0.3),
                             peft.VeraConfig(r=6, target_modules="all-linear", d_initial=0.3)),
        "mistral_layers": ("mistral", VeraConfig(r=4, target_modules=("k_proj", "up_proj"), layers_to_transform=(1,),
                                                 projection_prng_key=7),
                           peft.VeraConfig(r=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[1],
                                           projection_prng_key=7)),
    }


def _peft_param(name: str) -> str:
    """edgetune 'm0.layers.{i}.{module}.vera_lambda_x' -> PEFT's parameter name."""
    _, _, layer, rest = name.split(".", 3)
    return f"{PEFT_PREFIX}layers.{layer}.{rest}.default"


def _peft_pair(tiny_dir, arch, ours, theirs, seed: int = 1):
    """edgetune model + randomised VeRA adapter, and a PEFT model holding the same projections and vectors."""
    import peft

    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, ours, seed=seed)
    randomize(adapter, seed)
    pm = peft.get_peft_model(hf_model(folder), theirs).eval()
    params = dict(pm.named_parameters())
    with torch.no_grad():
        pm.base_model.vera_A["default"].copy_(adapter.constants[0]["vera_A"])  # one buffer all layers share
        pm.base_model.vera_B["default"].copy_(adapter.constants[0]["vera_B"])
        for name, t in adapter.named_tensors():
            params[_peft_param(name)].copy_(t)
    return model, adapter, pm


def _reference_projection(key: int, r: int, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's projections from the seed: kaiming-uniform (gain sqrt(2), fan-in), A then B, one CPU generator."""
    gen = torch.Generator(device="cpu").manual_seed(key)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=gen))
    return out[0], out[1]


def _model_config(arch: str = "llama") -> ModelConfig:
    return ModelConfig.from_hf_dict(tiny_hf_config(arch).to_dict())


# =================================================================== numerics
@pytest.mark.parametrize("case", ["llama_mixed_shapes", "qwen2_all_linear", "mistral_layers"])
def test_logits_and_grads_match_peft(tiny_dir, case):
    arch, ours, theirs = _cases()[case]
    model, adapter, pm = _peft_pair(tiny_dir, arch, ours, theirs)
    ids = token_ids()
    logits = model(ids)
    ref = pm(input_ids=ids).logits
    assert max_diff(logits, ref) <= 1e-5 * ref.abs().max().item()
    targets = torch.randint(0, VOCAB, logits.shape[:2], generator=torch.Generator().manual_seed(5))
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()
    params = dict(pm.named_parameters())
    names = [n for n, _ in adapter.named_tensors()]
    assert {_peft_param(n) for n in names} == {n for n, p in params.items() if p.requires_grad}
    for name, t in adapter.named_tensors():
        g_ref = params[_peft_param(name)].grad
        assert t.grad is not None and g_ref.abs().max() > 0, name
        rel = max_diff(t.grad, g_ref) / g_ref.abs().max().item()
        assert rel <= 1e-5, f"{name}: relative grad error {rel:.2e}"
    assert not any(t.requires_grad for t in adapter.constants[0].values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_identity_at_initialisation(tiny_dir, arch):
    model = load_model(tiny_dir(arch))
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
        adapter = attach_adapter(model, VeraConfig(r=16, target_modules="all-linear"), seed=3)
        adapted = model(ids)
    for layer, ts in adapter.block_tensors[0].items():
        for name, t in ts.items():
            expect = 0.1 if name.endswith("lambda_d") else 0.0
            assert torch.all(t == expect), (layer, name)
    assert max_diff(adapted, base) <= 1e-6


def test_trainable_parameter_count_equals_peft(tiny_dir):
    for arch, ours, theirs in _cases().values():
        adapter = attach_adapter(load_model(tiny_dir(arch)), ours)
        import peft

        pm = peft.get_peft_model(hf_model(tiny_dir(arch)), theirs)
        assert adapter.num_parameters() == sum(p.numel() for p in pm.parameters() if p.requires_grad), arch


# =================================================================== constants
def test_constants_are_deterministic_and_match_the_seed():
    mc = _model_config("llama")  # q (32, 32), v (16, 32), down (32, 64)
    method = VeraConfig(r=8, target_modules=("v_proj", "down_proj"), projection_prng_key=1234)
    first, second = method.constants(mc), method.constants(mc)
    assert set(first) == {"vera_A", "vera_B"}
    A, B = _reference_projection(1234, 8, max_out=32, max_in=64)
    for name, ref in (("vera_A", A), ("vera_B", B)):
        assert first[name].dtype == torch.float32 and first[name].device.type == "cpu"
        assert torch.equal(first[name], second[name]), name
        assert torch.equal(first[name], ref), name
    assert first["vera_A"].abs().max() <= math.sqrt(6 / 64) and first["vera_B"].abs().max() <= math.sqrt(6 / 8)


def test_constants_equal_peft_projections_for_the_same_key(tiny_dir):
    import peft

    _, ours, theirs = _cases()["mistral_layers"]
    pm = peft.get_peft_model(hf_model(tiny_dir("mistral")), theirs)
    mine = ours.constants(_model_config("mistral"))
    assert torch.equal(mine["vera_A"], pm.base_model.vera_A["default"])
    assert torch.equal(mine["vera_B"], pm.base_model.vera_B["default"])


@pytest.mark.parametrize("kwargs, shape", [
    (dict(target_modules=("v_proj",)), (16, 32)),
    (dict(target_modules=("q_proj", "v_proj")), (32, 32)),
    (dict(target_modules=("down_proj",), layers_to_transform=(1,)), (32, 64)),
    (dict(target_modules=("gate_proj",)), (64, 32)),
    (dict(target_modules="all-linear"), (64, 64)),
    (dict(target_modules=("q_proj",), layers_to_transform=(5,)), None),
])
def test_projections_are_sized_by_the_largest_targeted_linear(kwargs, shape):
    method = VeraConfig(r=4, **kwargs)
    mc = _model_config("llama")
    assert method.projection_shape(mc) == shape
    consts = method.constants(mc)
    if shape is None:
        assert consts == {}
    else:
        assert consts["vera_A"].shape == (4, shape[1]) and consts["vera_B"].shape == (shape[0], 4)


def test_constants_digest_follows_the_prng_key():
    mc = _model_config("llama")
    digest = lambda key: constants_digest([VeraConfig(r=4, projection_prng_key=key).constants(mc)])  # noqa: E731
    assert digest(0) == digest(0) != ""
    assert digest(0) != digest(1)
    assert constants_digest([VeraConfig(r=4).constants(mc)]) != constants_digest([VeraConfig(r=5).constants(mc)])


# merging exactly and dropout masks: test_peft_methods.py (MERGEABLE, test_dropout_masks_are_reproducible)
# =================================================================== configs
def test_config_validation_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        VeraConfig(r=0, target_modules=(), dropout=1.0, d_initial=float("nan"), projection_prng_key=1 << 64,
                   layers_to_transform=(-1,))
    for part in ("rank r", "target_modules", "dropout", "d_initial", "projection_prng_key", "layers_to_transform"):
        assert part in str(e.value)
    assert VeraConfig(target_modules=["q_proj"], layers_to_transform=[0]).target_modules == ("q_proj",)


def test_config_round_trips():
    mc = _model_config("llama")
    for method in (VeraConfig(), VeraConfig(r=16, target_modules=("q_proj", "up_proj"), projection_prng_key=9,
                                            d_initial=0.05, dropout=0.1, layers_to_transform=(0,)),
                   VeraConfig(r=4, target_modules=r".*\.v_proj"), VeraConfig(r=2, target_modules="all-linear")):
        cfg = json.loads(json.dumps(hf_config_from_method(method, mc)))
        assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is True
        assert method_from_hf_config(cfg) == method
        assert methods_from_json(methods_to_json([method])) == [method]
    # PEFT's VeRA ignores layers_to_transform beside a string target: the targeted modules are written out instead
    cfg = hf_config_from_method(VeraConfig(r=4, target_modules=r".*\.v_proj", layers_to_transform=(1,)), mc)
    assert cfg["target_modules"] == ["model.layers.1.self_attn.v_proj"] and cfg["layers_to_transform"] is None
    read = method_from_hf_config({"peft_type": "VERA", "target_modules": "all-linear", "layers_to_transform": [0]})
    assert read.layers_to_transform is None
    with pytest.raises(AdapterError, match="bias"):
        method_from_hf_config({"peft_type": "VERA", "target_modules": ["q_proj"], "bias": "all"})


# =================================================================== saving and loading
def _edgetune_logits(folder, adapter_dir):
    model = load_model(folder)
    adapter = load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(token_ids()), adapter


@pytest.mark.parametrize("arch, method", [
    ("llama", VeraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj"), projection_prng_key=3)),
    ("qwen2", VeraConfig(r=4, target_modules=r".*\.(k_proj|up_proj)", layers_to_transform=(1,))),
    ("mistral", VeraConfig(r=4, target_modules="all-linear", layers_to_transform=(0,))),
], ids=["llama", "qwen2_regex_layers", "mistral_all_linear_layers"])
def test_edgetune_adapter_loads_in_peft(tiny_dir, tmp_path, arch, method):
    import peft

    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, method, seed=1)
    randomize(adapter, 1)
    with torch.no_grad():
        ours = model(token_ids())
    out = save_adapter(adapter, tmp_path / "adapter", base_model_name_or_path=str(folder))
    written = load_file(out / "adapter_model.safetensors")
    assert torch.equal(written["base_model.vera_A"], adapter.constants[0]["vera_A"])
    assert torch.equal(written["base_model.vera_B"], adapter.constants[0]["vera_B"])
    pm = peft.PeftModel.from_pretrained(hf_model(folder), str(out)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=token_ids()).logits
    assert max_diff(ours, theirs) <= 1e-5 * theirs.abs().max().item()
    pm.save_pretrained(tmp_path / "resaved")  # PEFT writes back exactly the keys and values edgetune wrote
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(resaved) == set(written)
    for key in written:
        assert torch.equal(written[key], resaved[key]), key
    back, _ = _edgetune_logits(folder, out)
    assert max_diff(back, ours) <= 1e-6


def _peft_saved(tiny_dir, tmp_path, arch, config, alter_projection: bool = False):
    """(PEFT's logits, folder) of a randomised PEFT VeRA adapter; optionally with projections the key would not draw."""
    pm = randomized_peft(tiny_dir(arch), config)
    with torch.no_grad():
        if alter_projection:
            gen = torch.Generator().manual_seed(4)
            for buf in (pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]):
                buf.copy_(torch.randn(buf.shape, generator=gen))
        theirs = pm.eval()(input_ids=token_ids()).logits
    pm.save_pretrained(tmp_path / "peft")
    return theirs, tmp_path / "peft"


@pytest.mark.parametrize("case", ["llama_mixed_shapes", "mistral_layers"])
def test_peft_adapter_loads_in_edgetune(tiny_dir, tmp_path, case):
    arch, ours, theirs_config = _cases()[case]
    theirs, folder = _peft_saved(tiny_dir, tmp_path, arch, theirs_config)
    assert "base_model.vera_A" in load_file(folder / "adapter_model.safetensors")  # save_projection=True
    logits, adapter = _edgetune_logits(tiny_dir(arch), folder)
    (loaded,) = adapter.methods
    assert set(loaded.target_modules) == set(ours.target_modules)  # PEFT saves a set
    assert dataclasses.replace(loaded, target_modules=ours.target_modules) == ours
    assert max_diff(logits, theirs) <= 1e-5 * theirs.abs().max().item()


def test_saved_projection_wins_over_the_seed(tiny_dir, tmp_path):
    import peft

    method = VeraConfig(r=8, target_modules=("q_proj", "down_proj"))
    theirs, folder = _peft_saved(tiny_dir, tmp_path, "llama", peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]),
                                 alter_projection=True)
    logits, adapter = _edgetune_logits(tiny_dir("llama"), folder)
    assert max_diff(logits, theirs) <= 1e-5 * theirs.abs().max().item()
    saved = load_file(folder / "adapter_model.safetensors")
    assert torch.equal(adapter.constants[0]["vera_A"], saved["base_model.vera_A"])
    regenerated = method.constants(_model_config("llama"))
    assert constants_digest(adapter.constants) != constants_digest([regenerated])  # a node would refuse the session
    # merging and re-saving keep the loaded projection
    model = load_model(tiny_dir("llama"))
    loaded = load_adapter(model, folder)
    with torch.no_grad():
        loaded.merge_into(model)
        assert max_diff(model(token_ids()), theirs) <= 1e-5 * theirs.abs().max().item()
        loaded.unmerge_from(model)
    out = save_adapter(loaded, tmp_path / "resaved")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["base_model.vera_B"], saved["base_model.vera_B"])


def test_peft_adapter_without_projection_loads_with_the_regenerated_one(tiny_dir, tmp_path):
    import peft

    theirs, folder = _peft_saved(tiny_dir, tmp_path, "llama",
                                 peft.VeraConfig(r=8, target_modules=["v_proj", "o_proj"], save_projection=False))
    assert "base_model.vera_A" not in load_file(folder / "adapter_model.safetensors")
    logits, _ = _edgetune_logits(tiny_dir("llama"), folder)
    assert max_diff(logits, theirs) <= 1e-5 * theirs.abs().max().item()


def test_saved_projection_of_another_shape_is_refused(tiny_dir, tmp_path):
    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, VeraConfig(r=4, target_modules=("q_proj",)))
    out = save_adapter(adapter, tmp_path / "adapter")
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.vera_A"] = torch.zeros(4, 64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"base_model\.vera_A has shape \(4, 64\).*\(4, 32\)"):
        load_adapter(load_model(tiny_dir("llama")), out)


def test_onnx_export_merges_with_the_projections(tiny_dir):
    """`edgetune export --mode merged` folds VeRA in through merge_or_extract, which must pass the constants."""
    from edgetune.runtime.onnx.export import merge_or_extract

    model = load_model(tiny_dir("qwen2"))
    adapter = attach_adapter(model, VeraConfig(r=8, target_modules="all-linear"), seed=4)
    randomize(adapter, seed=4)
    with torch.no_grad():
        unmerged = model(token_ids())
        extras = merge_or_extract(adapter, model)
        model.adapter = None
        merged = model(token_ids())
    assert not extras.bottleneck and not extras.prefix
    assert max_diff(merged, unmerged) <= 1e-5
