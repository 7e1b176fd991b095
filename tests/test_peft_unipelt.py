"""UniPELT (runtime/peft/unipelt.py) against an independent plain-torch reference.

HF PEFT has no UniPELT, so the reference is transformers' own tiny model with the paper's
three gated submodules written here straight from the formulas in unipelt.py's docstring:
forward hooks on q/k/v (gated LoRA) and on the MLP (gated serial adapter), and a
hand-written attention (explicit softmaxes, no SDPA) for the gated prefix. The reference
holds its own copies of the adapter's tensors, so gradients are compared tensor by tensor.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.model.transformer import KVCache
from edgetune.runtime.peft import METHODS, LoraConfig, PrefixTuningConfig, attach_adapter, stats
from edgetune.runtime.peft.adapter import methods_from_json, methods_to_json
from edgetune.runtime.peft.hf_format import load_adapter, read_adapter_config, save_adapter
from edgetune.runtime.peft.stats import recording
from edgetune.runtime.peft.unipelt import UniPeltConfig
from edgetune.tests.tiny import VOCAB, hf_model, max_diff, randomize, token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CASES = {
    "llama": UniPeltConfig(lora_r=4, lora_alpha=8, num_virtual_tokens=3, bottleneck_size=8),
    "qwen2": UniPeltConfig(lora_r=2, lora_alpha=5, lora_targets=("q_proj", "k_proj", "v_proj"),
                           num_virtual_tokens=2, bottleneck_size=6, activation="silu"),
}
ACTS = {"relu": torch.relu, "silu": F.silu}


def _targets(ids: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(5))


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------- the reference
class Reference:
    """transformers' model of the checkpoint with UniPELT hooked in; `params` are leaf copies of
    the adapter's tensors (same names), `gates` the per-layer gate means of the last forward."""

    def __init__(self, folder, adapter, cfg: UniPeltConfig) -> None:
        self.cfg, self.model = cfg, hf_model(folder)
        self.params = {name: t.detach().clone().requires_grad_(True) for name, t in adapter.named_tensors()}
        self.gates: dict[str, float] = {}
        c = self.model.config
        self.H, self.KVH = c.num_attention_heads, c.num_key_value_heads
        self.hd = c.hidden_size // self.H
        for i, layer in enumerate(self.model.model.layers):
            for short in cfg.lora_targets:
                getattr(layer.self_attn, short).register_forward_hook(self._lora_hook(i, short))
            layer.self_attn.register_forward_hook(self._attention_hook(i), with_kwargs=True)
            layer.mlp.register_forward_hook(self._adapter_hook(i))

    def p(self, layer: int, name: str) -> torch.Tensor:
        return self.params[f"m0.layers.{layer}.{name}"]

    def gate(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:  # (B, T)
        return torch.sigmoid(x @ self.p(layer, f"gate_{kind}.weight")[0] + self.p(layer, f"gate_{kind}.bias")[0])

    def _lora_hook(self, i, short):
        def hook(module, args, out):
            x = args[0]
            A, B = self.p(i, f"self_attn.{short}.lora_A"), self.p(i, f"self_attn.{short}.lora_B")
            s = self.cfg.lora_alpha / self.cfg.lora_r
            return out + self.gate(i, "lora", x)[..., None] * s * (x @ A.T) @ B.T
        return hook

    def _attention_hook(self, i):
        def hook(attn, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, D), normed
            cos, sin = kwargs["position_embeddings"]  # (B, T, hd)
            B, T, _ = x.shape
            H, KVH, hd, rep = self.H, self.KVH, self.hd, self.H // self.KVH
            q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # LoRA hooks included
            k = attn.k_proj(x).view(B, T, KVH, hd).transpose(1, 2)
            v = attn.v_proj(x).view(B, T, KVH, hd).transpose(1, 2)

            def rope(t):
                half = hd // 2
                return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, T, hd)
            pk = self.p(i, "prefix_key").transpose(0, 1).repeat_interleave(rep, 0)  # (H, P, hd), not rotated
            pv = self.p(i, "prefix_value").transpose(0, 1).repeat_interleave(rep, 0)
            s_real = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, H, T, T)
            s_real = s_real.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            s_prefix = (q @ pk.transpose(-1, -2)) / math.sqrt(hd)  # (B, H, T, P)
            P = pk.shape[1]
            a_all = torch.softmax(torch.cat([s_prefix, s_real], -1), -1)  # one softmax over prefix + real keys
            g_prefix = self.gate(i, "prefix", x)
            o = torch.softmax(s_real, -1) @ v + g_prefix[:, None, :, None] * (a_all[..., :P] @ pv)
            self.gates[f"gate.lora.{i}"] = self.gate(i, "lora", x).mean().item()
            self.gates[f"gate.prefix.{i}"] = g_prefix.mean().item()
            return attn.o_proj(o.transpose(1, 2).reshape(B, T, H * hd)), None
        return hook

    def _adapter_hook(self, i):
        def hook(mlp, args, out):
            u = args[0]  # the MLP's normed input
            z = ACTS[self.cfg.activation](out @ self.p(i, "mlp_adapter.down.weight").T + self.p(i, "mlp_adapter.down.bias"))
            g = self.gate(i, "adapter", u)
            self.gates[f"gate.adapter.{i}"] = g.mean().item()
            return out + g[..., None] * (z @ self.p(i, "mlp_adapter.up.weight").T + self.p(i, "mlp_adapter.up.bias"))
        return hook

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        P, (B, T) = self.cfg.num_virtual_tokens, ids.shape
        positions = torch.arange(P, P + T)[None].expand(B, T)  # the prefix counts as P past tokens
        return self.model(input_ids=ids, position_ids=positions).logits


