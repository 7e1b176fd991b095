"""`edgetune report RUN_DIR`: plots and a short text summary of a run folder.

Reads what runtime/train/loop.py writes -- `config.json` and `metrics.jsonl`, whose
lines are training steps `{step, loss, tokens, tokens_per_s, time_s, ...}`
(distributed runs add `bytes_sent`, `bytes_received` and per-node `stages`) and
evaluations `{step, eval_loss}` (step 0: before training) -- and writes
`loss.png`, `throughput.png`, `nodes.png` (distributed runs only) and
`summary.txt`.

    >>> from edgetune.commands.report import write_report
    >>> print(write_report("runs/demo").summary)

matplotlib (extra `train`) is imported only when plots are drawn, so this
module imports on a device with the base install.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.runtime.atomic import atomic_write, atomic_write_text
from edgetune.runtime.errors import ConfigError, DataError
from edgetune.runtime.jsonfile import read_json_object

__all__ = ["Report", "RunMetrics", "RunSummary", "format_summary", "read_metrics", "run_report", "summarize",
           "write_report"]

log = logging.getLogger("edgetune.report")

MB = 2**20  # bytes per "MB", as the progress bar of `edgetune finetune` counts them
_DRAWN = ("loss.png", "throughput.png", "nodes.png", "summary.txt", "gates.png")


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class StageTime:
    """One node's share of one training step (summed over the step's micro-batches)."""

    node: str
    forward_s: float
    backward_s: float


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    tokens: int
    tokens_per_s: float
    time_s: float
    bytes_sent: int | None  # None: a local step, nothing on the wire
    bytes_received: int | None
    stages: tuple[StageTime, ...]
    recorded: tuple[tuple[str, float], ...] = ()  # what methods recorded in the step's forwards (UniPELT's gates)


@dataclass(frozen=True)
class RunMetrics:
    """metrics.jsonl, parsed. A step written twice (a run resumed from an earlier
    checkpoint replays it) keeps its last record: the one the adapter reflects."""

    steps: tuple[StepRecord, ...]  # sorted by step
    evals: tuple[tuple[int, float], ...]  # (step, eval loss), sorted; step 0 = before training
    notes: tuple[str, ...]  # lines skipped and why, for the summary

    @property
    def distributed(self) -> bool:
        return any(s.bytes_sent is not None or s.stages for s in self.steps)

    @property
    def gated(self) -> bool:
        return any(name.startswith("gate.") for s in self.steps for name, _ in s.recorded)


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse a metrics.jsonl; raises DataError naming the file and line of a malformed record.

    An unterminated last line is what a run killed mid-write leaves: it is skipped
    with a warning. Any other unparsable line is an error.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is this the metrics.jsonl of an edgetune run?") from None
    chunks = text.split("\n")  # the last chunk is "" when the file ends with a newline
    steps: dict[int, StepRecord] = {}
    evals: dict[int, float] = {}
    notes: list[str] = []
    for lineno, line in enumerate(chunks, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(chunks):
                note = f"line {lineno}: skipped an unfinished last line (the run stopped while writing it)"
                log.warning("%s, %s", path, note)
                notes.append(f"{path.name} {note}")
                continue
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                            "fix or delete that line and run the report again") from None
        _add_record(obj, f"{path}, line {lineno}", steps, evals)
    if not steps:
        what = f"only {len(evals)} evaluation line(s)" if evals else "no records"
        raise DataError(f"{path} has {what} and no training step: the run stopped before its first step "
                        "finished; report on it once a step has been written")
    return RunMetrics(tuple(steps[k] for k in sorted(steps)), tuple(sorted(evals.items())), tuple(notes))


def _add_record(obj: Any, where: str, steps: dict[int, StepRecord], evals: dict[int, float]) -> None:
    step = obj.get("step") if isinstance(obj, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise DataError(f"{where}: expected a JSON object with a non-negative integer 'step', got "
                        f"{_short(obj)}; was this file written by `edgetune finetune`?")
    if "loss" not in obj and "eval_loss" not in obj:
        raise DataError(f"{where}: neither 'loss' (a training step) nor 'eval_loss' (an evaluation) in "
                        f"{_short(obj)}; was this file written by `edgetune finetune`?")
    if "loss" in obj:
        steps[step] = _step_record(obj, where)
    if obj.get("eval_loss") is not None:  # None: the run had no held-out examples
        evals[step] = _number(obj, "eval_loss", where)


def _step_record(obj: dict, where: str) -> StepRecord:
    distributed = "bytes_sent" in obj or "stages" in obj
    stages = obj.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("node"), str) for s in stages):
        raise DataError(f"{where}: 'stages' must be a list of {{node, forward_s, backward_s}} objects, "
                        f"got {_short(stages)}")
    return StepRecord(
        step=obj["step"], loss=_number(obj, "loss", where), tokens=int(_number(obj, "tokens", where)),
        tokens_per_s=_number(obj, "tokens_per_s", where), time_s=_number(obj, "time_s", where),
        bytes_sent=int(_number(obj, "bytes_sent", where)) if distributed else None,
        bytes_received=int(_number(obj, "bytes_received", where)) if distributed else None,
        stages=tuple(StageTime(s["node"], _number(s, "forward_s", where), _number(s, "backward_s", where))
                     for s in stages),
        recorded=_recorded(obj, where))


def _recorded(obj: dict, where: str) -> tuple[tuple[str, float], ...]:
    values = obj.get("recorded", {})
    if not isinstance(values, dict):
        raise DataError(f"{where}: 'recorded' must be an object of name -> number, got {_short(values)}")
    return tuple((str(name), _number(values, name, where)) for name in sorted(values))


def _number(obj: dict, key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problem = "missing" if key not in obj else f"{value!r} is not a number"
        raise DataError(f"{where}: {key!r} {problem}; was this file written by `edgetune finetune`?")
    return float(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- summary
@dataclass(frozen=True)
class NodeTime:
    node: str
    forward_s: float  # mean seconds per step, over the steps the node took part in
    backward_s: float
    steps: int


@dataclass(frozen=True)
class RunSummary:
    """The numbers summary.txt reports."""

    run_dir: Path
    model: str | None  # None: no config.json
    method: str | None
    coordinator: str | None  # None or "": a local run
    steps: int
    first_step: int
    last_step: int
    first_loss: float
    last_loss: float
    first_eval: tuple[int, float] | None  # (step, loss); step 0 = before training
    last_eval: tuple[int, float] | None
    median_tokens_per_s: float
    mb_sent: float | None  # None: a local run
    mb_received: float | None
    nodes: tuple[NodeTime, ...]  # in route order
    step_time_s: float  # summed time of the training steps (excludes eval, checkpoints and start-up)
    notes: tuple[str, ...]


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, or {} (with a warning) when the folder has none."""
    path = run_dir / "config.json"
    if not path.exists():
        log.warning("%s: no config.json; the summary will not name the model and method", run_dir)
        return {}
    return read_json_object(path, DataError, "restore it, or delete it and run the report again")


