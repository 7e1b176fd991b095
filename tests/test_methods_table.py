"""`edgetune methods`: its counts on fake tensors equal a real adapter's, its byte formulas hold on
hand-computed cases, and it covers big shapes without weights.
"""
from __future__ import annotations

import argparse
import json

import pytest

from edgetune.runtime.plan.methods import (
    TRAIN_BYTES_PER_VALUE,
    AdapterCounts,
    edge_train_bytes,
    peft_type_label,
    stack_branch,
    step_push_bytes,
)
from edgetune.runtime.train.options import METHOD_NAMES, TRAIN_DEFAULTS

# options that make every method valid (sparse needs a density; a random mask needs no data) and
# are ignored by the methods they do not concern
_OPTIONS = {k: v for k, v in {"density": 0.25, "mask": "random"}.items() if k in TRAIN_DEFAULTS}


def _methods(name: str, **options):
    from edgetune.runtime.train.options import TrainConfig

    return TrainConfig(data="-", method=name, **{**_OPTIONS, **options}).methods()


def _real_counts(adapter) -> AdapterCounts:
    """The counts straight from a real adapter's tensors, written apart from adapter_counts."""
    trainable = frozen_bytes = pushed = 0
    for method, blocks, edge in zip(adapter.methods, adapter.block_tensors, adapter.edge_tensors):
        trainable += sum(t.numel() for t in edge.values())
        for tensors in blocks.values():
            for name, t in tensors.items():
                if method.is_frozen(name):
                    frozen_bytes += t.numel() * t.element_size()
                else:
                    trainable += t.numel()
        derived = method.derive_blocks(edge, range(adapter.model_config.num_layers))
        for tensors in (derived if derived is not None else blocks).values():
            pushed += sum(t.numel() for name, t in tensors.items() if not method.is_frozen(name))
    constant_bytes = sum(t.numel() * t.element_size() for c in adapter.constants for t in c.values())
    state_bytes = sum(t.numel() * t.element_size() for st in adapter.state for t in st.values())
    return AdapterCounts(trainable, frozen_bytes, constant_bytes, pushed, state_bytes)


# -- the byte formulas --------------------------------------------------------------------------
def test_byte_formulas_on_a_hand_computed_case():
    # 50 int64 indices (frozen), 30 fp32 constants, 2 fp32 state vectors of 10
    c = AdapterCounts(trainable=1000, frozen_bytes=8 * 50, constant_bytes=4 * 30, pushed_values=900,
                      state_bytes=4 * 20)
    assert TRAIN_BYTES_PER_VALUE == 4 + 4 + 8  # master, gradient, AdamW m and v (fp32)
    assert edge_train_bytes(c) == 16 * 1000 + 400 + 120 + 80
    assert step_push_bytes(c) == 4 * 900  # raw: fp32
    assert step_push_bytes(c, "bf16") == 2 * 900


def test_lora_on_the_tiny_model_by_hand(tiny_dir):
    """Tiny Llama: 2 blocks, width 32, k/v width 16. LoRA r=8 on q (32 -> 32) and v (32 -> 16)."""
    from edgetune.commands.methods import methods_table
    from edgetune.commands.plan import load_config

    folder = str(tiny_dir("llama"))
    table = methods_table(folder, load_config(folder), {"rank": 8, "target_modules": ("q_proj", "v_proj")})
    lora = next(r for r in table.rows if r.method == "lora")
    per_block = 8 * (32 + 32) + 8 * (32 + 16)
    assert lora.counts == AdapterCounts(2 * per_block, 0, 0, 2 * per_block)
    assert edge_train_bytes(lora.counts) == 16 * 1792
    assert step_push_bytes(lora.counts) == 4 * 1792


def test_branch_and_type_labels():
    assert stack_branch(["additive", "additive"]) == "hybrid"  # a preset of several methods
    assert stack_branch(["selective"]) == "selective"
    assert stack_branch([""]) == "?"
    assert peft_type_label(["LORA"]) == "LORA"
    assert peft_type_label(["PREFIX_TUNING", "EDGETUNE_PARALLEL_ADAPTER"]) == "PREFIX_TUNING+edgetune"
    assert peft_type_label(["EDGETUNE_SERIAL_ADAPTER", "EDGETUNE_BITFIT"]) == "edgetune"


# -- fake tensors count what real ones hold -------------------------------------------------------
# every method with finetune's defaults, and the options that change where tensors live
CASES = [(name, {}) for name in METHOD_NAMES] + [("prefix", {"prefix_projection": True}),
                                                 ("dora", {"target_modules": "all-linear", "rank": 3})]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(o) or 'defaults'}" for n, o in CASES])
