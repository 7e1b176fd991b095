"""A node's part of a model, held as fp32 / bf16 / int8 / nf4 and run eager / compiled, side by side.

    python -m edgetune.benchmarks.bench_node                      # the issue's setting (slow on 2 cores)
    python -m edgetune.benchmarks.bench_node --blocks 4 --batch-size 2 --seq-len 128 --rounds 2

A node serving blocks [0, --blocks) of `--model` (default: the embedded SmolLM2-135M) runs
training micro-batches through its real path (`nodes.shard.Shard`: adapter push, forward with
saved activations, backward, end of step) on the embeddings of held-out text, with LoRA
r=--rank on every linear layer, for each
variant: fp32 (the reference: eager kernels), bf16 (`--dtype bf16`), fp32 blocks with int8 and
nf4 weights (`--quantize`), `compiled` (`--kernels compiled`: torch.compile of the blocks with
the adapted linear as one autograd function), `linear-fn` (eager, but with that autograd
function: the part of compiled's gain that is not the compiler's) and, on CUDA, `fused`
(`--kernels fused`). Variants alternate within each round so they see the same machine load; the
warm-up round's seconds are printed too (for compiled: the compile).

With `--cluster-steps N` (the issue's setting: 40) it also fine-tunes the demo's LoRA on the
Fernhill facts through three local clusters of two CPU nodes each -- both fp32, then one of them
`--quantize nf4`, then both `--kernels compiled` -- and prints the final eval losses (target:
nf4's <= fp32's + 0.1 nats; compiled's equal to fp32's up to rounding).

Printed per variant: bytes of the blocks' linear weights (exact: the quantized tensors' inner
storage) and their ratio to fp32, the median seconds of one forward + backward of a
(B, T) micro-batch, its ratio to fp32, and the output's relative L2 distance from fp32's
(||out - out_fp32|| / ||out_fp32||: SmolLM2's hidden states carry outlier features in the
thousands, so absolute differences say little).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

VARIANTS = {"fp32": ("fp32", "none", "eager"), "bf16": ("bf16", "none", "eager"), "int8": ("fp32", "int8", "eager"),
            "nf4": ("fp32", "nf4", "eager"), "linear-fn": ("fp32", "none", "linear-fn"),
            "compiled": ("fp32", "none", "compiled"), "fused": ("bf16", "none", "fused")}
CPU_VARIANTS = "fp32,bf16,int8,nf4,linear-fn,compiled"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shard(model: str, blocks: int, dtype: str, quantize: str, kernels: str, device: str):
    from edgetune.nodes.shard import Shard
    from edgetune.runtime.compute.kernels import block_ops
    from edgetune.runtime.compute.precision import torch_dtype
    from edgetune.runtime.compute.quantize import quantize_blocks
    from edgetune.runtime.model.loader import load_model

    part = load_model(model, start=0, end=blocks, edge=False, dtype=torch_dtype(dtype), device=device)
    quantize_blocks(part, quantize)
    shard = Shard(f"{dtype}-{quantize}-{kernels}", model, part, "f" * 64, quantize=quantize,
                  kernels="eager" if kernels == "linear-fn" else kernels)
    if kernels == "linear-fn":  # eager execution with the compiled mode's ops
        shard.executor.ops = block_ops("compiled")
    return shard


def _text_hidden(model: str, batch: int, seq_len: int):
    """The model's own embeddings of held-out text (benchmarks/data/heldout.txt), (batch, seq_len, D):
    what a first node receives, so deviations are those of real hidden states."""
    from pathlib import Path

    import torch

    from edgetune.runtime.model.loader import load_model, resolve_model_folder
    from edgetune.runtime.text.tokenizer import load_tokenizer

    ids = load_tokenizer(resolve_model_folder(model)).encode((Path(__file__).parent / "data" / "heldout.txt").read_text())
    need = batch * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    edge = load_model(model, start=0, end=0, edge=True)
    with torch.no_grad():
        return edge.embed(torch.tensor(ids).view(batch, seq_len))


def _linear_bytes(shard) -> int:
    from edgetune.runtime.compute.quantize import tensor_bytes

    part = shard.part
    return sum(tensor_bytes(lin.weight) for i in range(part.start, part.end) for lin in part.block(i).linears().values())


def _step(shard, methods_json: str, views: dict, hidden, grad, step: int):
    """One micro-batch through the node's real path; returns (seconds, output)."""
    from edgetune.runtime.wire import messages as wire

    session = shard.open_session(wire.Open("bench", shard.model, shard.fingerprint,
                                           [wire.Hop(shard.name, "", shard.start, shard.end)], methods_json=methods_json))
    session.push_adapter(wire.AdapterPush(step + 1, views))
    _sync(hidden.device)
    start = time.perf_counter()
    out = session.forward(wire.Forward(step, 0, step + 1, True, None, hidden))
    session.backward(step, 0, grad)
    session.end_step(wire.EndStep(step, step + 1))
    _sync(hidden.device)
    seconds = time.perf_counter() - start
    shard.close_session("bench")
    return seconds, out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--blocks", type=int, default=15, help="blocks the node serves (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS) +
                   f" (default: {CPU_VARIANTS}, plus fused on CUDA)")
    p.add_argument("--cluster-steps", type=int, default=0,
                   help="also fine-tune through an fp32 and an nf4 cluster for this many steps (0: skip)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)

    import torch

    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import LoraConfig, attach_adapter
    from edgetune.runtime.peft.adapter import methods_to_json

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in (args.variants or CPU_VARIANTS + (",fused" if args.device.startswith("cuda") else "")).split(",") if v]
    shards = {v: _shard(args.model, args.blocks, *VARIANTS[v], args.device) for v in names}
    ref = load_model(args.model, start=0, end=args.blocks, edge=False)
    adapter = attach_adapter(ref, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=TARGETS))
    with torch.no_grad():
        for t in adapter.parameters():
            t.normal_(0, 0.02)  # lora_B too: a non-zero adapter, so its path costs what it does in training
    views = {k: v.detach() for k, v in adapter.block_tensor_views(range(args.blocks)).items()}
    methods_json = methods_to_json(adapter.methods)
    hidden = _text_hidden(args.model, args.batch_size, args.seq_len).to(args.device)
    g = torch.Generator().manual_seed(0)
    grad = (torch.randn(hidden.shape, generator=g) / hidden.numel() ** 0.5).to(args.device)

    times: dict[str, list[float]] = {v: [] for v in names}
    warmup: dict[str, float] = {}
    outputs = {}
    for r in range(args.rounds + 1):
        for v in names:
            seconds, outputs[v] = _step(shards[v], methods_json, views, hidden, grad, r)
            if r:  # round 0 warms up allocators and kernels (and compiles)
                times[v].append(seconds)
            else:
                warmup[v] = seconds
    base = names[0]
    rows = {}
    for v in names:
        rows[v] = {"weight_bytes": _linear_bytes(shards[v]), "step_s": statistics.median(times[v]),
                   "warmup_s": warmup[v], "speedup_vs_" + names[0]: None,
                   "rel_l2_vs_" + base: float((outputs[v] - outputs[base]).norm() / outputs[base].norm())}
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"node part: {args.blocks} blocks of {args.model}, LoRA r={args.rank} on every linear, "
          f"micro-batch {args.batch_size} x {args.seq_len}, {where}, median of {args.rounds} rounds")
    print(f"{'variant':9} {'linear weights':>15} {'vs ' + base:>8} {'fwd+bwd s':>10} {'vs ' + base:>8} "
          f"{'speedup':>8} {'warm-up s':>10} {'out rel L2':>11}")
    for v, row in rows.items():
        row["speedup_vs_" + base] = rows[base]["step_s"] / row["step_s"]
        print(f"{v:9} {row['weight_bytes'] / 2**20:12.1f} MiB {row['weight_bytes'] / rows[base]['weight_bytes']:8.3f} "
              f"{row['step_s']:10.2f} {row['step_s'] / rows[base]['step_s']:8.2f} {row['speedup_vs_' + base]:8.2f} "
              f"{row['warmup_s']:10.1f} {row['rel_l2_vs_' + base]:11.2e}")
    clusters = _cluster_runs(args.model, args.cluster_steps) if args.cluster_steps else {}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "clusters": clusters}, f, indent=2)
    return 0


