"""Training over an emulated WAN: edge + 2 nodes, each in its own network namespace (benchmarks/wan.py).

    sudo python -m edgetune.benchmarks.bench_wan                  # the issue's settings (long on 2 cores)
    sudo python -m edgetune.benchmarks.bench_wan --steps 4 --batch-size 2 --seq-len 128

SmolLM2-135M (the embedded model), LoRA r=16 on every linear, B x T tokens of held-out text a
step, node-0 [0, 15) and node-1 [15, 30). Scenarios, one lab each, every hop shaped alike:

- `unshaped`: 10 Gbit/s, no added delay: the compute bound on these namespaces;
- `20mbit-50ms`: tokens/s against min(compute bound, bandwidth bound), where the bandwidth bound
  is the link's rate over the bytes per step the edge's link measured (target: >= 80%);
- `100mbit-0ms` and `100mbit-50ms`: what 50 ms of RTT adds to a step (target: <= 6 x the one-way
  delay + 10% of the 0 ms step).

Before each scenario the harness's self-check runs (RTT within 1 ms, throughput >= 95%). For
each, `edgetune plan`'s prediction (node FLOP/s calibrated on the unshaped run, as a profiler
would) is printed beside the measurement: bytes per step on the edge's link and step time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

SCENARIOS = {"unshaped": "10gbit,0ms", "20mbit-50ms": "20mbit,50ms", "100mbit-0ms": "100mbit,0ms",
             "100mbit-50ms": "100mbit,50ms"}


def _chunks(tokenizer, seq_len: int) -> list[str]:
    """benchmarks/data/heldout.txt in pieces of a little over seq_len tokens."""
    text = (Path(__file__).parent / "data" / "heldout.txt").read_text()
    ids = tokenizer.encode(text)
    return [tokenizer.decode(ids[i:i + seq_len + 8]) for i in range(0, len(ids) - seq_len - 8, seq_len)]


def _write(path: Path, chunks: list[str], rows: int) -> None:
    path.write_text("".join(json.dumps({"text": chunks[i % len(chunks)]}) + "\n" for i in range(rows)))


def _compare_loss(args, folder: Path, config, train: dict, tmp: str) -> int:
    """Eval loss after --compare-loss steps with fp32/raw traffic and with --codec/--adapter-codec, on
    the unshaped lab; the eval set is the text's last chunks, never trained on."""
    from edgetune.benchmarks import wan
    from edgetune.runtime.text.tokenizer import load_tokenizer

    chunks = _chunks(load_tokenizer(folder), args.seq_len)
    held = max(2, len(chunks) // 4)
    train_file, eval_file = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
    _write(train_file, chunks[:-held], 64)
    _write(eval_file, chunks[-held:], held)
    losses = {}
    for codec, adapter_codec in (("fp32", "raw"), (args.codec, args.adapter_codec)):
        name = f"{codec}+{adapter_codec}"
        opts = {**train, "data": str(train_file), "eval_data": str(eval_file), "steps": args.compare_loss,
                "codec": codec, "adapter_codec": adapter_codec, "out": f"{tmp}/{name}"}
        with wan.Lab(nodes=2, rate_bits=10e9, rtt_s=0.0) as lab:
            run = wan.train_through(lab, str(folder), [args.split], opts, f"{tmp}/{name}-lab", config.num_layers)
        losses[name] = run["eval_loss"]
        print(f"{name:12} eval loss after {args.compare_loss} steps: {run['eval_loss']:.4f} "
              f"(train loss {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f})", flush=True)
    raw, lossy = losses.values()
    print(f"\neval loss, {args.codec}+{args.adapter_codec} vs fp32+raw: {lossy / raw - 1:+.2%} (target: within 1%) "
          f"on {held} held-out chunks of {args.seq_len}+ tokens")
    return 0


def _calibrate(config, args, unshaped: dict | None) -> tuple[float, float]:
    """(node FLOP/s, edge FLOP/s) for the plan: the nodes' from their measured compute per step in the
    unshaped run (2 x block_flops per block and micro-batch), the edge's from timing its head here."""
    import time

    import torch

    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.plan.cost import block_flops, edge_head_flops
    from edgetune.runtime.train.loss import head_loss_sum

    b = args.batch_size // args.micro_batches
    flops = 1e11
    if unshaped and unshaped["stage_compute_s"].get("node-0"):
        work = 2 * block_flops(config, b, args.seq_len) * args.split * args.micro_batches
        flops = work / unshaped["stage_compute_s"]["node-0"]
    edge = load_model("embedded", start=0, end=0, edge=True)
    h = torch.randn(args.batch_size, args.seq_len, config.hidden_size, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        head_loss_sum(edge.final_norm(h), edge.head_weight, labels).backward()
        times.append(time.perf_counter() - start)
    return flops, edge_head_flops(config, args.batch_size, args.seq_len) / min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--split", type=int, default=15, help="node-0 serves [0, split), node-1 the rest")
    p.add_argument("--codec", default="fp32", choices=["fp32", "fp16", "bf16", "int8"], help="activations on the wire")
    p.add_argument("--adapter-codec", default="raw", choices=["raw", "bf16", "int8"])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--json", default=None)
    p.add_argument("--replan", default=None, metavar="JSON", help="no runs: compare the plan with an earlier --json")
    p.add_argument("--compare-loss", type=int, default=0, metavar="STEPS",
                   help="no timing: eval loss after STEPS steps, fp32/raw traffic vs --codec/--adapter-codec")
    args = p.parse_args(argv)
    if args.replan:
        saved = json.loads(Path(args.replan).read_text())
        args = argparse.Namespace(**{**saved["args"], "replan": args.replan, "json": None})
        return _report(args, saved["results"])

    from edgetune.benchmarks import wan
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.loader import resolve_model_folder
    from edgetune.runtime.plan.planner import parse_link
    from edgetune.runtime.text.tokenizer import load_tokenizer

    reason = wan.available()
    if reason:
        print(f"bench_wan: cannot build network namespaces here: {reason}", file=sys.stderr)
        return 2
    folder = resolve_model_folder("embedded")
    config = ModelConfig.from_file(folder / "config.json")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        data = Path(tmp) / "data.jsonl"
        _write(data, _chunks(load_tokenizer(folder), args.seq_len), 64)
        train = dict(model=str(folder), data=str(data), rank=args.rank, alpha=2.0 * args.rank,
                     target_modules="all-linear", steps=args.steps, batch_size=args.batch_size,
                     micro_batches=args.micro_batches, max_seq_len=args.seq_len, eval_fraction=0.0, save_every=0,
                     progress=False, seed=0, codec=args.codec, adapter_codec=args.adapter_codec, lr=1e-4)
        if args.compare_loss:
            return _compare_loss(args, folder, config, train, tmp)
        for name in args.scenarios.split(","):
            link = parse_link(SCENARIOS[name])
            with wan.Lab(nodes=2, rate_bits=link.rate_bits, rtt_s=link.rtt_s) as lab:
                checks = [wan.self_check(lab, hop, seconds=2.0) for hop in lab.hops] if name != "unshaped" else []
                run = wan.train_through(lab, str(folder), [args.split], {**train, "out": f"{tmp}/{name}"},
                                        f"{tmp}/{name}-lab", config.num_layers)
            steps = run["steps"][1:] or run["steps"]  # the first step also opens the session and warms up
            step_s = statistics.median(s["time_s"] for s in steps)
            stage_s = {}  # node -> median seconds of its forward + backward compute per step
            for node in ("node-0", "node-1"):
                times = [st["forward_s"] + st["backward_s"] for s in steps for st in s.get("stages", []) if st["node"] == node]
                stage_s[node] = statistics.median(times) if times else None
            results[name] = {"step_s": step_s, "tokens_per_s": args.batch_size * args.seq_len / step_s,
                             "stage_compute_s": stage_s,
                             "bytes_sent": statistics.median(s["bytes_sent"] for s in steps),
                             "bytes_received": statistics.median(s["bytes_received"] for s in steps),
                             "self_checks": checks, "proxy_p99_lateness_s": run["proxy_p99_lateness_s"],
                             "losses": run["losses"]}
            r = results[name]
            print(f"{name:13} step {step_s:7.2f} s  {r['tokens_per_s']:7.1f} tokens/s  edge link "
                  f"{r['bytes_sent'] / 2**20:6.1f} MiB out / {r['bytes_received'] / 2**20:6.1f} MiB in per step  "
                  f"proxy p99 lateness {max(run['proxy_p99_lateness_s'], default=0) * 1e3:.2f} ms", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return _report(args, results)


def _report(args, results: dict) -> int:
    """The plan beside each measurement, and the issue's ratios."""
    from edgetune.commands.plan import adapter_sizes
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.loader import resolve_model_folder
    from edgetune.runtime.plan.planner import EdgeSpec, PlanNode, Workload, parse_link, plan
    from edgetune.runtime.train.options import TrainConfig

    config = ModelConfig.from_file(resolve_model_folder("embedded") / "config.json")
    # the plan, calibrated as a profiler would: node FLOP/s from the unshaped run's measured stage
    # compute, the edge's from timing its LM head and loss here
    methods = TrainConfig(data="x", rank=args.rank, alpha=2.0 * args.rank, target_modules="all-linear").methods()
    per_block, trainable, tensors = adapter_sizes(config, methods)
    tokens = args.batch_size * args.seq_len
    flops, edge_flops = _calibrate(config, args, results.get("unshaped"))
    print("\nscenario      measured step  predicted  bound       edge link down / up: measured   predicted")
    for name, r in results.items():
        link = parse_link(SCENARIOS[name])
        nodes = [PlanNode("node-0", 8 << 30, flops, "fp32"), PlanNode("node-1", 8 << 30, flops, "fp32")]
        report = plan(config, "embedded", nodes, EdgeSpec(edge_flops), Workload(args.batch_size, args.seq_len,
                      args.micro_batches, getattr(args, "codec", "fp32"), getattr(args, "adapter_codec", "raw"),
                      tuple(per_block), trainable, tuple(tensors)), link)
        edge_hop = report.hops[0]
        r["plan"] = {"step_s": report.step_s, "bound": report.bound, "edge_link_bytes": edge_hop.down_bytes,
                     "edge_link_bytes_up": edge_hop.up_bytes, "stages": [(s.start, s.end) for s in report.stages]}
        print(f"{name:13} {r['step_s']:10.2f} s  {report.step_s:8.2f} s  {report.bound:10} "
              f"{r['bytes_sent'] / 2**20:6.1f} / {r['bytes_received'] / 2**20:4.1f} MiB  "
              f"{edge_hop.down_bytes / 2**20:6.1f} / {edge_hop.up_bytes / 2**20:4.1f} MiB "
              f"({r['bytes_sent'] / edge_hop.down_bytes - 1:+.1%} / {r['bytes_received'] / edge_hop.up_bytes - 1:+.1%}; "
              f"time {r['step_s'] / report.step_s - 1:+.0%})")
    if "unshaped" in results and "20mbit-50ms" in results:
        r = results["20mbit-50ms"]
        bandwidth_bound = 20e6 / 8 / max(r["bytes_sent"], r["bytes_received"]) * tokens
        bound = min(results["unshaped"]["tokens_per_s"], bandwidth_bound)
        print(f"\n20 Mbit/s, 50 ms: {r['tokens_per_s']:.1f} tokens/s = {r['tokens_per_s'] / bound:.0%} of "
              f"min(compute bound {results['unshaped']['tokens_per_s']:.1f}, bandwidth bound {bandwidth_bound:.1f}) "
              "(target >= 80%)")
        # what synchronous training cannot overlap: the push precedes the first forward, the first
        # stage's gradients follow its last backward (the optimizer needs them all)
        from edgetune.runtime.plan.planner import ADAPTER_CODEC_BYTES

        push_s = ADAPTER_CODEC_BYTES[getattr(args, "adapter_codec", "raw")] * trainable / (20e6 / 8)
        first = sum(per_block[:args.split]) / max(1, sum(per_block))
        floor_s = results["unshaped"]["step_s"] + push_s * (1 + first)
        print(f"  the adapter's push ({push_s:.2f} s at 20 Mbit/s) and the first stage's gradients ({push_s * first:.2f} s) "
              f"cannot overlap the step's compute: step >= {floor_s:.2f} s, i.e. at most "
              f"{tokens / floor_s / bound:.0%} of that bound")
    if "100mbit-0ms" in results and "100mbit-50ms" in results:
        base, slow = results["100mbit-0ms"]["step_s"], results["100mbit-50ms"]["step_s"]
        allowed = 6 * 0.025 + 0.1 * base
        print(f"100 Mbit/s, 0 -> 50 ms RTT: the step grows {slow - base:+.3f} s (allowed: 6 x 25 ms + 10% of "
              f"{base:.2f} s = {allowed:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
