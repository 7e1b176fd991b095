"""Kernels (`--kernels eager|compiled|fused`): every faster op against the PyTorch reference.

- the adapted linear as one autograd function (LoRA, rsLoRA, (IA)^3 both sides) equals
  `BlockAdapter.linear` in outputs and all gradients; what it does not cover falls back to it;
- torch.compile (inductor) of the blocks equals eager for LoRA, prefix tuning and the serial
  adapter, aot_eager for every other method: logits and adapter gradients within 1e-5 relative;
- a compiled node never recompiles after warm-up (new adapter versions, steps, blocks);
- Triton's GEMM with a low-rank epilogue, run by Triton's interpreter on the CPU in fp32
  (a subprocess: TRITON_INTERPRET must be set before Triton compiles anything).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetune.nodes.shard import Shard
from edgetune.runtime.compute.adapted_linear import fusable, make_adapted_linear
from edgetune.runtime.compute.executor import BlockExecutor, bucket
from edgetune.runtime.compute.kernels import KERNELS, block_ops, check_kernels, describe, resolve_kernels
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.model.transformer import REFERENCE_OPS, CausalLM
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
)
from edgetune.runtime.peft.adapter import block_adapters, methods_to_json
from edgetune.tests.node_harness import shard_step
from edgetune.tests.tiny import randomize, tiny_hf_config

ALL = "all-linear"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


def _model(layers: int = 2, seed: int = 0) -> CausalLM:
    cfg = ModelConfig.from_hf_dict(tiny_hf_config("llama", hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=layers).to_dict())
    gen = torch.Generator().manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.add_(1.0)
    return model


# ----------------------------------------------------------------------------- modes
def test_modes_resolve_per_device(monkeypatch):
    assert KERNELS == ("auto", "eager", "compiled", "fused")
    assert resolve_kernels("auto", "cpu") == "eager" and resolve_kernels("auto", "cuda:0") == "fused"
    assert resolve_kernels("compiled", "cpu") == "compiled"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="--kernels fused runs Triton kernels on CUDA devices; this one is cpu"):
        resolve_kernels("fused", "cpu")
    with pytest.raises(ConfigError, match="choose one of auto, eager, compiled, fused"):
        check_kernels("triton")
    assert set(describe(REFERENCE_OPS).values()) == {"reference"}
    compiled = describe(block_ops("compiled"))
    assert compiled["linear"] == "autograd function" and compiled["rms_norm"] == "reference"


# --------------------------------------------------------------------- adapted linear
LINEAR_CASES = {
    "lora": [LoraConfig(r=4, alpha=8, target_modules=ALL)],
    "rslora": [LoraConfig(r=4, alpha=8, target_modules=ALL, use_rslora=True)],
    "ia3": [IA3Config(target_modules=ALL, feedforward_modules=("down_proj",))],
}


def _linear_views(model, methods, dropout_key=None, seed=1):
    adapter = attach_adapter(model, methods, seed=0)
    randomize(adapter, seed=seed)
    views = block_adapters(adapter.methods, adapter.block_tensor_views([0]), [0], dropout_key)
    return adapter, views[0]


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("name", ["self_attn.k_proj", "mlp.down_proj"])
def test_the_adapted_linear_function_equals_the_reference(case, name):
    model = _model(layers=1)
    adapter, view = _linear_views(model, LINEAR_CASES[case])
    layer = model.block(0).get_submodule(name)
    assert fusable(view, name, layer.weight) is not None
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    g = torch.randn(2, 5, layer.out_features)
    tensors = list(adapter.parameters())
    ref = view.linear(name, x, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad(ref, [x, *tensors], g, allow_unused=True)
    got = make_adapted_linear("torch")(view, name, layer, x)
    assert "Backward" in type(got.grad_fn).__name__ and got.grad_fn.__class__.__name__.startswith(("_Lora", "_IA3"))
    got_grads = torch.autograd.grad(got, [x, *tensors], g, allow_unused=True)
    assert _rel(got, ref) <= 1e-6
    for r, o in zip(ref_grads, got_grads):
        assert (r is None) == (o is None)
        if r is not None and r.abs().max() > 0:
            assert _rel(o, r) <= 1e-5


def test_what_the_function_does_not_cover_runs_the_reference():
    name = "self_attn.q_proj"
    cases = {
        "dora": ([LoraConfig(r=4, target_modules=ALL, use_dora=True)], None),
        "dropout in training": ([LoraConfig(r=4, target_modules=ALL, dropout=0.1)], (1, 2, 3)),
        "two methods on one linear": ([LoraConfig(r=4, target_modules=ALL), IA3Config(target_modules=ALL,
                                                                                       feedforward_modules=())], None),
        "an unknown method beside": ([LoraConfig(r=4, target_modules=ALL), BitFitConfig()], None),
    }
    for label, (methods, key) in cases.items():
        model = _model(layers=1)
        _, view = _linear_views(model, methods, dropout_key=key)
        layer = model.block(0).get_submodule(name)
        assert fusable(view, name, layer.weight) is None, label
        x = torch.randn(2, 5, 64)
        assert torch.equal(make_adapted_linear("torch")(view, name, layer, x), view.linear(name, x, layer.weight, layer.bias))
    # dropout configured but not drawn (evaluation): the function covers it
    model = _model(layers=1)
    _, view = _linear_views(model, [LoraConfig(r=4, target_modules=ALL, dropout=0.1)])
    assert fusable(view, name, model.block(0).self_attn.q_proj.weight) is not None


# ------------------------------------------------------------------------- compiled
COMPILE_CASES = {  # method stack, torch.compile backend
    "lora": ([LoraConfig(r=4, alpha=8, target_modules=ALL)], "inductor"),
    "prefix": ([PrefixTuningConfig(num_virtual_tokens=3)], "inductor"),
    "serial_adapter": ([SerialAdapterConfig(bottleneck_size=8)], "inductor"),
    "rslora": ([LoraConfig(r=4, alpha=8, target_modules=ALL, use_rslora=True)], "aot_eager"),
    "dora": ([LoraConfig(r=4, target_modules=("q_proj", "down_proj"), use_dora=True)], "aot_eager"),
    "ia3": ([IA3Config()], "aot_eager"),
    "prompt": ([PromptTuningConfig(num_virtual_tokens=3)], "aot_eager"),
    "ln_tuning": ([LNTuningConfig()], "aot_eager"),
    "parallel_adapter": ([ParallelAdapterConfig(bottleneck_size=8)], "aot_eager"),
    "bitfit": ([BitFitConfig()], "aot_eager"),
    "mam": ([PrefixTuningConfig(num_virtual_tokens=3), ParallelAdapterConfig(bottleneck_size=8)], "aot_eager"),
}


def _logits_and_grads(model, adapter, ids, attention_mask=None):
    logits = model(ids, attention_mask=attention_mask)
    target = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    tensors = list(adapter.parameters())
    grads = torch.autograd.grad((logits * target).sum(), tensors)
    return logits.detach(), dict(zip([n for n, _ in adapter.named_tensors()], grads))


@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_compiled_blocks_equal_eager_blocks(case):
    methods, backend = COMPILE_CASES[case]
    model = _model()
    adapter = attach_adapter(model, methods, seed=0)
    randomize(adapter, seed=2, scale=0.05)  # adapter deltas the size of trained ones
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(3))  # 13 tokens: padded to 64
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding: an explicit attention mask through the compiled blocks
    ref = [_logits_and_grads(model, adapter, ids), _logits_and_grads(model, adapter, ids, mask)]
    executor = BlockExecutor("compiled", backend=backend)
    model.runner = executor.runner(methods_to_json(methods))
    got = [_logits_and_grads(model, adapter, ids), _logits_and_grads(model, adapter, ids, mask)]
    assert executor.variants() == 1  # one function: both blocks, with and without a mask
    for (ref_logits, ref_grads), (logits, grads) in zip(ref, got):
        assert _rel(logits, ref_logits) <= 1e-5
        assert grads.keys() == ref_grads.keys()
        for name, r in ref_grads.items():
            if r.abs().max() > 0:
                assert _rel(grads[name], r) <= 1e-5, name
            else:
                assert grads[name].abs().max() == 0, name


def test_sequence_lengths_share_a_bucket():
    assert [bucket(t) for t in (1, 63, 64, 65, 200)] == [64, 64, 64, 128, 256]


def _node(model, kernels, backend="aot_eager"):
    part = CausalLM(model.config, 0, 2, edge=False)
    part.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("layers.")}, strict=False)
    for p in part.parameters():
        p.requires_grad_(False)
    shard = Shard("n", "m", part, "f" * 64, kernels=kernels)
    if kernels == "compiled":
        shard.executor = BlockExecutor("compiled", backend=backend)
    return shard


def test_a_compiled_node_never_recompiles_after_warm_up():
    model = _model()
    methods = [LoraConfig(r=4, alpha=8, target_modules=ALL)]
    adapter = attach_adapter(model, methods, seed=0)
    shard = _node(model, "compiled")
    methods_json = methods_to_json(methods)
    views = adapter.block_tensor_views([0, 1])
    hidden = torch.randn(2, 64, 64)
    session, *_ = shard_step(shard, methods_json, views, hidden, torch.randn(2, 64, 64))  # warm-up: compiles
    leaves = dict(session.tensors)
    with torch.compiler.set_stance("fail_on_recompile"):
        for version in range(2, 5):  # new adapter versions and steps, same shapes
            randomize(adapter, seed=version)
            pushed = {k: v.detach() for k, v in adapter.block_tensor_views([0, 1]).items()}
            session.push_adapter(wire_push(version, pushed))
            out = session.forward(wire_forward(version, hidden))
            session.backward(version, 0, torch.randn_like(out))
            grads, _ = session.end_step(wire_end(version))
            assert len(grads) == 2 * 2 * 7
            assert all(session.tensors[k] is leaves[k] for k in leaves)  # persistent buffers: copied into, not replaced
            assert all(torch.equal(session.tensors[k], pushed[k]) for k in pushed)
        assert shard.executor.variants() == 1
        # the check is live: a new batch size would recompile, and does raise
        with pytest.raises(Exception, match="[Rr]ecompil"):
            session.forward(wire_forward(4, torch.randn(3, 64, 64)))


def wire_push(version, tensors):
    from edgetune.runtime.wire import messages as wire

    return wire.AdapterPush(version, tensors)


def wire_forward(version, hidden):
    from edgetune.runtime.wire import messages as wire

    return wire.Forward(version, 0, version, True, None, hidden)


def wire_end(version):
    from edgetune.runtime.wire import messages as wire

    return wire.EndStep(version, version)


def test_a_compiled_node_computes_what_an_eager_node_does():
    model = _model()
    methods = [LoraConfig(r=4, alpha=8, target_modules=ALL), IA3Config()]
    adapter = attach_adapter(model, methods, seed=0)
    randomize(adapter, seed=4, scale=0.05)
    views = adapter.block_tensor_views([0, 1])
    hidden, grad_out = torch.randn(2, 40, 64), torch.randn(2, 40, 64)
    runs = [shard_step(_node(model, k), methods_to_json(methods), views, hidden, grad_out) for k in ("eager", "compiled")]
    (_, ref_out, ref_in, ref_grads), (_, out, grad_in, grads) = runs
    assert _rel(out, ref_out) <= 1e-5 and _rel(grad_in, ref_in) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * (2 * 7 + 3)
    for k, r in ref_grads.items():
        assert _rel(grads[k], r) <= 1e-5, k


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dropout_draws_eagers_masks_without_recompiling(backend):
    """Dropout keys change every step; compiled blocks take them hashed, as a tensor input."""
    model = _model()
    methods = [LoraConfig(r=4, alpha=8, target_modules=ALL, dropout=0.3)]
    adapter = attach_adapter(model, methods, seed=0)
    randomize(adapter, seed=5, scale=0.05)
    views = adapter.block_tensor_views([0, 1])
    hidden, grad_out = torch.randn(2, 40, 64), torch.randn(2, 40, 64)  # 40 tokens: not a bucket's length
    compiled = _node(model, "compiled", backend=backend)
    for step, key in enumerate([(1, 2, 0), (1, 3, 1), (1, 4, 0)]):
        ref = shard_step(_node(model, "eager"), methods_to_json(methods), views, hidden, grad_out, dropout_key=key)
        stance = "fail_on_recompile" if step else "default"  # the first step compiles
        with torch.compiler.set_stance(stance):
            got = shard_step(compiled, methods_to_json(methods), views, hidden, grad_out, dropout_key=key)
        assert _rel(got[1], ref[1]) <= 1e-5 and _rel(got[2], ref[2]) <= 1e-5  # the same masks
        for k, r in ref[3].items():
            assert _rel(got[3][k], r) <= 1e-5, k
    assert compiled.executor.variants() == 1
    without = shard_step(_node(model, "eager"), methods_to_json(methods), views, hidden, grad_out)
    assert _rel(without[1], ref[1]) > 1e-3  # and the masks are real


# --------------------------------------------------------------------------- triton
TRITON_SCRIPT = r"""
import torch
from edgetune.runtime.compute.triton_lora import gemm_lowrank, lora_linear
from edgetune.runtime.compute.executor import BlockExecutor
from edgetune.tests.test_kernels import _model, _logits_and_grads, _rel, ALL
from edgetune.runtime.peft import LoraConfig, IA3Config, attach_adapter
from edgetune.tests.tiny import randomize