def _pair(tiny_dir, arch: str, seed: int = 1):
    folder = tiny_dir(arch)
    model = load_model(folder)
    adapter = attach_adapter(model, CASES[arch], seed=seed)
    randomize(adapter, seed, scale=0.5)
    return model, adapter, Reference(folder, adapter, CASES[arch])


# =================================================================== tests
def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        UniPeltConfig(lora_r=0, lora_alpha=-1, lora_targets=("q_proj", "o_proj"), num_virtual_tokens=0,
                      bottleneck_size=0, activation="swish", layers_to_transform=(-1,))
    for field in ("lora_r", "lora_alpha", "lora_targets", "num_virtual_tokens", "bottleneck_size", "activation",
                  "layers_to_transform"):
        assert field in str(e.value), field
    assert METHODS["unipelt"] is UniPeltConfig
    assert UniPeltConfig(lora_targets=["q_proj"]).lora_targets == ("q_proj",)  # JSON lists become tuples


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_identity_at_initialisation_and_first_gradients(tiny_dir, arch):
    """Zero LoRA B, adapter up and prefix values: the base model exactly, and those three train first."""
    model = load_model(tiny_dir(arch))
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
    adapter = attach_adapter(model, CASES[arch], seed=3)
    logits = model(ids)
    assert max_diff(logits, base) <= 1e-6
    _loss(logits, _targets(ids)).backward()
    for name, t in adapter.named_tensors():
        moves_first = name.endswith(("lora_B", "prefix_value", "mlp_adapter.up.weight", "mlp_adapter.up.bias"))
        assert (t.grad.abs().max() > 0) == moves_first, name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_grads_and_recorded_gates_match_the_reference(tiny_dir, arch):
    model, adapter, ref = _pair(tiny_dir, arch)
    ids = token_ids(batch=2, length=7)
    with recording() as seen:
        logits = model(ids)
    ref_logits = ref(ids)
    assert max_diff(logits, ref_logits) <= 1e-5 * ref_logits.abs().max().item()
    # recorded means are the reference's per-layer gate means (every gate of both layers)
    assert set(seen.means()) == set(ref.gates) and len(ref.gates) == 6
    for name, value in seen.means().items():
        assert abs(value - ref.gates[name]) <= 1e-6, name
    targets = _targets(ids)
    _loss(logits, targets).backward()
    _loss(ref_logits, targets).backward()
    for name, t in adapter.named_tensors():
        g_ref = ref.params[name].grad
        assert g_ref is not None and g_ref.abs().max() > 0, name
        rel = max_diff(t.grad, g_ref) / g_ref.abs().max().item()
        assert rel <= 1e-5, f"{name}: relative grad error {rel:.2e}"