def summarize(metrics: RunMetrics, config: dict[str, Any], run_dir: Path) -> RunSummary:
    steps = metrics.steps
    sent = [s.bytes_sent for s in steps if s.bytes_sent is not None]
    received = [s.bytes_received for s in steps if s.bytes_received is not None]
    notes = list(metrics.notes)
    if not metrics.distributed:
        notes.append("nodes.png not drawn: a local run has no per-node timings")
    return RunSummary(
        run_dir=run_dir, model=config.get("model"), method=config.get("method"), coordinator=config.get("coordinator"),
        steps=len(steps), first_step=steps[0].step, last_step=steps[-1].step,
        first_loss=steps[0].loss, last_loss=steps[-1].loss,
        first_eval=metrics.evals[0] if metrics.evals else None, last_eval=metrics.evals[-1] if metrics.evals else None,
        median_tokens_per_s=statistics.median(s.tokens_per_s for s in steps),
        mb_sent=sum(sent) / MB if sent else None, mb_received=sum(received) / MB if received else None,
        nodes=_node_times(steps), step_time_s=math.fsum(s.time_s for s in steps), notes=tuple(notes))


def _node_times(steps: tuple[StepRecord, ...]) -> tuple[NodeTime, ...]:
    per_node: dict[str, list[tuple[float, float]]] = {}  # node -> [(forward_s, backward_s) per step]
    for s in steps:
        for node, (f, b) in _per_step(s).items():
            per_node.setdefault(node, []).append((f, b))
    return tuple(NodeTime(node, statistics.fmean(f for f, _ in t), statistics.fmean(b for _, b in t), len(t))
                 for node, t in per_node.items())


