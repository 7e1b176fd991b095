"""A node's precision (`edgetune node --dtype`): blocks held and run in bf16/fp16 while the
adapter, its gradients and the wire stay fp32; the partitioner charges a node its real bytes."""
from __future__ import annotations

import json

import pytest
import torch

from edgetune.runtime.compute.precision import check_dtype, resolve_dtype, torch_dtype, value_bytes
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.peft import LoraConfig, attach_adapter
from edgetune.runtime.peft.adapter import methods_to_json
from edgetune.runtime.plan.partition import ModelCost, StageNode, partition
from edgetune.tests.node_harness import shard_step
from edgetune.tests.tiny import SAMPLE_TEXTS, randomize


def test_dtype_names_resolve_per_device(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert [resolve_dtype(d, "cpu") for d in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:1") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == "fp32"  # an older GPU: no silent fp16
    assert (value_bytes("fp32"), value_bytes("bf16"), torch_dtype("fp16")) == (4, 2, torch.float16)
    for bad in ("float32", "int8", ""):
        with pytest.raises(ConfigError, match="choose one of auto, fp32, bf16, fp16"):
            check_dtype(bad)
    with pytest.raises(ConfigError, match="not a concrete dtype"):
        value_bytes("auto")


def test_a_half_precision_node_gets_twice_the_blocks_of_the_same_memory():
    model = ModelCost(num_layers=30, block_bytes=100 << 20, activation_bytes=0, block_activation_bytes=10 << 20)
    memory = 10 * (110 << 20)  # ten fp32 blocks with one micro-batch in flight
    fp32 = [StageNode("a", memory, 0.01, 1e12), StageNode("b", memory, 0.01, 1e12)]
    with pytest.raises(Exception, match="can hold 20 of 30 blocks"):
        partition(fp32, model)
    mixed = [fp32[0], StageNode("b", memory, 0.01, 1e12, weight_scale=0.5, activation_scale=0.5)]
    plan = partition(mixed, model)
    assert [(s.name, s.blocks) for s in plan.stages] == [("a", 10), ("b", 20)]
    assert plan.stages[1].memory_bytes == 20 * (55 << 20)
    with pytest.raises(Exception, match="weight_scale must be a finite number > 0"):
        StageNode("c", memory, 0.01, 1e12, weight_scale=0)


def test_the_coordinator_charges_a_profiled_node_its_dtypes_bytes():
    from edgetune.coordinator.core import _stage_node
    from edgetune.nodes.profile import NodeProfile

    def profile(dtype):
        return NodeProfile(name="n", device="cuda", cpus=8, threads=8, ram_bytes=1 << 34, gpu_name="X",
                           gpu_memory_bytes=1 << 34, memory_bytes=1 << 33, fixed_bytes=1 << 28, block_time_s=0.01,
                           bandwidth_bytes_per_s=1e9, dtype=dtype)

    assert (_stage_node("n", profile("fp32")).weight_scale, _stage_node("n", profile("fp32")).activation_scale) == (1, 1)
    half = _stage_node("n", profile("bf16"))
    assert (half.weight_scale, half.activation_scale, half.memory_bytes) == (0.5, 0.5, 1 << 33)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_a_half_precision_shard_keeps_the_adapter_and_its_gradients_fp32(tiny64, dtype, tol, device):
    from edgetune.nodes.shard import Shard

    def run(block_dtype):
        part = load_model(tiny64, start=0, end=2, edge=False, dtype=block_dtype, device=device)
        return (part, *shard_step(Shard("n", str(tiny64), part, "f" * 64), methods_to_json(adapter.methods), views,
                                  hidden, grad_out))

    full = load_model(tiny64)
    adapter = attach_adapter(full, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize(adapter, seed=1)
    views = adapter.block_tensor_views(range(2))
    g = torch.Generator().manual_seed(0)
    hidden, grad_out = torch.randn(2, 7, 64, generator=g).to(device), torch.randn(2, 7, 64, generator=g).to(device)

    ref_part, _, ref_out, ref_grad_in, ref_grads = run(torch.float32)
    part, session, out, grad_in, grads = run(dtype)
    assert ref_part.dtype == torch.float32 and part.dtype == dtype
    assert all(t.dtype == torch.float32 and t.requires_grad for t in session.tensors.values())  # fp32 leaves
    assert out.dtype == grad_in.dtype == torch.float32  # the wire gets fp32; its codec decides the rest
    assert grads.keys() == ref_grads.keys() and grads
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.float32
        assert (grads[name] - ref).norm() <= tol * ref.norm(), name
    assert (out - ref_out).norm() <= tol * ref_out.norm()
    assert (grad_in - ref_grad_in).norm() <= tol * ref_grad_in.norm()
    assert (out - ref_out).abs().max() > 0  # it really ran in half precision


def test_training_through_bf16_nodes_follows_fp32_training(tiny64, tmp_path, monkeypatch):
    """Distributed LoRA through two bf16 nodes vs --local fp32: the same loss curve within bf16's error."""
    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.tests.node_harness import patch_connect, start_route

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    common = dict(model=str(tiny64), data=str(data), method="lora", rank=4, alpha=8.0, dropout=0.0,
                  target_modules=("q_proj", "v_proj", "down_proj"), lr=5e-2, steps=4, batch_size=4, micro_batches=2,
                  warmup_steps=1, max_seq_len=32, eval_fraction=0.25, save_every=0, progress=False, seed=3)
    local = finetune(TrainConfig(out=str(tmp_path / "local"), **common))
    route = start_route(tiny64, [1], tmp_path, dtype=torch.bfloat16)
    try:
        patch_connect(monkeypatch, route)
        remote = finetune(TrainConfig(out=str(tmp_path / "remote"), coordinator="fake:1", **common))
    finally:
        route.stop()

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run.adapter_dir.parent / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert all(s.part.dtype == torch.bfloat16 for s in route.shards)
    a, b = losses(local), losses(remote)
    assert len(a) == len(b) == 4 and a[0] > a[-1] and b[0] > b[-1]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 0.01
    assert abs(local.eval_loss - remote.eval_loss) <= 0.01
    # lora_B starts at zero, so it is what training learnt: the nodes' gradients must have driven it
    from safetensors.torch import load_file

    ours, ref = (load_file(str(run.adapter_dir / "adapter_model.safetensors")) for run in (remote, local))
    learnt = [k for k in ref if "lora_B" in k]
    assert learnt and all(ref[k].norm() > 0 for k in learnt)
    for k in learnt:
        assert (ours[k] - ref[k]).norm() <= 0.1 * ref[k].norm(), k
