"""examples/deploy_edge: the standalone chat app (onnxruntime + tokenizers + numpy) on an
`edgetune export --mode adapter-inputs` folder, switching between two .onnx_adapter files.

The app runs as a user runs it: a subprocess where `import torch`, `import transformers` and
`import edgetune` fail, fed a scripted chat on stdin. Each answer's token ids are compared
with edgetune's own generator (OnnxGenerator) on the same folder and adapter, computed here.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.cli import main
from edgetune.runtime.onnx.export import write_onnx_adapter
from edgetune.runtime.onnx.generate import OnnxGenerator
from edgetune.tests.tiny import CHATML_TEMPLATE, make_tiny_folder, randomize

APP = Path(__file__).resolve().parents[1] / "examples" / "deploy_edge" / "app.py"
TINY = dict(hidden_size=64, intermediate_size=128)  # GroupQueryAttention: head_dim % 16 == 0
TARGETS = ("q_proj", "v_proj", "down_proj")
P1, P2 = "hello world, how are you today?", "the quick brown fox"
NEW = 12
# SmolLM2-135M-Instruct's template (the embedded model's tokenizer_config.json): ChatML with a default system turn
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model, two random LoRA adapters of different ranks, exported once with adapter
    inputs (adapter a as adapter.onnx_adapter) plus b written as b.onnx_adapter."""
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import LoraConfig, attach_adapter
    from edgetune.runtime.peft.hf_format import save_adapter

    root = tmp_path_factory.mktemp("deploy_edge")
    make_tiny_folder("llama", root / "base", **TINY)
    adapters = {}
    for name, rank, seed in (("a", 4, 1), ("b", 2, 2)):
        model = load_model(root / "base")
        adapters[name] = (attach_adapter(model, [LoraConfig(r=rank, alpha=8, target_modules=TARGETS)], seed=seed), model)
        randomize(adapters[name][0], seed=seed, scale=0.3)
    save_adapter(adapters["a"][0], root / "adapter-a")
    out = root / "export"
    assert main(["export", "--model", str(root / "base"), "--adapter", str(root / "adapter-a"), "--out", str(out),
                 "--mode", "adapter-inputs"]) == 0
    write_onnx_adapter(*adapters["b"], out / "b.onnx_adapter")
    return out


@pytest.fixture(scope="module")
def gen(export):
    return OnnxGenerator(export)


