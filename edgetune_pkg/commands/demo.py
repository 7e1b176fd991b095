"""`edgetune demo`: the whole journey on this machine, in one command.

1. a local cluster: a coordinator and two worker nodes of different capacity -- node-small runs
   under a memory limit, which the coordinator's profiler measures, so it gets fewer blocks;
2. distributed LoRA fine-tuning of the embedded SmolLM2-135M-Instruct on the Fernhill Library
   facts (examples/data/fernhill_train.jsonl), eval loss on held-out questions before and after;
3. export to ONNX: one base graph plus the adapter as an `.onnx_adapter` file;
4. on-device generation with onnxruntime alone: the base model's and the fine-tuned model's
   answers to held-out questions, side by side; then `edgetune report` on the run.

Every process the demo starts is stopped before it returns, also on failure or Ctrl-C.
"""
from __future__ import annotations

import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from edgetune import examples
from edgetune.runtime.errors import ConfigError

# examples/data in a checkout, edgetune/examples/data (package data) in an installed wheel
EXAMPLES_DATA = Path(examples.__file__).resolve().parent / "data"


@dataclass(frozen=True)
class DemoOptions:
    out: str = "runs/demo"
    model: str = "embedded"
    data: str = str(EXAMPLES_DATA / "fernhill_train.jsonl")
    eval_data: str = str(EXAMPLES_DATA / "fernhill_eval.jsonl")
    steps: int = 60
    prompts: int = 3  # held-out questions answered side by side
    max_new_tokens: int = 48
    small_node_memory: str = "480M"  # node-small's --memory-limit: what makes the partition uneven
    lr: float = 2e-3

    def __post_init__(self) -> None:
        problems = [f"{k} must be positive, got {getattr(self, k)}"
                    for k in ("steps", "prompts", "max_new_tokens") if getattr(self, k) <= 0]
        problems += [f"{k} file not found: {getattr(self, k)}" for k in ("data", "eval_data")
                     if not Path(getattr(self, k)).is_file()]
        if problems:
            raise ConfigError("demo: " + "; ".join(problems))


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    adapter_dir: Path
    export_dir: Path
    eval_loss_before: float | None
    eval_loss_after: float | None
    answers: list[tuple[str, str, str]]  # (question, base answer, fine-tuned answer)


def run_demo(opts: DemoOptions, say=print) -> DemoResult:
    """Run the demo, printing each stage with `say`; returns where everything was written."""
    from edgetune.runtime.cluster.local_cluster import LocalCluster
    from edgetune.runtime.model.loader import resolve_model_folder
    from edgetune.runtime.train.data import load_records

    resolve_model_folder(opts.model)  # a wrong --model or held-out file fails here, before any process starts
    held_out = load_records(opts.eval_data)
    questions = _questions(held_out, opts.prompts, opts.eval_data)
    out = _fresh_folder(Path(opts.out))
    started = time.perf_counter()
    say(_banner("1. a local cluster: a coordinator and two worker nodes"))
    nodes = [["--threads", "1"], ["--threads", "1", "--memory-limit", opts.small_node_memory]]
    say(f"node-big: 1 thread, no memory limit; node-small: 1 thread, --memory-limit {opts.small_node_memory}")
    with LocalCluster.start(nodes, extra=["--model", opts.model], names=["node-big", "node-small"]) as cluster:
        say(_plan(cluster, opts.model))
        say(_banner("2. fine-tuning on the cluster (the adapter and its optimizer stay in this process)"))
        run = finetune_fernhill(cluster, opts, out / "run")
    say(f"eval loss on {len(held_out)} held-out questions: "
        f"{_fmt(run.eval_loss_before)} before -> {_fmt(run.eval_loss)} after {run.steps} steps")
    say(f"run folder: {run.out} (config.json, metrics.jsonl, checkpoints/); adapter: {run.adapter_dir}")

    say(_banner("3. export to ONNX (one base graph + the adapter as an .onnx_adapter file)"))
    export_dir = _export(opts, run.adapter_dir, out / "onnx")
    say(f"ONNX export: {export_dir} (model.onnx + model.onnx.data, adapter.onnx_adapter, genai_config.json, "
        "tokenizer)")

    say(_banner("4. on the device: onnxruntime alone, base model vs fine-tuned"))
    answers = _answers(export_dir, questions, opts.max_new_tokens)
    say(format_side_by_side(answers))
    say(_banner("5. the run, plotted"))
    say(_report(run.out))
    say(f"\ndemo finished in {time.perf_counter() - started:.0f} s; no process is left running")
    return DemoResult(run.out, run.adapter_dir, export_dir, run.eval_loss_before, run.eval_loss, answers)


