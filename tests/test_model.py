"""edgetune's blocks against transformers on tiny random checkpoints, and the loader's checks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgetune.runtime.errors import ConfigError, ModelLoadError, UnsupportedModelError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.model.transformer import KVCache
from edgetune.tests.tiny import ARCHS, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{arch: (folder, transformers model)} for every supported architecture."""
    out = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(arch)
        out[arch] = (folder, make_tiny_model(arch, folder, seed=ARCHS.index(arch)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny, arch):
    folder, ref = tiny[arch]
    model = load_model(folder)
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == theirs.shape == (2, 13, 96)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_matches_transformers(tiny, arch):
    folder, ref = tiny[arch]
    model = load_model(folder)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = ref(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_generation_matches_transformers(tiny, arch):
    folder, ref = tiny[arch]
    model = load_model(folder)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_kv_cache_equals_full_recompute(tiny):
    model = load_model(tiny["llama3_scaled"][0])
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        steps = [model(ids[:, :12], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_sampling_is_seeded(tiny):
    model = load_model(tiny["llama"][0])
    ids = torch.tensor([[5, 6, 7]])
    a = model.generate(ids, max_new_tokens=12, greedy=False, temperature=1.5, top_p=0.9, seed=3)
    b = model.generate(ids, max_new_tokens=12, greedy=False, temperature=1.5, top_p=0.9, seed=3)
    c = model.generate(ids, max_new_tokens=12, greedy=False, temperature=1.5, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_stops_at_eos(tiny):
    model = load_model(tiny["llama"][0])
    ids = torch.tensor([[5, 6, 7]])
    free = model.generate(ids, max_new_tokens=6)
    eos = int(free[0, 4])  # the 2nd generated token: generation must stop right there
    stopped = model.generate(ids, max_new_tokens=6, eos_token_ids=[eos])
    assert stopped[0, -1].item() == eos and stopped.shape[1] <= 5


# ------------------------------------------------------------ selective loading
def _tensor_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_selective_loading_holds_its_share(tmp_path):
    ref = make_tiny_model("llama", tmp_path, num_hidden_layers=8, vocab_size=64, hidden_size=64, intermediate_size=128)
    full = load_model(tmp_path)
    edge = load_model(tmp_path, start=0, end=0, edge=True)
    blocks_total = _tensor_bytes(full) - _tensor_bytes(edge)
    quarter = load_model(tmp_path, start=2, end=4, edge=False)
    assert _tensor_bytes(quarter) == blocks_total // 4
    assert not hasattr(quarter, "embed_tokens")
    assert [b.layer_idx for b in quarter.blocks()] == [2, 3]
    # the part computes what the whole model computes for those blocks
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states
        ctx = quarter.make_context(1, 9, torch.device("cpu"))
        out = quarter.forward_blocks(hidden[2], ctx)
    assert (out - hidden[4]).abs().max().item() <= 1e-5


def test_block_range_outside_model_is_refused(tiny):
    with pytest.raises(ValueError, match=r"outside the model's 2 blocks"):
        load_model(tiny["llama"][0], start=1, end=5)


def test_sharded_checkpoint_loads(tmp_path, tiny):
    folder, ref = tiny["qwen2"]
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[:half]), ("model-00002-of-00002.safetensors", names[half:])):
        save_file({n: tensors[n] for n in part}, str(tmp_path / shard))
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert (load_model(tmp_path)(ids) - ref(ids).logits).abs().max().item() <= 1e-5


# ------------------------------------------------------------------- bad files
@pytest.fixture
def llama_copy(tmp_path, tiny):
    folder = tmp_path / "model"
    shutil.copytree(tiny["llama"][0], folder)
    return folder


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="nope: does not exist"):
        load_model(tmp_path / "nope")


def test_bad_json_names_the_file(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(llama_copy)


def test_missing_tensor_is_named(llama_copy):
    tensors = load_file(str(llama_copy / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(llama_copy)


def test_wrong_shape_is_named(llama_copy):
    tensors = load_file(str(llama_copy / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight' has shape \(8, 32\), the config implies \(16, 32\)"):
        load_model(llama_copy)


def test_truncated_safetensors_names_the_file(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(llama_copy)


def test_garbage_safetensors_names_the_file(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: unreadable"):
        load_model(llama_copy)


# --------------------------------------------------------------------- configs
def _hf_dict(arch="llama", **kw):
    from edgetune.tests.tiny import tiny_hf_config

    d = tiny_hf_config(arch).to_dict()
    d.update(kw)
    return d


def test_both_rope_layouts_are_read():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    old = _hf_dict(rope_theta=5e5, rope_scaling=scaling)
    old.pop("rope_parameters", None)
    new = _hf_dict(rope_parameters={"rope_theta": 5e5, **scaling})
    new.pop("rope_theta", None)
    new.pop("rope_scaling", None)
    a, b = ModelConfig.from_hf_dict(old), ModelConfig.from_hf_dict(new)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling.factor == 8.0


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "unsupported rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
])
def test_unsupported_features_are_refused(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_dict(_hf_dict(**change))


def test_mistral_sliding_window_shorter_than_context_is_refused():
    d = _hf_dict("mistral", sliding_window=64, max_position_embeddings=128)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        ModelConfig.from_hf_dict(d)
    # a window covering the whole context is plain causal attention
    ModelConfig.from_hf_dict(_hf_dict("mistral", sliding_window=128, max_position_embeddings=128))


def test_missing_field_is_named():
    d = _hf_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(d, source="x/config.json")


def test_config_round_trips_through_hf_dict():
    cfg = ModelConfig.from_hf_dict(_hf_dict("qwen2"))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