def _blocked_env(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment where importing each of `modules` raises ImportError (a shadowing package
    ahead of everything on sys.path), as on a device that never installed them."""
    blocker = tmp_path / "blocked"
    for module in modules:
        (blocker / module).mkdir(parents=True, exist_ok=True)
        (blocker / module / "__init__.py").write_text(f"raise ImportError('{module} is not installed on this device')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(blocker)}
    for module in modules:
        check = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env)
        assert f"{module} is not installed on this device" in check.stderr  # the blocker works
    return env


def _app(export: Path, env: dict, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APP), str(export), "--max-new-tokens", str(NEW), "--threads", "1", *args],
                          input=stdin, capture_output=True, text=True, env=env, cwd=export.parent, timeout=120)


def _answers(stdout: str) -> list[tuple[str, list[int]]]:
    """(streamed text, token ids) of each answer: the line before each `ids:` line, and that line."""
    lines = stdout.splitlines()
    return [(lines[i - 1], [int(t) for t in line.split()[1:]]) for i, line in enumerate(lines) if line.startswith("ids:")]


def _reference(gen, messages, adapter=None, **sampling):
    ids = gen.tokenizer.encode(gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                               add_special_tokens=False)
    return gen.generate(ids, NEW, adapter=adapter, **sampling)


# ---------------------------------------------------------------- the app's dependencies
def test_app_imports_only_onnxruntime_tokenizers_numpy_and_the_standard_library():
    tree = ast.parse(APP.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"onnxruntime", "tokenizers", "numpy", "jinja2"}  # jinja2: optional, imported in a try


# ---------------------------------------------------------------- a scripted chat
def test_chat_switches_adapters_and_each_answer_is_edgetunes_greedy_generation(export, gen, tmp_path):
    env = _blocked_env(tmp_path, "torch", "transformers", "edgetune")
    a, b = export / "adapter.onnx_adapter", export / "b.onnx_adapter"
    script = [P1, P2, f"/adapter {a}", P1, f"/adapter {b}", f"/adapter {tmp_path / 'missing.onnx_adapter'}", P1,
              "/adapter none", P1, "/quit"]
    done = _app(export, env, "--print-ids", stdin="\n".join(script) + "\n")
    assert done.returncode == 0, done.stderr
    answers = _answers(done.stdout)

    user1 = [{"role": "user", "content": P1}]
    base = _reference(gen, user1)
    second_turn = _reference(gen, [*user1, {"role": "assistant", "content": gen.decode(base)},
                                   {"role": "user", "content": P2}])  # the conversation goes on
    with_a, with_b = _reference(gen, user1, adapter=a), _reference(gen, user1, adapter=b)
    assert [ids for _, ids in answers] == [base, second_turn, with_a, with_b, base]
    assert [text for text, _ in answers] == [gen.decode(ids) for ids in (base, second_turn, with_a, with_b, base)]
    assert len({tuple(base), tuple(with_a), tuple(with_b)}) == 3  # the adapters change the answer
    assert "missing.onnx_adapter: adapter file not found; adapter unchanged" in done.stdout


def test_one_shot_prompt_with_seeded_sampling_and_no_jinja2(export, gen, tmp_path):
    """Without jinja2 the app formats ChatML itself; sampling with a seed draws what edgetune draws."""
    env = _blocked_env(tmp_path, "torch", "transformers", "edgetune", "jinja2")
    b = export / "b.onnx_adapter"
    sampling = dict(temperature=1.3, top_p=0.9, seed=3)
    flags = ["--temperature", "1.3", "--top-p", "0.9", "--seed", "3", "--system", "be brief"]
    done = _app(export, env, "--prompt", P1, "--adapter", str(b), "--print-ids", *flags)
    assert done.returncode == 0, done.stderr
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": P1}]
    want = _reference(gen, messages, adapter=b, greedy=False, **sampling)
    assert _answers(done.stdout) == [(gen.decode(want), want)]
    assert want != _reference(gen, messages, adapter=b)  # sampled, not greedy


def test_a_template_that_is_not_chatml_is_refused_without_jinja2(export, tmp_path):
    folder = Path(shutil.copytree(export, tmp_path / "llama3"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_TEMPLATE}))
    done = _app(folder, _blocked_env(tmp_path, "jinja2"), "--prompt", P1)
    assert done.returncode == 2
    assert "not ChatML and jinja2 is not installed" in done.stderr and done.stdout == ""


# ---------------------------------------------------------------- the ChatML fallback, in process
def _load_app():
    spec = importlib.util.spec_from_file_location("deploy_edge_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE], ids=["chatml", "smollm2"])
def test_chatml_fallback_renders_like_the_template(template, export):
    from tokenizers import Tokenizer as Backend

    from edgetune.runtime.text.tokenizer import Tokenizer

    reference = Tokenizer(Backend.from_file(str(export / "tokenizer.json")), chat_template=template)
    chatml = _load_app().chatml
    for messages in ([{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                     [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "What is 2+2?"}]):
        assert chatml(template, messages) == reference.apply_chat_template(messages, add_generation_prompt=True)


def test_chatml_fallback_refuses_templates_it_cannot_follow():
    chatml = _load_app().chatml
    with pytest.raises(ValueError, match="not ChatML"):
        chatml(LLAMA3_TEMPLATE, [{"role": "user", "content": "Hi!"}])
    coded = "{{ '<|im_start|>system\n' + tools | join(',') + '<|im_end|>\n' }}" + CHATML_TEMPLATE
    with pytest.raises(ValueError, match="system message in code"):
        chatml(coded, [{"role": "user", "content": "Hi!"}])