def _cluster_runs(model: str, steps: int) -> dict:
    """The demo's fine-tuning through an all-fp32 cluster and one with an nf4 node; eval losses."""
    import tempfile
    from pathlib import Path

    from edgetune.commands.demo import DemoOptions, finetune_fernhill
    from edgetune.runtime.cluster.local_cluster import LocalCluster

    setups = {"fp32": [["--threads", "1"], ["--threads", "1"]],
              "nf4": [["--threads", "1"], ["--threads", "1", "--quantize", "nf4"]],
              "compiled": [["--threads", "1", "--kernels", "compiled"], ["--threads", "1", "--kernels", "compiled"]]}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        for name, nodes in setups.items():
            started = time.perf_counter()
            with LocalCluster.start(nodes, extra=["--model", model]) as cluster:
                run = finetune_fernhill(cluster, DemoOptions(model=model, steps=steps), Path(tmp) / name)
                layers = {n.name: [(h.start, h.end) for h in n.stages] for n in cluster.status().nodes}
            results[name] = {"eval_loss_before": run.eval_loss_before, "eval_loss": run.eval_loss, "layers": layers,
                             "seconds": time.perf_counter() - started}
            print(f"cluster {name}: nodes {layers}; eval loss {run.eval_loss_before:.4f} -> {run.eval_loss:.4f} "
                  f"after {steps} steps ({results[name]['seconds']:.0f} s)", flush=True)
    gap = results["nf4"]["eval_loss"] - results["fp32"]["eval_loss"]
    print(f"nf4 node: eval loss {gap:+.4f} nats vs the fp32 cluster (target <= +0.1)")
    gap = results["compiled"]["eval_loss"] - results["fp32"]["eval_loss"]
    print(f"compiled nodes: eval loss {gap:+.6f} nats vs the eager fp32 cluster (the same computation, rounded "
          f"differently); {results['compiled']['seconds']:.0f} s vs {results['fp32']['seconds']:.0f} s, compiles included")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
