"""What a PEFT method costs the edge and the wire, from counts of its tensors (no torch).

`edgetune methods` counts every method's tensors with the runtime's own PEFT code on fake tensors
(edgetune/commands/methods.py) and hands the counts here; this module owns the byte formulas and
the table, so a planner on a laptop can reuse them without torch.

Edge memory while training (AdamW, everything fp32), per trainable value:

    4 (master value) + 4 (gradient) + 8 (AdamW's two moments m, v) = 16 bytes

plus the tensors that never train, at their own dtype's size and with no gradient or optimizer
state: frozen block tensors (`Method.is_frozen`, e.g. a sparse mask's int64 indices), the
method's shared constants (`Method.constants`, e.g. VeRA's random projections; one copy on the
edge, not one per block) and its edge-side training state (`Method.init_state`, e.g. AdaLoRA's
importance averages).

The wire, per step with `--adapter-codec raw`: the edge pushes every non-frozen block tensor the
nodes use (`Adapter.block_tensor_views` less the frozen keys), 4 bytes a value, and the nodes send
as many gradient values back. Edge-only tensors (prompt embeddings, a prefix projection's MLP)
never cross it; derived block tensors (the projected prefixes) do. Frozen tensors cross once per
session.

    >>> c = AdapterCounts(trainable=100, frozen_bytes=80, constant_bytes=40, pushed_values=60, state_bytes=8)
    >>> edge_train_bytes(c), step_push_bytes(c)
    (1728, 240)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgetune.runtime.plan.partition import format_bytes
from edgetune.runtime.plan.planner import ADAPTER_CODEC_BYTES

MASTER_BYTES = 4  # fp32 master value
GRAD_BYTES = 4  # fp32 gradient
ADAMW_STATE_BYTES = 8  # fp32 first and second moments
TRAIN_BYTES_PER_VALUE = MASTER_BYTES + GRAD_BYTES + ADAMW_STATE_BYTES

BRANCHES = ("additive", "selective", "reparameterized", "hybrid")
OWN_TYPE_PREFIX = "EDGETUNE_"  # peft types HF PEFT does not have: saved in edgetune's own format


@dataclass(frozen=True)
class AdapterCounts:
    """An adapter's sizes, counted on its tensors (real or fake)."""

    trainable: int  # values AdamW updates: block and edge tensors, frozen ones excluded
    frozen_bytes: int  # block tensors that never train, at their dtype's size (pushed once a session)
    constant_bytes: int  # Method.constants held on the edge (rebuilt by the nodes, never pushed)
    pushed_values: int  # values of the non-frozen block tensors the nodes use (pushed every step)
    state_bytes: int = 0  # Method.init_state's tensors, kept on the edge (AdaLoRA's importance averages)


def edge_train_bytes(c: AdapterCounts) -> int:
    """The edge's bytes for the adapter while training: 16 a trainable value, plus frozen tensors,
    constants and method state."""
    return TRAIN_BYTES_PER_VALUE * c.trainable + c.frozen_bytes + c.constant_bytes + c.state_bytes


def step_push_bytes(c: AdapterCounts, codec: str = "raw") -> int:
    """Bytes the edge pushes to the nodes per step (the gradients coming back take as many)."""
    return round(ADAPTER_CODEC_BYTES[codec] * c.pushed_values)


def stack_branch(branches: Sequence[str]) -> str:
    """The survey branch of a stack of methods: a stack of several is a hybrid; '?' where a
    method names none."""
    if len(branches) > 1:
        return "hybrid"
    return branches[0] if branches and branches[0] else "?"


def peft_type_label(types: Sequence[str]) -> str:
    """'LORA', 'PREFIX_TUNING+edgetune': HF PEFT's type, 'edgetune' for edgetune's own, '-' for none."""
    labels = ["edgetune" if t.startswith(OWN_TYPE_PREFIX) else (t or "-") for t in types]
    return "+".join(dict.fromkeys(labels)) or "-"


@dataclass(frozen=True)
class MethodRow:
    """One CLI method name and what it costs on one model; `error` set (and counts None) when
    the options do not make a valid adapter of it (e.g. sparse without --density)."""

    method: str
    survey_branch: str = "?"
    counts: AdapterCounts | None = None
    mergeable: bool = False
    export: tuple[str, ...] = ()
    peft_type: str = "-"
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "counts"}
        out["export"] = list(self.export)
        if self.counts is not None:
            out.update(asdict(self.counts), edge_train_bytes=edge_train_bytes(self.counts),
                       push_bytes_per_step=step_push_bytes(self.counts),
                       grad_bytes_per_step=step_push_bytes(self.counts))
        return out


@dataclass(frozen=True)
class MethodsTable:
    model: str
    num_layers: int
    hidden_size: int
    rows: list[MethodRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "train_bytes_per_value": TRAIN_BYTES_PER_VALUE, "adapter_codec": "raw",
                "methods": [r.to_dict() for r in self.rows]}


HEADER = ("method", "branch", "trainable", "edge memory", "push/step", "once/session", "merge", "export", "peft type")
LEGEND = (
    "edge memory: trainable values x 16 B (fp32 master, gradient, AdamW m and v) + frozen tensors, constants "
    "and method state",
    "push/step: fp32 adapter values the edge sends the nodes each step (--adapter-codec raw); "
    "the gradients coming back are as large",
    "once/session: frozen block tensors (e.g. sparse indices) sent to the nodes once per session",
    "export: merged (folded into the weights), adapter-inputs (onnxruntime adapter file), "
    "graph (--mode merged writes the method as graph nodes / constant keys); - none yet",
    "peft type: the HF PEFT type it is saved as; edgetune: edgetune's own (EDGETUNE_*), which HF PEFT cannot load",
)


def _cells(r: MethodRow) -> list[str]:
    if r.counts is None:
        return [r.method, r.survey_branch, "n/a: " + r.error]
    c = r.counts
    return [r.method, r.survey_branch, f"{c.trainable:,}", format_bytes(edge_train_bytes(c)),
            format_bytes(step_push_bytes(c)), format_bytes(c.frozen_bytes) if c.frozen_bytes else "-",
            "yes" if r.mergeable else "no", ", ".join(r.export) or "-", r.peft_type]


def format_methods(table: MethodsTable) -> str:
    """The table as aligned text: a title, the columns (numbers right-aligned), a legend."""
    rows = [_cells(r) for r in table.rows]
    full = [c for c in rows if len(c) == len(HEADER)]
    widths = [max(len(x) for x in col) for col in zip(HEADER, *full)]
    numeric = {2, 3, 4, 5}

    def line(cells: list[str]) -> str:
        if len(cells) < len(HEADER):  # an error row: its message runs on past the columns
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2]])
        return "  ".join(x.rjust(w) if i in numeric else x.ljust(w) for i, (x, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"PEFT methods on {table.model} ({table.num_layers} blocks, width {table.hidden_size})", "",
           line(list(HEADER)), line(["-" * w for w in widths])]
    out += [line(c) for c in rows]
    out += ["", *LEGEND]
    return "\n".join(out)