gen = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=gen)
# the kernel: odd sizes (masks on every edge), a transposed weight view, bias or none
x, w, u, v, b = r(37, 40), r(48, 40), r(37, 5), r(48, 5), r(48)
y = gemm_lowrank(x, w, u, v, 0.7, b)
assert _rel(y, x @ w.T + 0.7 * u @ v.T + b) < 1e-6, "kernel"
wt = r(40, 48).T  # (48, 40), strides (1, 48)
assert _rel(gemm_lowrank(x, wt, u, v, 1.5), x @ wt.T + 1.5 * u @ v.T) < 1e-6, "strided"
# the autograd function: output and the gradients of x, A and B
xx = r(2, 9, 40).requires_grad_(True)
A, B = r(5, 40).requires_grad_(True), r(48, 5).requires_grad_(True)
g = r(2, 9, 48)
got = lora_linear(xx, w, b, A, B, 0.5)
ref = xx @ w.T + b + 0.5 * (xx @ A.T) @ B.T
assert _rel(got, ref) < 1e-6, "lora forward"
for a, c in zip(torch.autograd.grad(got, [xx, A, B], g), torch.autograd.grad(ref, [xx, A, B], g)):
    assert _rel(a, c) < 1e-5, "lora backward"
# a whole model's blocks with --kernels fused (Liger does not run interpreted: its ops stay reference)
model = _model()
methods = [LoraConfig(r=4, alpha=8, target_modules=ALL), IA3Config()]
adapter = attach_adapter(model, methods, seed=0)
randomize(adapter, seed=2, scale=0.05)  # adapter deltas the size of trained ones
ids = torch.randint(3, 96, (2, 11), generator=gen)
ref_logits, ref_grads = _logits_and_grads(model, adapter, ids)
model.runner = BlockExecutor("fused").runner()
logits, grads = _logits_and_grads(model, adapter, ids)
assert _rel(logits, ref_logits) < 1e-5, "fused logits"
for k, c in ref_grads.items():
    assert _rel(grads[k], c) < 1e-5, k
