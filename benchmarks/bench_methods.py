"""Every PEFT method of `edgetune finetune`, trained on the Fernhill facts through one local cluster: a quality table.

    python -m edgetune.benchmarks.bench_methods --json bench_methods.json      # every method, 60 steps each
    python -m edgetune.benchmarks.bench_methods --methods lora,ia3 --steps 3    # a quick check

One `LocalCluster` (an `edgetune coordinator` and two `edgetune node` processes, 1 thread each,
mutual TLS) serves every run. Each method trains in an `edgetune finetune` subprocess of its own,
exactly as a user runs it: the demo's data and shape (the embedded SmolLM2-135M-Instruct on
examples/data/fernhill_train.jsonl, eval loss on examples/data/fernhill_eval.jsonl; batch 4 in 2
micro-batches, 128 tokens, warmup min(5, steps / 4), cosine decay), `--codec fp32 --adapter-codec raw`
so the wire changes nothing, and every other method option at finetune's default (`--extra` adds flags to
every run). The methods are `runtime/train/options.py`'s METHOD_NAMES as they are when the
benchmark runs; a method whose run fails (bad options, a crash, a timeout) is a failed row, and
the others go on.

Per method: its learning rate, one value per family (FAMILIES), picked from
what the methods' papers and peft's examples use for short runs, never tuned on the eval set;
`--lr-scale` multiplies all of them (a method not in the table gets DEFAULT_LR and says so); and
the few options where finetune's defaults do not describe the method (`method_flags`).

Per method, from the run's own files: eval loss at step 0 and after the last step (metrics.jsonl),
trainable parameters (the count finetune logs), bytes on the edge's link per step (bytes_sent +
bytes_received; median over steps, since step 1 also carries the step-0 evaluation's traffic),
s/step (median time_s) and the subprocess's wall time (start-up, both evaluations, saving).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.runtime.errors import ConfigError

MODULE = "edgetune.benchmarks.bench_methods"

# family -> (peak lr for a 60-step run, its methods, why). AdamW moves each trained value by ~lr a
# step, so the value follows how much one trained number changes the model.
FAMILIES: dict[str, tuple[float, tuple[str, ...], str]] = {
    "low-rank": (2e-3, ("lora", "dora", "adalora", "lokr"),
                 "a product of two small matrices (one starting at zero) damps each step: the demo's LoRA lr"),
    "sparse deltas": (1e-3, ("sparse",),
                      "trained numbers are base-weight entries themselves, with no product to damp a step"),
    "bottleneck": (1e-3, ("serial_adapter", "parallel_adapter"),
                   "64-wide down/up projections on every block's output (parallel: scaled by 4)"),
    "mixtures": (2e-3, ("unipelt", "mam"),
                 "most of their numbers are low-rank or bottleneck matrices: the low-rank value"),
    "vectors": (1e-2, ("ia3", "vera", "ln_tuning", "bitfit"),
                "only scale or bias vectors train: few numbers, each must move far (peft's IA3 examples)"),
    "virtual tokens": (2e-2, ("prompt", "prefix"),
                       "a few embeddings attended to by every token (prompt tuning's 3e-2, prefix's 1e-2)"),
}
DEFAULT_LR = 2e-3  # a method no family names yet


def method_flags(method: str, steps: int) -> list[str]:
    """The method's own options where finetune's defaults do not describe the method as its paper
    runs it: VeRA's rank (the paper's 256: its projections are random, so the rank buys capacity at the
    cost of no trained values), AdaLoRA's schedule scaled to the run (warm up a tenth, final budget for the
    last fifth), sparse's Fisher mask at 1 % density; everything else at finetune's defaults."""
    if method == "vera":
        return ["--rank", "256"]
    if method == "adalora":
        return ["--init-rank", "12", "--rank", "8", "--tinit", str(steps // 10), "--tfinal", str(steps // 5)]
    if method == "sparse":
        return ["--mask", "fisher", "--density", "0.01"]
    return []
NODES = [["--threads", "1"], ["--threads", "1"]]
TRAINABLE = re.compile(r"\((\d+) trainable parameters\)")


def method_lr(method: str, scale: float = 1.0) -> tuple[float, str]:
    """The peak learning rate of `method` and its family ("default" where FAMILIES does not name it)."""
    for family, (lr, methods, _) in FAMILIES.items():
        if method in methods:
            return lr * scale, family
    return DEFAULT_LR * scale, "default"


@dataclass(frozen=True)
class BenchConfig:
    """The settings every method's run shares."""

    data: str
    eval_data: str
    methods: tuple[str, ...]
    steps: int = 60
    lr_scale: float = 1.0
    model: str = "embedded"
    batch_size: int = 4  # the demo's shape
    micro_batches: int = 2
    max_seq_len: int = 128
    seed: int = 0
    timeout_s: float = 3600.0  # one method's run, start-up and evaluations included
    extra: tuple[str, ...] = ()  # more `edgetune finetune` flags, for every run

    def __post_init__(self) -> None:
        problems = [f"{k} must be positive, got {getattr(self, k)}"
                    for k in ("steps", "lr_scale", "batch_size", "micro_batches", "max_seq_len", "timeout_s")
                    if getattr(self, k) <= 0]
        problems += [f"{k} file not found: {getattr(self, k)}" for k in ("data", "eval_data")
                     if not Path(getattr(self, k)).is_file()]
        if not self.methods:
            problems.append("no method to run")
        if problems:
            raise ConfigError("bench_methods: " + "; ".join(problems))

    @property
    def warmup_steps(self) -> int:
        return min(5, self.steps // 4)  # the demo's


def finetune_args(method: str, cfg: BenchConfig, edge_args: list[str], out: Path) -> list[str]:
    """The `edgetune finetune` flags of `method`'s run."""
    lr, _ = method_lr(method, cfg.lr_scale)
    return ["finetune", *edge_args, "--model", cfg.model, "--data", cfg.data, "--eval-data", cfg.eval_data,
            "--out", str(out), "--method", method, "--lr", repr(lr), "--steps", str(cfg.steps),
            "--warmup-steps", str(cfg.warmup_steps), "--batch-size", str(cfg.batch_size),
            "--micro-batches", str(cfg.micro_batches), "--max-seq-len", str(cfg.max_seq_len), "--seed", str(cfg.seed),
            "--eval-every", "0", "--save-every", "0", "--codec", "fp32", "--adapter-codec", "raw", "--no-progress",
            *method_flags(method, cfg.steps), *cfg.extra]


# ------------------------------------------------------------------ one method
def run_method(method: str, cfg: BenchConfig, edge_args: list[str], folder: Path) -> dict:
    """Train `method` in an `edgetune finetune` subprocess; its row (`error` set where it failed)."""
    from edgetune.runtime.cluster.local_cluster import EDGETUNE, child_env
    from edgetune.tests.procs import stop_process

    lr, family = method_lr(method, cfg.lr_scale)
    row = {"method": method, "family": family, "lr": lr, "options": " ".join(method_flags(method, cfg.steps)),
           "error": None}
    log_path = folder / f"{method}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([*EDGETUNE, *finetune_args(method, cfg, edge_args, folder / method)], stdout=log,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            returncode = proc.wait(cfg.timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # a timeout, or Ctrl-C in this process: SIGTERM it, then SIGKILL what is left
            if proc.poll() is None:
                stop_process(proc, signal.SIGTERM, timeout_s=30)
    row["wall_s"] = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    found = TRAINABLE.search(text)
    row["trainable_params"] = int(found.group(1)) if found else None
    if returncode is None:
        row["error"] = f"timed out after {cfg.timeout_s:.0f} s"
    elif returncode != 0:
        row["error"] = f"exit {returncode}: {_last_line(text)}"
    else:
        try:
            row.update(read_metrics(folder / method / "metrics.jsonl"))
        except (OSError, ValueError, KeyError) as e:
            row["error"] = f"unreadable metrics.jsonl ({e})"
    return row


def _last_line(text: str) -> str:
    """What a failed run said last: finetune's `error:` line, or a traceback's exception."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def read_metrics(path: Path) -> dict:
    """Eval losses before and after, and per-step medians, from a run's metrics.jsonl."""
    steps: dict[int, dict] = {}
    evals: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record  # a replayed step's record repeats: the last one counts
        elif "eval_loss" in record:
            evals[record["step"]] = record["eval_loss"]
    if not steps:
        raise ValueError("no training step recorded")
    ordered = [steps[k] for k in sorted(steps)]
    wire = [r["bytes_sent"] + r["bytes_received"] for r in ordered if "bytes_sent" in r]
    last_eval = max((k for k in evals if k > 0), default=None)  # the final evaluation's step
    return {"eval_loss_before": evals.get(0), "eval_loss_after": None if last_eval is None else evals[last_eval],
            "train_loss_first": ordered[0]["loss"], "train_loss_last": ordered[-1]["loss"], "steps_done": len(ordered),
            "bytes_per_step": statistics.median(wire) if wire else None,
            "s_per_step": statistics.median(r["time_s"] for r in ordered)}


# ------------------------------------------------------------------ report
def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """The markdown table: one row per method, failed ones with their reason."""
    lines = ["| method | options | family | lr | trainable params | eval loss before | eval loss after | change | "
             "MiB/step | s/step | wall s | result |", "| " + " | ".join(["---"] * 12) + " |"]
    for r in rows:
        before, after = r.get("eval_loss_before"), r.get("eval_loss_after")
        change = after - before if before is not None and after is not None else None
        wire = r.get("bytes_per_step")
        result = "ok" if r["error"] is None else "FAILED: " + r["error"].replace("|", "\\|")
        lines.append(f"| {r['method']} | {r.get('options') or '-'} | {r['family']} | {r['lr']:g} | {_num(r.get('trainable_params'), ',')} | "
                     f"{_num(before, '.4f')} | {_num(after, '.4f')} | {_num(change, '+.4f')} | "
                     f"{_num(None if wire is None else wire / 2**20, '.2f')} | {_num(r.get('s_per_step'), '.2f')} | "
                     f"{r['wall_s']:.0f} | {result} |")
    return "\n".join(lines)


def format_header(cfg: BenchConfig, setup_s: float) -> str:
    return (f"{cfg.model} on {Path(cfg.data).name} (eval: {Path(cfg.eval_data).name}); {cfg.steps} steps, batch "
            f"{cfg.batch_size} in {cfg.micro_batches} micro-batches, {cfg.max_seq_len} tokens, warmup "
            f"{cfg.warmup_steps}, lr x {cfg.lr_scale:g}; codec fp32, adapter codec raw; a coordinator + "
            f"{len(NODES)} nodes (1 thread each), started in {setup_s:.0f} s"
            + (f"; extra flags: {' '.join(cfg.extra)}" if cfg.extra else ""))


# ------------------------------------------------------------------ the run
def run(cfg: BenchConfig, folder: Path) -> dict:
    """Start the cluster, train every method in turn, stop the cluster; the results."""
    from edgetune.runtime.cluster.local_cluster import LocalCluster

    started = time.perf_counter()
    cluster = LocalCluster.start(NODES, extra=["--model", cfg.model])
    rows: list[dict] = []
    try:
        edge_args = cluster.edge_args("edge")
        setup_s = time.perf_counter() - started
        _say(f"cluster up in {setup_s:.0f} s; run folders and logs in {folder}")
        for method in cfg.methods:
            rows.append(run_method(method, cfg, edge_args, folder))
            _say(_progress_line(rows[-1]))
    finally:  # nodes, then the coordinator, get SIGTERM; whatever survives is SIGKILLed
        killed = cluster.stop(check=False)
    if killed:
        _say(f"warning: the cluster left processes behind, killed: {killed}")
    return {"config": asdict(cfg), "setup_s": setup_s, "total_s": time.perf_counter() - started,
            "killed_at_stop": killed, "rows": rows}


def _progress_line(row: dict) -> str:
    if row["error"] is not None:
        return f"{row['method']}: FAILED ({row['wall_s']:.0f} s): {row['error']}"
    return (f"{row['method']}: eval loss {_num(row['eval_loss_before'], '.4f')} -> {_num(row['eval_loss_after'], '.4f')}, "
            f"{row['s_per_step']:.2f} s/step ({row['wall_s']:.0f} s)")


def _say(text: str) -> None:
    print(f"[bench_methods] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ CLI
def _parse(argv: list[str] | None) -> argparse.Namespace:
    from edgetune.commands.demo import EXAMPLES_DATA

    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every method finetune knows)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method (default: %(default)s)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every family's lr (default: %(default)s)")
    p.add_argument("--data", default=str(EXAMPLES_DATA / "fernhill_train.jsonl"))
    p.add_argument("--eval-data", default=str(EXAMPLES_DATA / "fernhill_eval.jsonl"))
    p.add_argument("--timeout-s", type=float, default=3600.0, help="longest one method's run may take")
    p.add_argument("--extra", default="", help="more finetune flags for every run, e.g. "
                   "--extra='--target-modules q_proj,k_proj,v_proj,o_proj'")
    p.add_argument("--out", default=None, help="keep run folders and logs here (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="write the configuration and every row to this file")
    return p.parse_args(argv)


def _methods(selected: str | None) -> tuple[str, ...]:
    from edgetune.runtime.train.options import METHOD_NAMES  # at run time: methods are still being added

    if selected is None:
        return tuple(METHOD_NAMES)
    names = tuple(m.strip() for m in selected.split(",") if m.strip())
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown:
        raise ConfigError(f"bench_methods: --methods {', '.join(unknown)} unknown; known: {', '.join(METHOD_NAMES)}")
    return names


def _folder(out: str | None) -> tuple[Path, bool]:
    """Where the runs go, and whether to remove it afterwards."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="bench_methods-")), True
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"bench_methods: --out {folder} is not empty (finetune refuses to overwrite a run)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, False


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    try:
        cfg = BenchConfig(data=args.data, eval_data=args.eval_data, methods=_methods(args.methods), steps=args.steps,
                          lr_scale=args.lr_scale, timeout_s=args.timeout_s, extra=tuple(shlex.split(args.extra)))
        folder, temporary = _folder(args.out)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        result = run(cfg, folder)
    except KeyboardInterrupt:  # run() has stopped the cluster and the method's run by now
        raise SystemExit("bench_methods: interrupted; no process is left running") from None
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    print(format_header(cfg, result["setup_s"]))
    print()
    print(format_table(result["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
