"""The embedded SmolLM2-135M-Instruct (GGUF, Q4_1) end to end: parity with transformers, training, CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder():
    from edgetune.runtime.model.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="module")
def prompt_ids(folder):
    from edgetune.runtime.text.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea, then explain `def f(x): return x * 2` in one line."}],
        add_generation_prompt=True)
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def test_logits_match_transformers_gguf_loader(folder, prompt_ids):
    import transformers

    from edgetune.runtime.model.embedded import embedded_gguf_path
    from edgetune.runtime.model.loader import load_model

    gguf = embedded_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model = load_model(folder)
    with torch.no_grad():
        theirs = ref(prompt_ids).logits[0]
        ours = model(prompt_ids)[0]
    del ref
    assert ours.shape == theirs.shape == (prompt_ids.shape[1], 49152)
    assert (ours - theirs).abs().max().item() <= 2e-3
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2
    assert clear.sum() > prompt_ids.shape[1] // 2  # most positions are decisive, so the check has teeth
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


def test_a_node_share_holds_its_share_of_the_weights(folder):
    from edgetune.runtime.model.loader import load_model

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    third = load_model(folder, start=10, end=20, edge=False)
    edge = load_model(folder, start=0, end=0, edge=True)
    full = load_model(folder)
    all_blocks = nbytes(full) - nbytes(edge)
    del full
    # 30 blocks of equal size: a node with 10 of them holds one third of the block weights, no edge weights
    assert abs(nbytes(third) / all_blocks - 1 / 3) < 1e-9
    assert nbytes(edge) > 0
    assert len(list(third.blocks())) == 10 and not hasattr(third, "embed_tokens")


def test_short_finetune_and_generate_via_cli(folder, tmp_path):
    """The quick start's commands, shortened: LoRA steps on examples/data, then chat with the adapter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "edgetune", "finetune", "--local", "--model", "embedded",
         "--data", str(REPO / "examples" / "data" / "assistant.jsonl"), "--method", "lora", "--rank", "4",
         "--steps", "3", "--batch-size", "2", "--max-seq-len", "96", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    gen = subprocess.run(
        [sys.executable, "-m", "edgetune", "generate", "--model", "embedded", "--adapter", str(out / "adapter"),
         "--chat", "--prompt", "What is edgetune?", "--greedy", "--max-new-tokens", "12"],
        capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(gen.stdout.strip()) > 0


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's Python API block, executed as written (so it cannot rot)."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- our own documentation
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
    assert namespace["logits"].shape[-1] == 49152
    prompt_len = len(namespace["tok"].encode(namespace["prompt"], add_special_tokens=False))
    assert namespace["out"].shape[1] > prompt_len  # it generated