print("triton interpreted: ok")
"""


def test_the_triton_lora_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton interpreted: ok" in result.stdout


@pytest.mark.gpu
def test_fused_kernels_on_cuda_equal_eager():
    """--kernels fused on a GPU: Liger's RMSNorm / RoPE / SwiGLU and the Triton LoRA GEMM, fp32."""
    model = _model().cuda()
    methods = [LoraConfig(r=4, alpha=8, target_modules=ALL), IA3Config()]
    adapter = attach_adapter(model, methods, seed=0)
    randomize(adapter, seed=2, scale=0.05)
    ids = torch.randint(3, 96, (2, 37), generator=torch.Generator().manual_seed(3)).cuda()
    ref_logits, ref_grads = _logits_and_grads(model, adapter, ids)
    executor = BlockExecutor("fused")
    model.runner = executor.runner()
    logits, grads = _logits_and_grads(model, adapter, ids)
    assert _rel(logits, ref_logits) <= 1e-5
    for k, r in ref_grads.items():
        assert _rel(grads[k], r) <= 1e-4, k
    print("fused ops:", describe(executor.ops))


@pytest.mark.gpu
def test_the_triton_lora_kernel_in_bf16_on_cuda():
    from edgetune.runtime.compute.triton_lora import lora_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 200, 512, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    W = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16, generator=gen) / 512 ** 0.5
    A = (torch.randn(16, 512, device="cuda", dtype=torch.bfloat16, generator=gen) / 512 ** 0.5).requires_grad_(True)
    B = (torch.randn(768, 16, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.1).requires_grad_(True)
    g = torch.randn(3, 200, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
    got = lora_linear(x, W, None, A, B, 2.0)
    ref = (x.float() @ W.float().T + 2.0 * (x.float() @ A.float().T) @ B.float().T)
    assert _rel(got.float(), ref) <= 1e-2
    for a, c in zip(torch.autograd.grad(got, [x, A, B], g),
                    torch.autograd.grad(ref, [x, A, B], g.float())):
        assert _rel(a.float(), c) <= 2e-2


def test_the_gpu_benchmark_runs_its_cpu_smoke_configuration(tmp_path, capsys):
    """bench_gpu's own CPU run (scripts/gpu_check.sh runs the real one on a GPU): every variant
    runs, hf-eager is the baseline, the nf4 weights are a fraction of the plain ones."""
    from edgetune.benchmarks import bench_gpu

    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--tiny", "--device", "cpu", "--blocks", "2", "--batch-size", "2", "--rounds", "1",
                           "--json", str(out)]) == 0
    import json

    figures = json.loads(out.read_text())
    assert list(figures["rows"]) == ["hf-eager", "edgetune-eager", "edgetune-compiled"]
    assert all(row["tokens_per_s"] > 0 for row in figures["rows"].values())
    assert figures["weight_bytes"]["nf4"] < 0.2 * figures["weight_bytes"]["none"]
    assert "x hf-eager" in capsys.readouterr().out


def test_the_gpu_check_script_says_there_is_no_gpu_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run its checks")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0 and "no CUDA GPU here" in result.stdout
