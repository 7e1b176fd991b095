"""Local LoRA training, edgetune vs transformers + peft, measured side by side.

    python -m edgetune.benchmarks.bench_train --steps 10 --repeats 3 --json bench_train.json

Both sides load the same fp32 Hugging Face folder (default: the embedded
SmolLM2-135M), attach the same LoRA (q_proj, v_proj, dropout 0), and run the
same AdamW steps on the same seeded random batches (B, T) with labels = inputs
(loss on every token). Each measured run is its own subprocess (`--worker`),
alternating edgetune, hf, edgetune, hf, ... so that both sides see the same
machine load; the parent prints medians and the ratios edgetune / hf.

Throughput is tokens/s over the timed steps (B * T tokens per step, warmup
steps excluded). Memory is the worker's peak RSS (`ru_maxrss`), also reported
as the increase over the RSS right after imports (torch, torch._dynamo, and
the side's own packages), because importing torch is shared while importing
transformers + peft is not. The first-step losses must agree (LoRA B starts
at zero, so both sides start from the same base model); the last ones differ
slightly because the two sides draw different random LoRA A matrices.

On a loaded machine, prefer --threads 1: with more threads than free cores,
OpenMP spin-waits make step times swing by several times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edgetune.runtime.errors import ConfigError

SIDES = ("edgetune", "hf")
TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class BenchConfig:
    """One measured run's settings; passed unchanged to every worker."""

    model: str
    steps: int = 10
    warmup: int = 2
    batch_size: int = 4
    seq_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-4
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k} must be positive, got {getattr(self, k)}"
                    for k in ("steps", "batch_size", "rank", "threads") if getattr(self, k) <= 0]
        if self.seq_len < 2:
            problems.append(f"seq_len must be at least 2 (next-token loss), got {self.seq_len}")
        if self.warmup < 0:
            problems.append(f"warmup must be >= 0, got {self.warmup}")
        if problems:
            raise ConfigError("bench_train: " + "; ".join(problems))


# ------------------------------------------------------------------ worker side
def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _batch(cfg: BenchConfig, vocab_size: int):
    """Seeded random token ids (B, T), identical on both sides."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)


def _edgetune_step(cfg: BenchConfig) -> Callable[[], float]:
    """Load edgetune's model + LoRA; return one training step (returns the loss)."""
    import torch

    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import LoraConfig, attach_adapter
    from edgetune.runtime.train.loop import batch_loss_sum

    model = load_model(cfg.model)
    adapter = attach_adapter(model, LoraConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=TARGET_MODULES))
    adapter.train()
    optimizer = torch.optim.AdamW(list(adapter.parameters()), lr=cfg.lr)
    input_ids = _batch(cfg, model.config.vocab_size)
    n_tokens = cfg.batch_size * (cfg.seq_len - 1)  # predicted positions

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss_sum(model, input_ids, input_ids) / n_tokens  # what finetune's train_step runs
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _hf_step(cfg: BenchConfig) -> Callable[[], float]:
    """Load transformers' model + peft LoRA; return one training step (returns the loss)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                           target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    input_ids = _batch(cfg, model.config.vocab_size)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        # use_cache=False: no KV cache is wanted in training (a faster, fairer baseline)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _import_side(side: str) -> None:
    """Import what a side needs before measuring the baseline RSS.

    torch._dynamo (~70 MB RSS, ~1 s) is part of the shared baseline: every
    torch.optim optimizer imports it on construction, and transformers imports
    it eagerly, so leaving it out would charge it to edgetune's increase only.
    """
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    if side == "hf":
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import edgetune.runtime.model.loader  # noqa: F401
        import edgetune.runtime.peft  # noqa: F401
        import edgetune.runtime.train.loop  # noqa: F401


def _profile_table(step: Callable[[], float], rows: int) -> str:
    """torch.profiler's top ops (by self CPU time) over one more training step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    averages = prof.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def run_worker(side: str, cfg: BenchConfig, profile_rows: int = 0) -> dict:
    """Measure one side in this process; returns a JSON-ready record.

    With profile_rows > 0, one extra (untimed) step is profiled and its top
    ops are printed to stderr.
    """
    _import_side(side)
    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rss_import = _max_rss_mb()
    t0 = time.perf_counter()
    step = (_hf_step if side == "hf" else _edgetune_step)(cfg)
    load_s = time.perf_counter() - t0
    rss_loaded = _max_rss_mb()
    losses = [step() for _ in range(cfg.warmup)]
    step_s = []
    for _ in range(cfg.steps):
        t = time.perf_counter()
        losses.append(step())
        step_s.append(time.perf_counter() - t)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    rss_peak = _max_rss_mb()  # before any profiling, which allocates on its own
    if profile_rows > 0:
        print(_profile_table(step, profile_rows), file=sys.stderr)
    return {
        "side": side, "threads": torch.get_num_threads(), "load_s": load_s,
        "tokens_per_s": tokens / sum(step_s), "step_s_median": statistics.median(step_s), "step_s": step_s,
        "rss_import_mb": rss_import, "rss_loaded_mb": rss_loaded, "rss_peak_mb": rss_peak,
        "rss_increase_mb": rss_peak - rss_import, "loss_first": losses[0], "loss_last": losses[-1],
    }


