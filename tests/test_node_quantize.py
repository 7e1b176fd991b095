"""Quantized frozen weights on a node (`edgetune node --quantize int8|nf4`, torchao's tensors):
a quantized node computes exactly what a plain node holding the dequantized weights computes,
holds a fraction of the bytes, and refuses DoRA before training starts."""
from __future__ import annotations

import json

import pytest
import torch

from edgetune.nodes.shard import Shard
from edgetune.runtime.compute.quantize import (
    bytes_per_value,
    check_scheme,
    nf4_scaler_block,
    quantize_blocks,
    tensor_bytes,
)
from edgetune.runtime.errors import ConfigError, EdgetuneError, SessionError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import LoraConfig, attach_adapter
from edgetune.runtime.peft.adapter import methods_to_json
from edgetune.runtime.wire import messages as wire
from edgetune.tests.node_harness import shard_step
from edgetune.tests.tiny import SAMPLE_TEXTS, randomize

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_schemes_sizes_and_nf4_blocks():
    assert bytes_per_value("nf4", "bf16") / bytes_per_value("none", "bf16") <= 0.35
    assert bytes_per_value("int8", "fp32") == 1.0 and bytes_per_value("none", "fp16") == 2.0
    assert nf4_scaler_block(192 * 576, (192, 576)) == 64  # SmolLM2's k/v: 1728 blocks of 64, not a multiple of 256
    assert nf4_scaler_block(576 * 1536, (1536, 576)) == 256
    assert nf4_scaler_block(32 * 64, (32, 64)) == 32
    with pytest.raises(ConfigError, match=r"\(3, 7\) weight has 21 values"):
        nf4_scaler_block(21, (3, 7))
    with pytest.raises(ConfigError, match="choose one of none, int8, nf4"):
        check_scheme("int4")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _part(folder, scheme="none", device="cpu"):
    part = load_model(folder, start=0, end=2, edge=False, device=device)
    quantize_blocks(part, scheme)
    return part


def _dequantized(weight):
    """The plain tensor torchao's quantized weight stands for."""
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize()  # weight-only int8


def _dequantized_copy(folder, quantized, device="cpu"):
    """A plain part whose linear weights are exactly what `quantized` holds, dequantized."""
    plain = load_model(folder, start=0, end=2, edge=False, device=device)
    for layer in range(2):
        qs, ps = quantized.block(layer).linears(), plain.block(layer).linears()
        for name, linear in ps.items():
            linear.weight = torch.nn.Parameter(_dequantized(qs[name].weight).detach().clone(), requires_grad=False)
    return plain


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_quantized_node_equals_a_plain_node_holding_the_dequantized_weights(tiny64, scheme, device):
    full = load_model(tiny64)
    adapter = attach_adapter(full, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=TARGETS))
    randomize(adapter, seed=2)
    views = adapter.block_tensor_views(range(2))
    g = torch.Generator().manual_seed(0)
    hidden, grad_out = torch.randn(2, 7, 64, generator=g).to(device), torch.randn(2, 7, 64, generator=g).to(device)

    quantized = _part(tiny64, scheme, device)
    assert all(type(l.weight).__module__.startswith("torchao") for l in quantized.block(0).linears().values())
    plain = _dequantized_copy(tiny64, quantized, device)
    methods = methods_to_json(adapter.methods)
    _, q_out, q_in, q_grads = shard_step(Shard("q", "m", quantized, "f" * 64, quantize=scheme), methods, views, hidden,
                                         grad_out, dropout_key=(3, 0, 0))
    _, p_out, p_in, p_grads = shard_step(Shard("p", "m", plain, "f" * 64), methods, views, hidden, grad_out,
                                         dropout_key=(3, 0, 0))
    assert (q_out - p_out).abs().max() <= 1e-5 * p_out.abs().max()
    assert (q_in - p_in).abs().max() <= 1e-5 * p_in.abs().max()
    assert q_grads.keys() == p_grads.keys() and len(q_grads) == 2 * 2 * len(TARGETS)
    for k, ref in p_grads.items():
        assert (q_grads[k] - ref).abs().max() <= 1e-5 * ref.abs().max(), k
    # and the quantization is real: the dequantized weights differ from the stored ones
    original = load_model(tiny64, start=0, end=2, edge=False, device=device)
    w, dq = original.block(0).self_attn.q_proj.weight, plain.block(0).self_attn.q_proj.weight
    assert 0 < (dq - w).norm() / w.norm() < (0.15 if scheme == "nf4" else 0.01)


@pytest.mark.parametrize("scheme, most", [("nf4", 0.35), ("int8", 0.6)])
def test_a_quantized_node_holds_a_fraction_of_the_bf16_weight_bytes(tiny64, scheme, most):
    def linear_bytes(part):
        return sum(tensor_bytes(l.weight) for i in range(2) for l in part.block(i).linears().values())

    bf16 = load_model(tiny64, start=0, end=2, edge=False, dtype=torch.bfloat16)
    quantized = load_model(tiny64, start=0, end=2, edge=False, dtype=torch.bfloat16)
    quantize_blocks(quantized, scheme)
    assert linear_bytes(quantized) <= most * linear_bytes(bf16)
    assert Shard("q", "m", quantized, "f" * 64).loaded_bytes() < Shard("p", "m", bf16, "f" * 64).loaded_bytes()


def test_dora_is_refused_on_a_quantized_node_with_a_clear_error(tiny64):
    full = load_model(tiny64)
    dora = attach_adapter(full, LoraConfig(r=4, alpha=8, use_dora=True, target_modules=("q_proj",)))
    shard = Shard("gpu-7", "m", _part(tiny64, "nf4"), "f" * 64, quantize="nf4")
    with pytest.raises(SessionError, match="node gpu-7 holds its blocks' weights quantized \\(nf4\\).*DoRA") as e:
        shard.open_session(wire.Open("s", "m", "f" * 64, [wire.Hop("gpu-7", "", 0, 2)],
                                     methods_json=methods_to_json(dora.methods)))
    assert e.value.code == "FAILED_PRECONDITION"


