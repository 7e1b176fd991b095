"""On-device generation (edgetune.runtime.onnx.generate, `edgetune generate --onnx`).

References, all independent of the code under test: transformers on the same
Hugging Face folder, onnxruntime-genai on the same export, and exports made by
onnxruntime-genai's own model builder (plus `edgetune export` for position_ids
and adapter inputs). The CLI runs in a subprocess where importing torch fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.cli import main
from edgetune.runtime.errors import AdapterError, ConfigError, ModelLoadError
from edgetune.runtime.onnx.generate import OnnxGenerator, pick_token, position_ids
from edgetune.runtime.text.sampling import SamplingConfig as Sampling
from edgetune.tests.tiny import make_tiny_folder

# onnxruntime's GroupQueryAttention needs head_dim % 16 == 0: width 64 with 4 heads -> head_dim 16
TINY = dict(hidden_size=64, intermediate_size=128)
PROMPT = [5, 17, 33, 42, 61, 7]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _builder_export(hf_folder: Path, out: Path) -> Path:
    """onnxruntime-genai's model builder, fp32 for CPU (fused GQA, no position_ids input)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "builder_cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_folder("llama", folder, **TINY)
    return folder


@pytest.fixture(scope="module")
def export_dir(hf_folder, tmp_path_factory):
    return _builder_export(hf_folder, tmp_path_factory.mktemp("builder") / "onnx")


@pytest.fixture(scope="module")
def gen(export_dir):
    return OnnxGenerator(export_dir)


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()


# ---------------------------------------------------------------- numerics against transformers
def test_greedy_generation_equals_transformers_generate(gen, hf_model):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=16)
    want = out[0, len(PROMPT):].tolist()
    streamed = []
    got = gen.generate(PROMPT, 16, on_token=streamed.append)
    assert got == want and streamed == got
    assert len(got) == 16  # no early eos: all 16 steps were compared


def test_logits_match_transformers(gen, hf_model):
    import torch

    ids = np.random.default_rng(0).integers(3, 96, size=(2, 9))
    logits, presents = gen.logits(ids)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids)).logits.numpy()
    assert logits.shape == want.shape == (2, 9, 96)
    assert np.abs(logits - want).max() <= 1e-4
    cfg = gen.config
    assert len(presents) == cfg.num_layers
    assert presents[0][0].shape == (2, cfg.num_kv_heads, 9, cfg.head_size)


def test_cached_decoding_matches_full_recompute(gen):
    ids = list(PROMPT)
    logits, past = gen.logits(np.array([ids]))
    for _ in range(8):
        ids.append(int(logits[0, -1].argmax()))
        logits, past = gen.logits(np.array([ids[-1:]]), np.ones((1, len(ids)), np.int64), past=past)
        full, _ = gen.logits(np.array([ids]))
        assert np.abs(logits[0, -1] - full[0, -1]).max() <= 1e-4


def test_onnxruntime_genai_greedy_equals_onnx_generator(gen, export_dir):
    import onnxruntime_genai as og

    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + 20)
    og_gen = og.Generator(model, params)
    og_gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not og_gen.is_done():
        og_gen.generate_next_token()
    want = [int(t) for t in og_gen.get_sequence(0)][len(PROMPT):]
    assert gen.generate(PROMPT, 20) == want


# ---------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_seeds_differ(gen):
    def sample(seed):
        return gen.generate(PROMPT, 16, greedy=False, temperature=1.5, top_p=0.95, seed=seed)

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3, 4))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)
    rng = np.random.default_rng(0)
    cfg = Sampling(greedy=False, top_p=0.7)  # 0.5 + 0.3 reaches 0.7: tokens 1 and 3 only
    draws = np.array([pick_token(logits, cfg, rng) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).mean() - 0.5 / 0.8) < 0.03
    # a top token alone above top_p always wins
    assert {pick_token(logits, Sampling(greedy=False, top_p=0.4), rng) for _ in range(50)} == {1}


