"""`edgetune methods`: every PEFT method finetune knows, side by side, on one model's shapes.

    edgetune methods --model llama-3-70b --rank 16 --target-modules all-linear

One row per `--method` name finetune accepts (whatever `TrainConfig.methods()` supports in this
build), with the options given here: its branch in Han et al.'s survey, trainable values, the
edge's memory for them while training, bytes on the wire per step, whether it merges and how it
exports. The counts come from the runtime's own PEFT code run on fake tensors on the meta device
(no weights are read, so a 70B shape takes seconds); the byte formulas are
runtime/plan/methods.py's.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from edgetune.commands.plan import load_config
from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.plan.methods import (
    AdapterCounts,
    MethodRow,
    MethodsTable,
    format_methods,
    peft_type_label,
    stack_branch,
)

# options of TrainConfig this command never passes on: it reads no data and trains nothing
_NOT_METHOD_OPTIONS = ("data", "model", "method")


@contextmanager
def shapes_only(config) -> Iterator[tuple[Any, Callable[[], Iterable[Any]]]]:
    """(edge model, block source) of `config` that hold no memory: fake tensors on the meta device.

    Adapter.create runs on them unchanged, methods that start from the base weights (DoRA, LN
    tuning) included: their init reads fake weights. Every adapter made from them must be made
    and counted inside this context (fake tensors belong to the mode that made them)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from edgetune.runtime.model.transformer import Block, CausalLM

    with FakeTensorMode(), torch.device("meta"):
        edge = CausalLM(config, 0, 0, edge=True)
        blocks = [Block(config, i) for i in range(config.num_layers)]
        yield edge, lambda: iter(blocks)


def adapter_counts(adapter) -> AdapterCounts:
    """An adapter's sizes (runtime/plan/methods.py's terms), real or fake tensors alike."""

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    frozen = adapter.frozen_keys()
    views = adapter.block_tensor_views(range(adapter.model_config.num_layers))  # derived ones (prefixes) too
    frozen_bytes = sum(nbytes(t) for key, t in views.items() if key in frozen)
    pushed = sum(t.numel() for key, t in views.items() if key not in frozen)
    constants = sum(nbytes(t) for shared in adapter.constants for t in shared.values())
    state = sum(nbytes(t) for st in adapter.state for t in st.values())
    return AdapterCounts(adapter.num_parameters(), frozen_bytes, constants, pushed, state)


def export_modes(adapter) -> tuple[str, ...]:
    """How `edgetune export` can write this adapter (see runtime/onnx/export.py)."""
    from edgetune.runtime.onnx.export import _lora_layers, check_exportable

    modes = []
    if all(m.mergeable for m in adapter.methods):
        modes.append("merged")
    else:
        try:
            check_exportable(adapter.methods)  # the others as graph nodes / constant keys
            modes.append("graph")
        except AdapterError:
            pass
    try:
        _lora_layers(adapter)
        modes.append("adapter-inputs")
    except AdapterError:
        pass
    return tuple(modes)


def method_row(name: str, methods: Sequence, edge, blocks: Callable[[], Iterable[Any]], seed: int = 0) -> MethodRow:
    """The row of CLI method `name` (config stack `methods`) on a model from shapes_only."""
    from edgetune.runtime.peft import Adapter

    branch = stack_branch([m.survey_branch for m in methods])
    try:
        adapter = Adapter.create(edge, list(methods), seed=seed, block_source=blocks)
    except AdapterError as e:  # e.g. target modules this model lacks
        return MethodRow(name, branch, error=str(e))
    return MethodRow(name, branch, adapter_counts(adapter), all(m.mergeable for m in methods), export_modes(adapter),
                     peft_type_label([m.peft_type for m in methods]))


def methods_table(model: str, config, options: dict[str, Any]) -> MethodsTable:
    """Every finetune method's row on the model named `model` with ModelConfig `config` (see
    commands/plan.py's load_config). `options` are TrainConfig options (rank, target_modules,
    ...) as finetune takes them; None values are not given."""
    from edgetune.runtime.train.options import METHOD_NAMES, TrainConfig, coerce_options

    given = {k: v for k, v in options.items() if v is not None and k not in _NOT_METHOD_OPTIONS}
    rows = []
    with shapes_only(config) as (edge, blocks):
        for name in METHOD_NAMES:
            try:
                cfg = TrainConfig.from_dict(coerce_options({"data": "(not read)", **given, "method": name}),
                                            source="edgetune methods")
                methods = cfg.methods()
            except ConfigError as e:  # e.g. sparse needs --density or --shira-rank
                rows.append(MethodRow(name, error=str(e).removeprefix("finetune config: ")))
                continue
            rows.append(method_row(name, methods, edge, blocks, seed=cfg.seed))
    return MethodsTable(model, config.num_layers, config.hidden_size, rows)


def run_methods(args) -> int:
    from edgetune.runtime.train.options import TRAIN_DEFAULTS

    options = {name: getattr(args, name) for name in TRAIN_DEFAULTS if hasattr(args, name)}
    table = methods_table(args.model, load_config(args.model), options)
    print(json.dumps(table.to_dict(), indent=2) if args.json else format_methods(table))
    return 0