def test_the_edge_stops_dora_on_a_quantized_route_before_the_first_step(tiny64, tmp_path, monkeypatch):
    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.tests.node_harness import patch_connect, start_route

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    route = start_route(tiny64, [1], tmp_path, quantize="nf4")
    try:
        patch_connect(monkeypatch, route)
        with pytest.raises(EdgetuneError, match=r"holds its blocks. weights quantized \(nf4\).*DoRA"):
            finetune(TrainConfig(model=str(tiny64), data=str(data), out=str(tmp_path / "run"), method="dora",
                                 rank=4, steps=2, batch_size=2, max_seq_len=16, progress=False, coordinator="fake:1",
                                 max_step_retries=1))
    finally:
        route.stop()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_the_coordinator_gives_a_quantized_node_proportionally_more_blocks():
    from edgetune.coordinator.core import _stage_node
    from edgetune.nodes.profile import NodeProfile
    from edgetune.runtime.plan.partition import ModelCost, partition

    def node(name, quantize):
        return _stage_node(name, NodeProfile(name=name, device="cuda", cpus=8, threads=8, ram_bytes=1 << 34,
                                             gpu_name="X", gpu_memory_bytes=1 << 34, memory_bytes=(1 << 30) + (1 << 28),
                                             fixed_bytes=1 << 28, block_time_s=0.01, bandwidth_bytes_per_s=1e12,
                                             dtype="bf16", quantize=quantize))

    nf4 = node("b", "nf4")
    assert nf4.weight_scale == pytest.approx((0.5 + 1 / 64) / 4) and nf4.activation_scale == 0.5
    model = ModelCost(num_layers=40, block_bytes=200 << 20, activation_bytes=0)  # fp32 bytes: 100 MiB a block in bf16
    plan = partition([node("a", "none"), nf4], model)
    blocks = {s.name: s.blocks for s in plan.stages}
    assert blocks == {"a": 10, "b": 30}  # 1 GiB each: 10 bf16 blocks of 100 MiB fit; ~26 MiB nf4 blocks hold the rest


def test_a_node_without_torchao_says_what_to_install(tiny64, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ConfigError, match=r"needs torchao.*edgetune\[cluster\]"):
        quantize_blocks(load_model(tiny64, start=0, end=1, edge=False), "nf4")


def test_bench_node_runs_every_variant_on_a_tiny_model(tiny64, tmp_path, capsys):
    from edgetune.benchmarks import bench_node

    out = tmp_path / "bench.json"
    assert bench_node.main(["--model", str(tiny64), "--blocks", "2", "--batch-size", "1", "--seq-len", "8",
                            "--rank", "2", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["fp32", "bf16", "int8", "nf4", "linear-fn", "compiled"]
    assert rows["nf4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["bf16"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["fp32"]["rel_l2_vs_fp32"] == 0 and 0 < rows["nf4"]["rel_l2_vs_fp32"] < 1
    assert rows["compiled"]["rel_l2_vs_fp32"] < 1e-5 and rows["linear-fn"]["rel_l2_vs_fp32"] < 1e-5
    assert rows["compiled"]["weight_bytes"] == rows["fp32"]["weight_bytes"] and rows["compiled"]["warmup_s"] > 0
    assert "nf4" in capsys.readouterr().out


def test_a_quantizing_node_builds_and_quantizes_one_block_at_a_time(tiny64, monkeypatch):
    """build_part hands each block to the quantizer before building the next: the blocks after it are
    still on the meta device (no memory), so the node never holds its part unquantized."""
    from edgetune.runtime.compute.quantize import quantize_block
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.loader import build_part, part_shapes, resolve_model_folder
    from edgetune.runtime.model.weights import SafetensorsCheckpoint

    cfg = ModelConfig.from_file(resolve_model_folder(tiny64) / "config.json")
    ckpt = SafetensorsCheckpoint(resolve_model_folder(tiny64))
    tensors = {n: ckpt.read_raw(n) for n in part_shapes(cfg, 0, 2, edge=False)}
    seen = []

    def each_block(block):
        later = [b for b in part_blocks if b.layer_idx > block.layer_idx]
        assert all(p.is_meta for b in later for p in b.parameters())
        assert not any(p.is_meta for p in block.parameters())
        quantize_block(block, "nf4")
        seen.append(block.layer_idx)

    import edgetune.runtime.model.loader as loader

    part_blocks = []

    class Recording(loader.CausalLM):  # lets the callback see the blocks not built yet
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            part_blocks.extend(self.layers)

    monkeypatch.setattr(loader, "CausalLM", Recording)
    part = build_part(cfg, 0, 2, False, lambda shapes: tensors, "cpu", torch.float32, each_block=each_block)
    assert seen == [0, 1] and len(tensors) == len(part_shapes(cfg, 0, 2, edge=False))  # the caller's dict is intact
    assert all(type(l.weight).__name__ == "NF4Tensor" for b in part.layers for l in b.linears().values())
    plain = load_model(tiny64, start=0, end=2, edge=False)
    x = torch.randn(1, 5, 64)
    ctx = plain.make_context(1, 5, x.device)
    with torch.no_grad():
        got, ref = part.forward_blocks(x, ctx), plain.forward_blocks(x, ctx)
    assert 0 < (got - ref).norm() / ref.norm() < 0.2  # nf4's rounding, not garbage