def test_gates_are_causal(tiny_dir, monkeypatch):
    """Changing later tokens changes neither earlier logits nor earlier gate values."""
    model, adapter, _ = _pair(tiny_dir, "llama")
    seen: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(stats, "record", lambda name, g: seen.__setitem__(name, g.detach().clone()))
    a = token_ids(batch=2, length=9, seed=0)
    b = a.clone()
    b[:, 5:] = token_ids(batch=2, length=4, seed=7)
    with torch.no_grad():
        out_a, gates_a = model(a), dict(seen)
        out_b, gates_b = model(b), dict(seen)
    assert len(gates_a) == 6
    assert max_diff(out_a[:, :5], out_b[:, :5]) <= 1e-6
    assert max_diff(out_a[:, 5:], out_b[:, 5:]) > 1e-3
    for name, g in gates_a.items():
        assert g.shape == (2, 9), name
        assert max_diff(g[:, :5], gates_b[name][:, :5]) <= 1e-7, name
        assert max_diff(g[:, 5:], gates_b[name][:, 5:]) > 0, name  # the later tokens' own gates did change


def test_kv_cache_steps_match_the_full_forward(tiny_dir):
    """The gated prefix sits ahead of the cache: a prompt then one token at a time gives the full pass's logits."""
    model, _, _ = _pair(tiny_dir, "qwen2")
    ids = token_ids(batch=2, length=8, seed=2)
    cache = KVCache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], cache=cache)]
        for t in range(5, 8):
            steps.append(model(ids[:, t:t + 1], attention_mask=torch.ones(2, t + 1, dtype=torch.long), cache=cache))
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


def test_saved_adapter_round_trips(tiny_dir, tmp_path):
    model, adapter, _ = _pair(tiny_dir, "llama")
    ids = token_ids()
    save_adapter(adapter, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert cfg["peft_type"] == "EDGETUNE_UNIPELT" and cfg["lora_targets"] == ["q_proj", "v_proj"]
    fresh = load_model(tiny_dir("llama"))
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded.methods == adapter.methods
    assert methods_from_json(methods_to_json(adapter.methods)) == adapter.methods
    for (name, t), (name2, t2) in zip(adapter.named_tensors(), loaded.named_tensors()):
        assert name == name2 and torch.equal(t, t2), name
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))


def test_stack_order_puts_each_prefix_where_its_gate_applies(tiny_dir, tmp_path):
    """With plain prefix tuning in the stack, only UniPELT's prefix keys are gated, wherever
    prefix_kv puts them: the two stack orders hold the same keys, so they give the same logits."""
    folder = tiny_dir("llama")
    methods = [PrefixTuningConfig(num_virtual_tokens=2), UniPeltConfig(lora_r=2, num_virtual_tokens=3, bottleneck_size=4)]
    first = load_model(folder)
    a = attach_adapter(first, methods, seed=0)
    randomize(a, scale=0.5)
    second = load_model(folder)
    b = attach_adapter(second, methods[::-1], seed=0)
    with torch.no_grad():
        for k, j in ((0, 1), (1, 0)):
            for layer, ts in a.block_tensors[k].items():
                for name, t in ts.items():
                    b.block_tensors[j][layer][name].copy_(t)
    ids = token_ids()
    with torch.no_grad():
        assert max_diff(first(ids), second(ids)) <= 1e-5
        # ... and the gated prefix matters: without UniPELT's prefix values the logits move
        for ts in a.block_tensors[1].values():
            ts["prefix_value"].zero_()
        assert max_diff(first(ids), second(ids)) > 1e-3
    save_adapter(a, tmp_path / "stack")  # a stack with UniPELT saves and loads too
    assert load_adapter(load_model(folder), tmp_path / "stack").methods == methods


