"""GPU node blocks: edgetune's fused path vs transformers + peft, eager and with Liger-Kernel.

    python -m edgetune.benchmarks.bench_gpu                 # Llama-3-8B-shaped, 8 blocks, bf16, B=4, T=2048
    python -m edgetune.benchmarks.bench_gpu --tiny --device cpu   # the script's own smoke run (CI)

Random weights made on the device (shapes are what speed and memory depend on), LoRA r=16 on
every linear, dropout 0, no activation checkpointing, SDPA attention, peft's adapter autocast off.
Each side runs forward + backward of the same blocks on the same hidden states; variants run one
after another with a warm-up each. Printed per variant: tokens/s, its ratio to HF eager, peak
memory; and the nf4 block-weight bytes against bf16 (targets: fused >= 1.3x HF eager,
>= 1.05x HF + Liger, peak memory <= 0.7x HF eager, nf4 <= 0.35x bf16).
"""
from __future__ import annotations

import argparse
import json
import time

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                 tie_word_embeddings=False)
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_config(shape: dict, blocks: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=blocks, attn_implementation="sdpa", **shape)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(run, device: str, rounds: int) -> tuple[float, int]:
    """Median seconds of run() after a warm-up, and the peak bytes allocated during the runs."""
    import statistics

    import torch

    run()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return statistics.median(times), peak


def _hf_side(cfg, hidden, grad, device, dtype, rank, liger: bool):
    """transformers' Llama layers + peft LoRA; returns a step function."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS),
                           autocast_adapter_dtype=False)
    inner = model.base_model.model.model
    B, T, _ = hidden.shape
    position_ids = torch.arange(T, device=device)[None].expand(B, T)

    def step():
        h = hidden.detach().requires_grad_(True)
        cos_sin = inner.rotary_emb(h, position_ids)
        out = h
        for layer in inner.layers:
            out = layer(out, position_embeddings=cos_sin, position_ids=position_ids, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return step, model


def _edgetune_side(cfg, hidden, grad, device, dtype, rank, kernels: str, quantize: str = "none", linear: str = ""):
    from dataclasses import replace

    import torch

    from edgetune.runtime.compute.adapted_linear import make_adapted_linear
    from edgetune.runtime.compute.executor import BlockExecutor
    from edgetune.runtime.compute.quantize import quantize_blocks
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.transformer import CausalLM
    from edgetune.runtime.peft import LoraConfig, attach_adapter
    from edgetune.runtime.peft.adapter import methods_to_json

    config = ModelConfig.from_hf_dict(cfg.to_dict())
    with torch.device(device):
        part = CausalLM(config, 0, config.num_layers, edge=False).to(dtype)
    for p in part.parameters():
        p.requires_grad_(False)
    methods = [LoraConfig(r=rank, alpha=2 * rank, target_modules=tuple(TARGETS))]
    adapter = attach_adapter(part, methods)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.02)
    quantize_blocks(part, quantize)
    executor = BlockExecutor(kernels)
    if linear:
        executor.ops = replace(executor.ops, linear=make_adapted_linear(linear))
    B, T, _ = hidden.shape
    ctx = part.make_context(B, T, torch.device(device))
    key = methods_to_json(methods)

    def step():
        h = hidden.detach().requires_grad_(True)
        views = adapter.for_blocks(range(part.start, part.end), None)
        out = executor.forward_blocks(part, h, ctx, views, key)
        out.backward(grad)

    return step, part


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of Llama-3-8B's shapes (smoke run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from edgetune.runtime.compute.quantize import tensor_bytes

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else LLAMA3_8B
    T = min(args.seq_len, 64) if args.tiny else args.seq_len
    cfg = _hf_config(shape, args.blocks)
    g = torch.Generator(device=args.device).manual_seed(0)
    hidden = torch.randn(args.batch_size, T, cfg.hidden_size, device=args.device, dtype=dtype, generator=g)
    grad = torch.randn(hidden.shape, device=args.device, dtype=dtype, generator=g) / hidden.numel() ** 0.5
    variants = {"hf-eager": lambda: _hf_side(cfg, hidden, grad, args.device, dtype, args.rank, liger=False)}
    if cuda:
        variants["hf-liger"] = lambda: _hf_side(cfg, hidden, grad, args.device, dtype, args.rank, liger=True)
    variants["edgetune-eager"] = lambda: _edgetune_side(cfg, hidden, grad, args.device, dtype, args.rank, "eager")
    variants["edgetune-" + ("fused" if cuda else "compiled")] = lambda: _edgetune_side(
        cfg, hidden, grad, args.device, dtype, args.rank, "fused" if cuda else "compiled")
    if cuda:  # the fused ops with the LoRA linear as cuBLAS GEMMs on W + sBA instead of the Triton GEMM
        variants["edgetune-fused-cublas"] = lambda: _edgetune_side(cfg, hidden, grad, args.device, dtype, args.rank,
                                                                   "fused", linear="torch")
    rows = {}
    tokens = args.batch_size * T
    for name, make in variants.items():
        step, model = make()
        seconds, peak = _measure(step, args.device, args.rounds)
        rows[name] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "peak_bytes": peak}
        del step, model
        if cuda:
            torch.cuda.empty_cache()
    weights = {}
    for q in ("none", "nf4"):
        _, part = _edgetune_side(cfg, hidden, grad, args.device, dtype, args.rank, "eager", q)
        weights[q] = sum(tensor_bytes(l.weight) for b in part.layers for l in b.linears().values())
        del part
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.blocks} {'tiny' if args.tiny else 'Llama-3-8B-shaped'} blocks, {dtype}, LoRA r={args.rank} all-linear, "
          f"B={args.batch_size} T={T}, {where}, median of {args.rounds}")
    base = rows["hf-eager"]
    for name, row in rows.items():
        mem = f"{row['peak_bytes'] / 2**30:7.2f} GiB ({row['peak_bytes'] / base['peak_bytes']:.2f}x)" if base["peak_bytes"] else "-"
        print(f"{name:16} {row['tokens_per_s']:10.0f} tokens/s  {row['tokens_per_s'] / base['tokens_per_s']:5.2f}x hf-eager"
              f"   peak {mem}")
    print(f"nf4 block weights: {weights['nf4'] / 2**20:.0f} MiB = {weights['nf4'] / weights['none']:.3f} of "
          f"{'bf16' if cuda else 'fp32'} ({weights['none'] / 2**20:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": where, "rows": rows, "weight_bytes": weights}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