DEMO_MARKER = ".edgetune-demo"


def _fresh_folder(out: Path) -> Path:
    """An empty `out`: a previous demo's folder is replaced, anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise ConfigError(f"demo: {out} exists and is not a folder an earlier demo wrote; pick another --out "
                              "(the demo replaces its folder on every run)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `edgetune demo`; the next demo run replaces this folder\n")
    return out


# -- stages ---------------------------------------------------------------------------------
def _plan(cluster, model: str) -> str:
    """Ask for the route now (the coordinator profiles the nodes and partitions the blocks) and
    show the cluster with each node's layers."""
    from edgetune.commands.status import format_status

    client = cluster.client(edge="edge")
    try:
        route = client.get_route(model)
    finally:
        client.close()
    split = ", ".join(f"{h.name} [{h.start}, {h.end})" for h in route.hops)
    return f"{format_status(cluster.status())}\n\nthe coordinator's partition of {route.num_layers} blocks: {split}"


def finetune_fernhill(cluster, opts: DemoOptions, run_dir: Path):
    """The demo's fine-tuning run on `cluster`: LoRA on the Fernhill facts (also the run that
    benchmarks/bench_node.py repeats with a quantized node)."""
    from edgetune.runtime.train.loop import TrainConfig, finetune

    cfg = TrainConfig(model=opts.model, data=opts.data, eval_data=opts.eval_data, out=str(run_dir), method="lora",
                      rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), lr=opts.lr,
                      warmup_steps=min(5, opts.steps // 4), steps=opts.steps, batch_size=4, micro_batches=2,
                      max_seq_len=128, seed=0, save_every=0, eval_every=max(1, opts.steps // 3), codec="bf16",
                      **cluster.edge_options("edge"))
    return finetune(cfg)


def _export(opts: DemoOptions, adapter_dir: Path, out: Path) -> Path:
    from edgetune.runtime.onnx.export import ExportOptions, export

    return export(ExportOptions(model=opts.model, adapter=str(adapter_dir), out=str(out), mode="adapter-inputs"))


def _answers(export_dir: Path, questions: list[str], max_new_tokens: int) -> list[tuple[str, str, str]]:
    from edgetune.runtime.onnx.export import ADAPTER_FILE
    from edgetune.runtime.onnx.generate import OnnxGenerator

    gen = OnnxGenerator(export_dir)
    rows = []
    for q in questions:
        prompt = gen.chat_prompt(q)
        base, tuned = (gen.decode(gen.generate(prompt, max_new_tokens, adapter=adapter)).strip()
                       for adapter in (None, export_dir / ADAPTER_FILE))
        rows.append((q, base, tuned))
    return rows


def _report(run_dir: Path) -> str:
    from edgetune.commands.report import write_report

    report = write_report(run_dir)
    plots = [p for p in (report.loss_png, report.throughput_png, report.nodes_png) if p is not None]
    return f"{report.summary}\nplots: {', '.join(map(str, plots))}; summary: {report.summary_txt}"


# -- formatting -------------------------------------------------------------------------------
def format_side_by_side(rows: list[tuple[str, str, str]], width: int | None = None) -> str:
    """Each question, then the two answers in two columns."""
    width = width or min(shutil.get_terminal_size((120, 40)).columns, 140)
    col = max(20, (width - 3) // 2)
    lines = []
    for q, base, tuned in rows:
        left = textwrap.wrap(base, col) or [""]
        right = textwrap.wrap(tuned, col) or [""]
        lines += ["", f"Q: {q}", f"{'base model':<{col}} | fine-tuned", f"{'-' * col}-+-{'-' * col}"]
        lines += [f"{a:<{col}} | {b}" for a, b in _zip_longest(left, right)]
    return "\n".join(lines)


def _zip_longest(a: list[str], b: list[str]):
    n = max(len(a), len(b))
    return zip(a + [""] * (n - len(a)), b + [""] * (n - len(b)))


def _questions(records, n: int, source: str) -> list[str]:
    """The first user message of the first `n` held-out chat records."""
    users = ([m.content for m in getattr(r, "messages", ()) if m.role == "user"] for r in records)
    out = [u[0] for u in users if u][:n]
    if not out:
        raise ConfigError(f"demo: {source} has no chat record with a user message to ask")
    return out


def _banner(text: str) -> str:
    return f"\n== {text} " + "=" * max(0, 78 - len(text))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
