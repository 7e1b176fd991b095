"""The edge's LM head and loss for a big vocabulary: fp32 vs bf16 matmuls, chunked, side by side.

    python -m edgetune.benchmarks.bench_edge_head                  # Llama-3-8B's head: 128256 x 4096
    python -m edgetune.benchmarks.bench_edge_head --tokens 64 --rounds 2

One training micro-batch's loss and dL/dh through `train.loss.head_loss_sum` (chunks of 1024
tokens: no (B, T, V) tensor), with the head in fp32 and in bf16 (`finetune --head-dtype bf16`;
`auto` picks it where the edge multiplies bf16 natively). Random weights of the real shape.
Printed: median seconds, the ratio, the loss difference, the peak bytes one chunk of logits takes
against a whole (tokens, V) logits tensor, and what the cost model (`plan.cost.edge_head_flops`)
says the head costs next to the nodes' blocks.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

from edgetune.runtime.plan.cost import edge_head_flops

# q, o: 4096 x 4096; k, v: 1024 x 4096; gate, up, down: 14336 x 4096
LLAMA3_8B_BLOCK_WEIGHTS = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512, help="tokens in the micro-batch (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from edgetune.runtime.compute.precision import native_bf16
    from edgetune.runtime.train.loss import head_loss_sum

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(args.device)
    heads = {"fp32": weight, "bf16": weight.to(torch.bfloat16)}
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g).to(args.device)
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g).to(args.device)
    times = {k: [] for k in heads}
    losses = {}
    for r in range(args.rounds + 1):
        for name, w in heads.items():
            h = hidden.clone().requires_grad_(True)
            start = time.perf_counter()
            loss = head_loss_sum(h, w, labels)
            loss.backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - start)
            losses[name] = float(loss.detach())
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"edge LM head {args.vocab} x {args.hidden}, {args.tokens} tokens, loss + dL/dh, {where} "
          f"(native bf16: {native_bf16(args.device)}), median of {args.rounds}")
    print(f"fp32 {fp32:.3f} s   bf16 {bf16:.3f} s   bf16 speedup {fp32 / bf16:.2f}x   "
          f"loss rel diff {abs(losses['bf16'] - losses['fp32']) / abs(losses['fp32']):.1e}")
    chunk_bytes = 4 * min(1024, args.tokens) * args.vocab
    print(f"logits held at once: {chunk_bytes / 2**20:.0f} MiB (one chunk) vs {4 * args.tokens * args.vocab / 2**20:.0f} MiB "
          "unchunked (x3 with log-softmax and its gradient)")
    shape = SimpleNamespace(vocab_size=args.vocab, hidden_size=args.hidden)
    flops = edge_head_flops(shape, 1, args.tokens)
    block = 6 * args.tokens * LLAMA3_8B_BLOCK_WEIGHTS  # forward + backward of one block's linears
    print(f"cost model: head {flops / 1e9:.1f} GFLOP per micro-batch = {flops / block:.1f} Llama-3-8B blocks' "
          "forward+backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
