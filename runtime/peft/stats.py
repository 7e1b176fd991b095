"""Values a method reports from inside a forward pass, such as UniPELT's gates.

A method calls `record(name, value)` wherever it computes something worth watching; the
value's mean is added to whatever `recording()` block encloses the forward (the edge's
training step locally, a node's session step on a cluster) and is otherwise dropped.
Recorders are per thread (a context variable), so concurrent sessions on a node never mix.

    >>> with recording() as seen:
    ...     record("gate.lora.3", torch.full((2, 5, 1), 0.25))
    >>> seen.means()
    {'gate.lora.3': 0.25}
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

STAT_PREFIX = "stat:"  # a node's Gradients carry recorded values under "stat:{name}" as (sum, count)

_current: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("edgetune_peft_stats", default=None)


class Recorder:
    """Sums and counts of the values recorded under each name. A sum may stay a tensor on its device
    until it is read (means / as_tensors), so recording never waits for a GPU."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: float | torch.Tensor, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def merge(self, other: Recorder) -> None:
        for name, total in other.sums.items():
            self.add(name, total, other.counts[name])

    def means(self) -> dict[str, float]:
        return {name: float(self.sums[name]) / self.counts[name] for name in sorted(self.sums) if self.counts[name] > 0}

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """name -> (sum, count), float64: how a node sends them up with its gradients."""
        return {name: torch.tensor([float(self.sums[name]), self.counts[name]], dtype=torch.float64)
                for name in self.sums}

    def add_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, pair in tensors.items():
            if pair.numel() == 2:
                self.add(name, float(pair[0]), float(pair[1]))


@contextlib.contextmanager
def recording(into: Recorder | None = None) -> Iterator[Recorder]:
    """Collect what `record` sees in this thread until the block ends."""
    recorder = Recorder() if into is None else into
    token = _current.set(recorder)
    try:
        yield recorder
    finally:
        _current.reset(token)


def record(name: str, value: torch.Tensor) -> None:
    """Add `value`'s mean (weighted by its size) under `name`, if anything is recording."""
    recorder = _current.get()
    if recorder is not None:
        v = value.detach()
        recorder.add(name, v.float().sum(dtype=torch.float64), float(v.numel()))