def test_stack_with_lora_trains(tiny_dir):
    model = load_model(tiny_dir("llama"))
    methods = [UniPeltConfig(lora_r=4, num_virtual_tokens=3, bottleneck_size=8, layers_to_transform=(1,)),
               LoraConfig(r=4, alpha=8, target_modules=("o_proj", "down_proj"))]
    adapter = attach_adapter(model, methods, seed=0).train()
    assert set(adapter.block_tensors[0]) == {1}
    ids = token_ids(batch=2, length=8, seed=1)
    optimizer = torch.optim.AdamW(list(adapter.parameters()), lr=2e-2)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        with recording() as seen:
            loss = _loss(model(ids[:, :-1], dropout_key=(0, step, 0)), ids[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(seen.means()) == {"gate.lora.1", "gate.prefix.1", "gate.adapter.1"}
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0] - 0.2, losses
    # after training, every UniPELT tensor has moved (the gates too, once B / values / up did)
    fresh = attach_adapter(load_model(tiny_dir("llama")), methods, seed=0)
    for (name, t), (_, t0) in zip(adapter.named_tensors(), fresh.named_tensors()):
        assert not torch.equal(t, t0), name


def test_other_stacks_keep_the_plain_attention_and_merging_is_refused(tiny_dir):
    model = load_model(tiny_dir("llama"))
    lora = attach_adapter(model, [PrefixTuningConfig(num_virtual_tokens=2), LoraConfig(r=2)], seed=0)
    assert not any(v.has_gates for v in lora.for_blocks(range(2), None).values())
    adapter = attach_adapter(model, UniPeltConfig(lora_r=2, num_virtual_tokens=2, bottleneck_size=4), seed=0)
    assert all(v.has_gates for v in adapter.for_blocks(range(2), None).values())
    with pytest.raises(AdapterError, match="UniPeltConfig"):
        adapter.merge_into(model)


# ------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("layers", [None, (1,)], ids=["all_layers", "layer_1"])
def test_onnx_export_matches_pytorch(tmp_path, layers):
    """The merged export's graph (gated LoRA on q/k/v, a second GroupQueryAttention for the gated
    prefix, the gated adapter; a LoRA below it folded into the weights) against PyTorch, with the
    KV cache, and onnxruntime-genai's logits. Batch 1: GroupQueryAttention takes a prompt behind past keys
    (the prefix) one row at a time."""
    pytest.importorskip("onnxruntime")
    from edgetune.runtime.onnx.export import ExportOptions, export
    from edgetune.tests.test_onnx_export import (
        IDS,
        TINY,
        _adapter,
        _compare_with_cache,
        _genai_logits_error,
        _reference,
        _session,
    )
    from edgetune.tests.tiny import make_tiny_folder

    folder = tmp_path / "model"
    make_tiny_folder("llama", folder, **TINY)
    methods = [LoraConfig(r=4, alpha=8, target_modules=("o_proj", "down_proj")),
               UniPeltConfig(lora_r=4, lora_targets=("q_proj", "k_proj", "v_proj"), num_virtual_tokens=3,
                             bottleneck_size=8, activation="silu", layers_to_transform=layers)]
    adapter_dir = _adapter(folder, methods, tmp_path / "adapter")
    out = export(ExportOptions(model=str(folder), adapter=str(adapter_dir), out=str(tmp_path / "x"), context_length=64))
    reference = _reference(folder, adapter_dir)
    assert _compare_with_cache(_session(out), reference, IDS[:1], steps=6) <= 1e-4
    assert _compare_with_cache(_session(out), _reference(folder), IDS[:1], steps=0) > 1e-2
    assert _genai_logits_error(out, reference, IDS[0, :6].tolist(), steps=4) <= 1e-4  # onnxruntime-genai runs it
    # the same adapter without its prefix values: the gated share was part of what matched
    with torch.no_grad():
        for ts in reference.adapter.block_tensors[1].values():
            ts["prefix_value"].zero_()
    assert _compare_with_cache(_session(out), reference, IDS[:1], steps=0) > 1e-3


@pytest.mark.parametrize("methods", [
    [UniPeltConfig(lora_r=2, num_virtual_tokens=2, bottleneck_size=4), LoraConfig(r=2)],
    [PrefixTuningConfig(num_virtual_tokens=2), UniPeltConfig(lora_r=2, num_virtual_tokens=2, bottleneck_size=4)],
], ids=["unipelt_not_last", "with_prefix"])
def test_onnx_export_refuses_stacks_it_cannot_write(tiny_dir, methods):
    from edgetune.runtime.onnx.export import merge_or_extract

    model = load_model(tiny_dir("llama"))
    adapter = attach_adapter(model, methods)
    with pytest.raises(AdapterError, match="UniPELT exports as the last method"):
        merge_or_extract(adapter, model)