def test_greedy_ties_pick_the_first_index_like_torch_argmax():
    import torch

    logits = np.array([0.0, 3.0, 1.0, 3.0, -2.0], np.float32)
    assert pick_token(logits, Sampling(), None) == int(torch.from_numpy(logits).argmax()) == 1


def test_bad_sampling_options_are_refused(gen):
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        gen.generate(PROMPT, 4, greedy=False, temperature=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        gen.generate(PROMPT, 4, top_p=1.5)
    with pytest.raises(ConfigError, match="context_length"):
        gen.generate([5] * gen.config.context_length, 4)


def test_generation_stops_at_eos_and_at_the_context_length(gen):
    free = gen.generate(PROMPT, 16, eos=())
    stop = free[5]
    got = gen.generate(PROMPT, 16, eos=[stop])
    assert got == free[:free.index(stop) + 1]
    context = gen.config.context_length
    long_prompt = (PROMPT * 40)[:context - 3]
    assert len(gen.generate(long_prompt, 16, eos=())) == 3


# ---------------------------------------------------------------- adapter inputs (edgetune export)
@pytest.fixture(scope="module")
def edgetune_exports(hf_folder, tmp_path_factory):
    """`edgetune export` of a random LoRA adapter: merged, and adapter-inputs (+ adapter.onnx_adapter);
    these graphs take position_ids, which the builder's do not."""
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.onnx.export import ExportOptions, export
    from edgetune.runtime.peft import LoraConfig, attach_adapter
    from edgetune.runtime.peft.hf_format import save_adapter
    from edgetune.tests.tiny import randomize

    root = tmp_path_factory.mktemp("edgetune_export")
    adapter = attach_adapter(load_model(hf_folder), [LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))], seed=1)
    randomize(adapter, seed=1, scale=0.3)
    save_adapter(adapter, root / "adapter")
    return {mode: export(ExportOptions(model=str(hf_folder), adapter=str(root / "adapter"), out=str(root / mode),
                                       mode=mode, context_length=128))
            for mode in ("merged", "adapter-inputs")}


def test_onnx_adapter_matches_merged_export_and_no_adapter_is_the_base(edgetune_exports, gen):
    inputs = OnnxGenerator(edgetune_exports["adapter-inputs"])
    merged = OnnxGenerator(edgetune_exports["merged"])
    adapter = edgetune_exports["adapter-inputs"] / "adapter.onnx_adapter"
    assert inputs.takes_positions and inputs.adapter_inputs
    ids = np.array([PROMPT])
    with_adapter, _ = inputs.logits(ids, adapter=adapter)
    assert np.abs(with_adapter - merged.logits(ids)[0]).max() <= 1e-4
    assert np.abs(inputs.logits(ids)[0] - gen.logits(ids)[0]).max() <= 1e-4  # zero-rank: the base model
    assert np.abs(with_adapter - gen.logits(ids)[0]).max() > 1e-2  # ... and the adapter matters
    # switching within one session: adapter, none, adapter again
    assert inputs.generate(PROMPT, 16, adapter=adapter) == merged.generate(PROMPT, 16)
    assert inputs.generate(PROMPT, 16) == gen.generate(PROMPT, 16)
    assert inputs.generate(PROMPT, 16, adapter=adapter) == merged.generate(PROMPT, 16)


def test_adapters_that_do_not_fit_are_refused(edgetune_exports, gen, tmp_path):
    import onnxruntime as ort

    inputs = OnnxGenerator(edgetune_exports["adapter-inputs"])
    with pytest.raises(AdapterError, match="not found"):
        inputs.generate(PROMPT, 2, adapter=tmp_path / "missing.onnx_adapter")
    name = next(iter(inputs.adapter_inputs))
    wrong = ort.AdapterFormat()
    wrong.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.zeros((7, 4), np.float32)),
                          "model.layers.9.mlp.up_proj.lora_A.weight": ort.OrtValue.ortvalue_from_numpy(np.zeros((64, 4), np.float32))})
    wrong.export_adapter(str(tmp_path / "wrong.onnx_adapter"))
    with pytest.raises(AdapterError, match="does not fit") as err:
        inputs.generate(PROMPT, 2, adapter=tmp_path / "wrong.onnx_adapter")
    assert name in str(err.value) and "model.layers.9.mlp.up_proj.lora_A.weight" in str(err.value)
    with pytest.raises(AdapterError, match="without adapter inputs"):
        gen.generate(PROMPT, 2, adapter=edgetune_exports["adapter-inputs"] / "adapter.onnx_adapter")