# ------------------------------------------------------------------ parent side
def _worker_command(side: str, cfg: BenchConfig) -> list[str]:
    cmd = [sys.executable, "-m", "edgetune.benchmarks.bench_train", "--worker", side]
    for key, value in asdict(cfg).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def spawn_worker(side: str, cfg: BenchConfig, profile_rows: int = 0) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is the JSON record."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    cmd = _worker_command(side, cfg) + (["--profile", str(profile_rows)] if profile_rows > 0 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if profile_rows > 0:
        print(f"--- profile of one {side} step (top {profile_rows} ops by self CPU time)\n{proc.stderr}", file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


SUMMARY_KEYS = ("tokens_per_s", "step_s_median", "rss_peak_mb", "rss_increase_mb", "rss_import_mb",
                "rss_loaded_mb", "load_s", "loss_first", "loss_last")


def summarize(runs: list[dict]) -> dict:
    """Median of each metric per side, and the edgetune / hf ratios of the headline ones."""
    med = {side: {k: statistics.median(r[k] for r in runs if r["side"] == side) for k in SUMMARY_KEYS}
           for side in SIDES}
    ratio = {k: med["edgetune"][k] / med["hf"][k] for k in ("tokens_per_s", "rss_peak_mb", "rss_increase_mb")}
    return {"median": med, "ratio_edgetune_over_hf": ratio}


def format_table(cfg: BenchConfig, runs: list[dict], summary: dict) -> str:
    med, ratio = summary["median"], summary["ratio_edgetune_over_hf"]
    lines = [f"model={cfg.model}", f"B={cfg.batch_size} T={cfg.seq_len} r={cfg.rank} alpha={cfg.alpha} "
             f"steps={cfg.steps} (+{cfg.warmup} warmup) threads={cfg.threads} runs/side={len(runs) // 2}", ""]
    lines.append(f"{'metric (median)':<22}{'edgetune':>12}{'hf+peft':>12}{'ratio e/h':>11}")
    for key in SUMMARY_KEYS:
        r = f"{ratio[key]:>11.3f}" if key in ratio else ""
        lines.append(f"{key:<22}{med['edgetune'][key]:>12.4g}{med['hf'][key]:>12.4g}{r}")
    lines.append("")
    lines.append(f"throughput ratio edgetune/hf = {ratio['tokens_per_s']:.3f} (target >= 1.0)")
    lines.append(f"peak RSS ratio   edgetune/hf = {ratio['rss_peak_mb']:.3f} (target <= 1.0); "
                 f"increase over imports {ratio['rss_increase_mb']:.3f}")
    lines.append("tokens/s per run, in run order: " + ", ".join(f"{r['side']}={r['tokens_per_s']:.0f}" for r in runs))
    return "\n".join(lines)


def run_parent(cfg: BenchConfig, repeats: int, json_path: str | None, profile_rows: int = 0) -> dict:
    """Alternate the sides for `repeats` rounds, print the table, optionally write JSON."""
    runs = []
    for i in range(repeats):
        for side in SIDES:
            runs.append(spawn_worker(side, cfg, profile_rows if i == 0 else 0))  # profile the first round only
            print(f"round {i + 1}/{repeats} {side}: {runs[-1]['tokens_per_s']:.0f} tok/s, "
                  f"peak RSS {runs[-1]['rss_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary = summarize(runs)
    print(format_table(cfg, runs, summary))
    result = {"config": asdict(cfg), "repeats": repeats, "runs": runs, **summary}
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


# --------------------------------------------------------------------------- CLI
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgetune.benchmarks.bench_train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Hugging Face folder (fp32); default: the embedded SmolLM2-135M")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (edgetune, hf) runs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides; 0 = torch.get_num_threads()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write runs and summary to this file")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print torch.profiler's top ROWS ops of one extra step per side (first round only)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(_parse(argv))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _main(args: argparse.Namespace) -> None:
    if args.repeats <= 0:
        raise ConfigError(f"bench_train: --repeats must be positive, got {args.repeats}")
    threads, model = args.threads, args.model
    # The parent resolves the defaults and passes them explicitly, so both sides get the same values.
    if threads <= 0:
        import torch

        threads = torch.get_num_threads()
    if model is None:
        from edgetune.runtime.model.embedded import embedded_model_path

        model = str(embedded_model_path())
    cfg = BenchConfig(model=model, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                      seq_len=args.seq_len, rank=args.rank, alpha=args.alpha, lr=args.lr, threads=threads, seed=args.seed)
    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, cfg, args.profile)))
    else:
        run_parent(cfg, args.repeats, args.json, args.profile)


if __name__ == "__main__":
    main()