def test_counts_equal_a_real_adapter(tiny_dir, arch, name, options):
    from edgetune.commands.methods import adapter_counts, method_row, shapes_only
    from edgetune.commands.plan import load_config
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import Adapter

    folder = tiny_dir(arch)
    methods = _methods(name, **options)
    real = Adapter.create(load_model(folder), methods, seed=0)
    with shapes_only(load_config(str(folder))) as (edge, blocks):
        fake = Adapter.create(edge, methods, seed=0, block_source=blocks)
        fake_shapes = {k: (tuple(t.shape), t.dtype) for k, t in fake.named_tensors()}
        fake_counts = adapter_counts(fake)
        row = method_row(name, methods, edge, blocks)
    assert fake_shapes == {k: (tuple(t.shape), t.dtype) for k, t in real.named_tensors()}
    assert fake_counts == _real_counts(real) == row.counts
    assert adapter_counts(real) == row.counts
    assert row.mergeable == all(m.mergeable for m in methods)
    assert row.survey_branch == ("hybrid" if len(methods) > 1 else methods[0].survey_branch or "?")


# -- whole tables --------------------------------------------------------------------------------
def test_the_embedded_models_lora_row():
    from edgetune.commands.methods import methods_table
    from edgetune.commands.plan import load_config

    config = load_config("embedded")
    shapes = config.linear_shapes()  # name -> (out, in)
    r = 8
    expected = config.num_layers * sum(r * (o + i) for o, i in (shapes["self_attn.q_proj"], shapes["self_attn.v_proj"]))
    assert expected == 30 * (r * (576 + 576) + r * (576 + 192)) == 460_800
    table = methods_table("embedded", config, {"rank": r, "target_modules": "q_proj,v_proj"})
    assert [row.method for row in table.rows] == list(METHOD_NAMES)
    lora = next(row for row in table.rows if row.method == "lora")
    assert lora.counts.trainable == lora.counts.pushed_values == expected
    assert (lora.survey_branch, lora.mergeable, lora.peft_type) == ("reparameterized", True, "LORA")
    assert lora.export == ("merged", "adapter-inputs")


def test_a_70b_shape_without_weights():
    """Fake tensors: a 70B shape's table holds no weight or adapter memory, and its counts are exact."""
    from edgetune.commands.methods import methods_table
    from edgetune.commands.plan import load_config
    from edgetune.runtime.plan.methods import format_methods

    table = methods_table("llama-3-70b", load_config("llama-3-70b"), {"rank": 8})
    lora = next(row for row in table.rows if row.method == "lora")
    assert lora.counts.trainable == 80 * 8 * ((8192 + 8192) + (8192 + 1024))  # q, v (8 kv heads of 128)
    text = format_methods(table)
    assert "llama-3-70b (80 blocks, width 8192)" in text
    assert "16,384,000" in text
    for name in METHOD_NAMES:
        assert any(line.startswith(name + " ") for line in text.splitlines())


def test_target_modules_the_model_lacks_give_an_error_row():
    from edgetune.commands.methods import methods_table
    from edgetune.commands.plan import load_config
    from edgetune.runtime.plan.methods import format_methods

    table = methods_table("llama-3-8b", load_config("llama-3-8b"), {"target_modules": "no_such_proj"})
    lora = next(row for row in table.rows if row.method == "lora")
    assert lora.counts is None and "target" in lora.error
    assert "n/a: " in format_methods(table)


def test_json_parses(capsys):
    from edgetune.commands.methods import run_methods

    args = argparse.Namespace(**{k: None for k in TRAIN_DEFAULTS}, json=True)
    args.model, args.rank = "qwen2-7b", 4
    assert run_methods(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"], out["num_layers"], out["hidden_size"]) == ("qwen2-7b", 28, 3584)
    rows = {r["method"]: r for r in out["methods"]}
    assert list(rows) == list(METHOD_NAMES)
    lora = rows["lora"]
    assert lora["trainable"] == 28 * 4 * ((3584 + 3584) + (3584 + 512))  # q, v (4 kv heads of 128)
    assert lora["edge_train_bytes"] == 16 * lora["trainable"]
    assert lora["push_bytes_per_step"] == lora["grad_bytes_per_step"] == 4 * lora["pushed_values"]
    assert lora["export"] == ["merged", "adapter-inputs"] and lora["error"] == ""


def test_the_cli_command(capsys):
    from edgetune.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "methods" not in sub.choices:
        pytest.skip("`edgetune methods` is not wired into edgetune/cli.py yet")
    assert main(["methods", "--model", "llama-3-8b", "--rank", "16", "--target-modules", "all-linear", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    # Llama 3 8B, all seven linears of 32 blocks: (in + out) summed = 4096*2 (q, o) + (4096 + 1024)*2 (k, v)
    # + (4096 + 14336)*3 (gate, up, down)
    assert rows["lora"]["trainable"] == 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