def test_position_ids_count_real_tokens():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded
    assert position_ids(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids(mask, 1).tolist() == [[2], [4]]


def test_generate_feeds_positions_and_a_growing_mask(edgetune_exports):
    """onnxruntime's CPU GroupQueryAttention derives positions from the mask and ignores
    position_ids, so no logit can catch wrong ones: check what is fed instead."""
    inputs = OnnxGenerator(edgetune_exports["adapter-inputs"])
    session, fed = inputs.session, []

    class Spy:
        def run_with_ort_values(self, names, feeds, run_options=None):
            # copies: these OrtValues wrap numpy arrays that live only during the call
            fed.append({k: feeds[k].numpy().copy() for k in ("input_ids", "attention_mask", "position_ids")})
            return session.run_with_ort_values(names, feeds, run_options)

    inputs.session = Spy()
    new = inputs.generate(PROMPT, 4, eos=())
    T = len(PROMPT)
    assert [f["position_ids"].tolist() for f in fed] == [[list(range(T))], [[T]], [[T + 1]], [[T + 2]]]
    assert [f["attention_mask"].shape for f in fed] == [(1, T), (1, T + 1), (1, T + 2), (1, T + 3)]
    assert [f["input_ids"].tolist() for f in fed] == [[PROMPT]] + [[[t]] for t in new[:3]]


# ---------------------------------------------------------------- folder / config errors
def test_missing_or_malformed_folders_are_named(export_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="folder not found"):
        OnnxGenerator(tmp_path / "nowhere")
    broken = Path(shutil.copytree(export_dir, tmp_path / "copy"))
    config = json.loads((broken / "genai_config.json").read_text())
    (broken / "genai_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="genai_config.json: not valid JSON"):
        OnnxGenerator(broken)
    bad = json.loads(json.dumps(config))
    del bad["model"]["decoder"]["head_size"]
    bad["model"]["decoder"]["inputs"]["past_key_names"] = "past.key"
    (broken / "genai_config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="head_size") as err:
        OnnxGenerator(broken)
    assert "past_key_names" in str(err.value)  # every problem in one message
    bad = json.loads(json.dumps(config))
    bad["model"]["decoder"]["num_hidden_layers"] = 3
    (broken / "genai_config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="past_key_values.2.key"):
        OnnxGenerator(broken)
    bad["model"]["decoder"].update(num_hidden_layers=2, num_key_value_heads=3)
    (broken / "genai_config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="num_key_value_heads|3, past"):
        OnnxGenerator(broken)
    (broken / "genai_config.json").write_text(json.dumps(config))
    (broken / "edgetune_export.json").write_text("[1, 2")  # edgetune's own record, damaged
    with pytest.raises(ModelLoadError, match="edgetune_export.json: not valid JSON"):
        OnnxGenerator(broken)
    (broken / "edgetune_export.json").unlink()  # other exporters write none
    (broken / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="model.onnx: ONNX model file not found"):
        OnnxGenerator(broken)


# ---------------------------------------------------------------- the CLI
def test_cli_streams_the_generators_text_without_torch(gen, export_dir, tmp_path):
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is not installed on this device')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(blocker), ENV.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert "torch is not installed on this device" in check.stderr  # the blocker works
    for extra, prompt_ids in ((["--greedy"], gen.encode("hello world")),
                              (["--chat", "--system", "be brief"], gen.chat_prompt("hello world", system="be brief"))):
        cmd = [sys.executable, "-m", "edgetune", "generate", "--onnx", str(export_dir), "--prompt", "hello world",
               "--max-new-tokens", "12", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == gen.decode(gen.generate(prompt_ids, 12)) + "\n"


def test_cli_onnx_adapter_and_sampling(edgetune_exports, capsys):
    folder = edgetune_exports["adapter-inputs"]
    inputs = OnnxGenerator(folder)
    adapter = folder / "adapter.onnx_adapter"
    args = ["generate", "--onnx", str(folder), "--prompt", "the fox", "--max-new-tokens", "10"]
    assert main([*args, "--onnx-adapter", str(adapter)]) == 0
    assert capsys.readouterr().out == inputs.decode(inputs.generate("the fox", 10, adapter=adapter)) + "\n"
    assert main([*args, "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    want = inputs.generate("the fox", 10, greedy=False, temperature=0.8, top_p=0.9, seed=3)
    assert capsys.readouterr().out == inputs.decode(want) + "\n"


def test_cli_refuses_mixed_engines_and_missing_folders(export_dir, tmp_path, capsys):
    base = ["generate", "--prompt", "hi"]
    assert main([*base, "--onnx", str(export_dir), "--model", "embedded"]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main([*base, "--onnx", str(export_dir), "--adapter", str(tmp_path)]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main([*base, "--onnx-adapter", str(tmp_path / "a.onnx_adapter")]) == 2
    assert "--onnx-adapter needs --onnx" in capsys.readouterr().err
    assert main([*base, "--onnx", str(tmp_path / "missing")]) == 1
    assert "missing: ONNX export folder not found" in capsys.readouterr().err


def test_chat_prompt_spells_special_tokens_as_text_unless_asked(gen, hf_folder):
    transformers = pytest.importorskip("transformers")
    from edgetune.tests.test_tokenizer import INJECTION, reference_chat_ids

    reference = transformers.AutoTokenizer.from_pretrained(hf_folder)  # the export's tokenizer, from the HF folder
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": INJECTION}]
    safe = gen.chat_prompt(INJECTION, system="be brief")
    unsafe = gen.chat_prompt(INJECTION, system="be brief", special_tokens_in_text=True)
    assert safe == reference_chat_ids(reference, chat, INJECTION)
    assert unsafe == list(reference.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    im_end = reference.convert_tokens_to_ids("<|im_end|>")
    assert (safe.count(im_end), unsafe.count(im_end)) == (2, 3)  # the forged turn's end only with the option


def test_cli_chat_encodes_special_tokens_as_text_unless_asked(gen, export_dir, hf_folder, monkeypatch, capsys):
    """Both engines get the prompt ids chat_prompt gives, with and without --special-tokens-in-text."""
    from edgetune.runtime.model.transformer import CausalLM
    from edgetune.tests.test_tokenizer import INJECTION

    seen = []
    monkeypatch.setattr(OnnxGenerator, "generate", lambda self, prompt, *a, **k: seen.append(list(prompt)) or [])
    monkeypatch.setattr(CausalLM, "generate", lambda self, ids, **k: seen.append(ids[0].tolist()))
    for engine in (["--onnx", str(export_dir)], ["--model", str(hf_folder)]):
        args = ["generate", *engine, "--chat", "--prompt", INJECTION, "--max-new-tokens", "1"]
        assert main(args) == 0 and main([*args, "--special-tokens-in-text"]) == 0
    safe, unsafe = gen.chat_prompt(INJECTION), gen.chat_prompt(INJECTION, special_tokens_in_text=True)
    assert safe != unsafe
    assert seen == [safe, unsafe, safe, unsafe]


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_model_builder_export_greedy_equals_transformers(tmp_path):
    import torch
    import transformers

    from edgetune.runtime.model.embedded import embedded_model_path

    folder = embedded_model_path()
    gen = OnnxGenerator(_builder_export(folder, tmp_path / "onnx"))
    ids = gen.chat_prompt("What is the capital of France?")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()
        ref = model(torch.tensor([ids])).logits.numpy()
    assert gen.generate(ids, 32) == want
    assert np.abs(gen.logits(np.array([ids]))[0] - ref).max() <= 2e-3
    assert "Paris" in gen.decode(want)