def _per_step(step: StepRecord) -> dict[str, tuple[float, float]]:
    """node -> (forward_s, backward_s) of one step; a node holding two stages of a route counts both."""
    times: dict[str, tuple[float, float]] = {}
    for st in step.stages:
        f, b = times.get(st.node, (0.0, 0.0))
        times[st.node] = (f + st.forward_s, b + st.backward_s)
    return times


def format_summary(s: RunSummary) -> str:
    where = f"distributed through {s.coordinator}" if s.coordinator else "local"
    lines = [f"run          {s.run_dir}",
             f"model        {s.model or '? (no config.json)'}",
             f"method       {s.method or '?'}, {where}",
             f"steps        {s.steps} (step {s.first_step} to {s.last_step})",
             f"train loss   first {s.first_loss:.4f} (step {s.first_step}), last {s.last_loss:.4f} (step {s.last_step})"]
    if s.first_eval is None:
        lines.append("eval loss    none (no held-out examples: eval_fraction 0 or too little data)")
    else:
        first = "before training" if s.first_eval[0] == 0 else f"step {s.first_eval[0]}"
        line = f"eval loss    first {s.first_eval[1]:.4f} ({first})"
        if s.last_eval != s.first_eval:
            line += f", last {s.last_eval[1]:.4f} (step {s.last_eval[0]})"
        lines.append(line)
    lines.append(f"tokens/s     median {s.median_tokens_per_s:.1f}")
    if s.mb_sent is not None:
        lines.append(f"wire         sent {s.mb_sent:.2f} MB, received {s.mb_received:.2f} MB (MB = 2^20 bytes)")
    for i, n in enumerate(s.nodes):
        label = "nodes" if i == 0 else ""
        lines.append(f"{label:<12} {n.node}: forward {n.forward_s:.4f} s, backward {n.backward_s:.4f} s "
                     f"per step (mean of {n.steps} steps)")
    lines.append(f"wall time    {s.step_time_s:.2f} s in training steps (without evaluation, checkpoints, start-up)")
    for i, note in enumerate(s.notes):
        lines.append(f"{'notes' if i == 0 else '':<12} {note}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots
def _figure(rows: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("edgetune report draws with matplotlib, which is not installed: "
                          "pip install 'edgetune[train]' (or pip install matplotlib)") from None
    fig = Figure(figsize=(8, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_loss(metrics: RunMetrics, path: Path, title: str) -> None:
    fig, (ax,) = _figure()
    ax.plot([s.step for s in metrics.steps], [s.loss for s in metrics.steps], label="training loss")
    if metrics.evals:
        ax.plot([e[0] for e in metrics.evals], [e[1] for e in metrics.evals], linestyle=":", marker="o",
                label="eval loss (step 0: before training)")
    ax.set(xlabel="step", ylabel="loss (mean per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_throughput(metrics: RunMetrics, path: Path, title: str) -> None:
    fig, axes = _figure(2 if metrics.distributed else 1)
    steps = [s.step for s in metrics.steps]
    axes[0].plot(steps, [s.tokens_per_s for s in metrics.steps], marker=".")
    axes[0].set(ylabel="tokens/s", title=title)
    if metrics.distributed:
        sent = [_mb(s.bytes_sent) for s in metrics.steps]
        received = [_mb(s.bytes_received) for s in metrics.steps]
        axes[1].bar(steps, sent, label="sent")
        axes[1].bar(steps, received, bottom=sent, label="received")
        axes[1].set(ylabel="MB on the wire per step")
        axes[1].legend()
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_nodes(metrics: RunMetrics, path: Path, title: str) -> None:
    """One line per node and phase: solid forward, dashed backward, one colour per node."""
    fig, (ax,) = _figure()
    per_step = [_per_step(s) for s in metrics.steps]
    steps = [s.step for s in metrics.steps]
    nodes = [n.node for n in _node_times(metrics.steps)]
    for i, node in enumerate(nodes):
        color = f"C{i % 10}"
        # NaN where the node was not on the step's route: the line breaks there
        forward = [t[node][0] if node in t else math.nan for t in per_step]
        backward = [t[node][1] if node in t else math.nan for t in per_step]
        ax.plot(steps, forward, color=color, label=f"{node} forward")
        ax.plot(steps, backward, color=color, linestyle="--", label=f"{node} backward")
    ax.set(xlabel="step", ylabel="seconds per step", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not over them
    _save(fig, path)


def plot_gates(metrics: RunMetrics, path: Path, title: str) -> None:
    """UniPELT's gates: per kind (lora, prefix, adapter) the mean over layers, solid, and each layer faint."""
    fig, (ax,) = _figure()
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}  # kind -> layer -> (step, mean gate)
    for s in metrics.steps:
        for name, value in s.recorded:
            parts = name.split(".")
            if parts[0] == "gate" and len(parts) == 3:
                series.setdefault(parts[1], {}).setdefault(parts[2], []).append((s.step, value))
    for i, (kind, layers) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        for points in layers.values():
            ax.plot(*zip(*points), color=color, alpha=0.15, linewidth=0.8)
        by_step: dict[int, list[float]] = {}
        for points in layers.values():
            for step, value in points:
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[t]) / len(by_step[t]) for t in steps], color=color,
                label=f"{kind} gate (mean of {len(layers)} layers)")
    ax.set(xlabel="step", ylabel="mean gate value", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _mb(n: int | None) -> float:
    return math.nan if n is None else n / MB


# ---------------------------------------------------------------- entry points
@dataclass(frozen=True)
class Report:
    """What write_report wrote: the files (nodes_png is None for a local run) and the summary."""

    run_dir: Path
    out: Path
    loss_png: Path
    throughput_png: Path
    nodes_png: Path | None
    summary_txt: Path
    summary: str
    stats: RunSummary
    gates_png: Path | None = None  # runs whose method has gates (unipelt)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Draw the plots and write summary.txt for the run folder `run_dir` into `out` (default: `run_dir`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist: give the --out folder of an `edgetune finetune` run")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl: is it the --out folder of an `edgetune finetune` run? "
                          "(a run writes it when its first step finishes)")
    metrics = read_metrics(metrics_path)
    config = read_config(run_dir)
    stats = summarize(metrics, config, run_dir)
    out = Path(out) if out is not None else run_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    title = f"{run_dir.name}: {stats.method or '?'} on {Path(stats.model).name if stats.model else '?'}"
    loss_png, throughput_png, nodes_png, summary_txt, gates_png = (out / name for name in _DRAWN)
    plot_loss(metrics, loss_png, title)
    plot_throughput(metrics, throughput_png, title)
    if metrics.distributed:
        plot_nodes(metrics, nodes_png, title)
    else:
        nodes_png = None
    if metrics.gated:
        plot_gates(metrics, gates_png, title)
    else:
        gates_png = None
    summary = format_summary(stats)
    atomic_write_text(summary_txt, summary)
    return Report(run_dir, out, loss_png, throughput_png, nodes_png, summary_txt, summary, stats, gates_png)


def run_report(args) -> int:
    """`edgetune report RUN_DIR [--out DIR]`: write the report and print the summary."""
    report = write_report(args.run_dir, args.out)
    print(report.summary, end="")
    written = [p for p in (report.loss_png, report.throughput_png, report.nodes_png, report.gates_png,
                           report.summary_txt) if p]
    print(f"wrote {', '.join(p.name for p in written)} to {report.out}")
    return 0
