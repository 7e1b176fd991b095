"""`edgetune demo`, shortened (4 steps, one question, 8 tokens) but otherwise the real thing: a
coordinator and two node processes, the real SmolLM2-135M, export, onnxruntime answers, report.
The answers it prints are checked against edgetune's PyTorch generation of the same model with
and without the adapter."""
from __future__ import annotations

import os
import re

import psutil
import pytest
import torch

from edgetune.commands.demo import DemoOptions, format_side_by_side, run_demo
from edgetune.tests.procs import ProcessTree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    lines: list[str] = []
    out = tmp_path_factory.mktemp("demo") / "runs"
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. the session's own Ray cluster
    try:
        result = run_demo(DemoOptions(out=str(out), steps=4, prompts=1, max_new_tokens=8), say=lines.append)
        _demo_leftovers[:] = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)
                              if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:  # whatever the demo left running (all of it, where it failed) is SIGKILLed; the earlier ones are kept
        keep = set()
        for pid in before:
            try:
                keep.add(os.getsid(pid))
            except OSError:
                pass
        new = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
        ProcessTree.of(*new, keep=keep).kill()
    return result, "\n".join(lines)


_demo_leftovers: list[str] = []


def test_demo_prints_each_stage_in_order(demo):
    _, text = demo
    marks = ["== 1. a local cluster", "node-big", "node-small", "the coordinator's partition of 30 blocks",
             "== 2. fine-tuning", "eval loss on 12 held-out questions", "run folder:", "== 3. export",
             "ONNX export:", "== 4. on the device", "Q: ", "base model", "fine-tuned", "== 5. the run, plotted",
             "plots:", "no process is left running"]
    at = 0
    for mark in marks:  # each one after the one before
        found = text.find(mark, at)
        assert found >= 0, f"{mark!r} missing after position {at}:\n{text}"
        at = found + len(mark)


def test_the_small_node_gets_fewer_blocks_from_the_profiled_memory_limit(demo):
    _, text = demo
    split = dict((name, int(end) - int(start)) for name, start, end in
                 re.findall(r"(node-\w+) \[(\d+), (\d+)\)", text.split("partition of 30 blocks:")[1].splitlines()[0]))
    assert sum(split.values()) == 30 and 0 < split["node-small"] < split["node-big"], split
    assert re.search(r"^node-small\s+alive\s+\S+\s+cpu\s+fp32\s+none\s+eager\s+1\s+480\.0 MiB", text, re.M), text  # the measured limit


def test_training_lowered_the_held_out_loss_and_wrote_everything(demo):
    result, text = demo
    assert result.eval_loss_after < result.eval_loss_before
    assert f"{result.eval_loss_before:.4f} before -> {result.eval_loss_after:.4f} after 4 steps" in text
    for path in ("config.json", "metrics.jsonl", "loss.png", "throughput.png", "nodes.png", "summary.txt"):
        assert (result.run_dir / path).stat().st_size > 0, path
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert {"model.onnx", "adapter.onnx_adapter", "genai_config.json", "tokenizer.json"} <= \
        {p.name for p in result.export_dir.iterdir()}


def test_the_answers_are_the_models_own_greedy_answers(demo):
    """onnxruntime's base and fine-tuned answers equal PyTorch greedy generation without and with the adapter."""
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft.hf_format import load_adapter
    from edgetune.runtime.text.tokenizer import load_tokenizer

    result, text = demo
    [(question, base, tuned)] = result.answers
    model = load_model("embedded")
    tok = load_tokenizer(model.source_path)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])

    def greedy() -> str:
        new = model.generate(ids, max_new_tokens=8, eos_token_ids=tok.eos_token_ids)[0, ids.shape[1]:]
        return tok.decode(new.tolist(), skip_special_tokens=True).strip()

    assert base == greedy()
    load_adapter(model, result.adapter_dir)
    assert tuned == greedy()
    assert format_side_by_side(result.answers) in text


def test_no_process_outlives_the_demo(demo):
    assert not _demo_leftovers  # every process the demo started (and theirs) is gone


def test_demo_options_are_checked_before_anything_starts(tmp_path):
    from edgetune.runtime.errors import ConfigError, ModelLoadError

    with pytest.raises(ConfigError, match="steps must be positive"):
        DemoOptions(steps=0)
    with pytest.raises(ConfigError, match="data file not found"):
        DemoOptions(data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        run_demo(DemoOptions(model=str(tmp_path / "no-model"), out=str(tmp_path / "d")), say=lambda _: None)
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not a folder an earlier demo wrote"):
        run_demo(DemoOptions(out=str(tmp_path)), say=lambda _: None)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


def test_a_second_demo_replaces_the_first_ones_folder(tmp_path):
    from edgetune.commands.demo import _fresh_folder

    out = _fresh_folder(tmp_path / "demo")  # as a first run leaves it
    (out / "stale.txt").write_text("from the last run")
    assert _fresh_folder(out) == out and not (out / "stale.txt").exists() and (out / ".edgetune-demo").exists()
