"""edgetune's Tokenizer against transformers' tokenizers (the reference) on the same folders.

Fast tests use a tiny byte-level BPE built here with the `tokenizers` library;
slow ones use the embedded SmolLM2 model, converted from its GGUF, and compare
with both transformers' AutoTokenizer on the converted folder and transformers'
own GGUF tokenizer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from edgetune.runtime.errors import TokenizerError
from edgetune.runtime.text.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "",
    "Hello world",
    "café naïve résumé Ünïcödé — «quotes»",
    "日本語のテキスト、中文，한국어",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\n    else:\n        pass\n",
    "many   spaces\n\n\n\nand\r\nnewlines \t \n  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "x<|im_start|><|im_start|>y<|im_end|<|im_end|>z",
    "numbers 12345 3.14159 1,000,000 and can't won't I'll",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Écris un poème 🎉\n\tindenté"}, {"role": "assistant", "content": "Voici…  deux espaces"},
     {"role": "user", "content": "<|im_start|> inside text"}],
]


# ---------------------------------------------------------------- a tiny tokenizer folder
def tiny_folder(folder: Path, config: dict | None = None, template_file: str | None = None, bos_eos: bool = False) -> Path:
    """Byte-level BPE (256 byte characters + a few merges) with four special tokens;
    with `bos_eos`, tokenizer.json's post-processor wraps every text in <s> ... </s>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "Ġ"), ("e", "r")]
    vocab = {tok: i for i, tok in enumerate(alphabet + ["".join(m) for m in merges])}
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    if bos_eos:
        ids = [("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))]
        backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B", special_tokens=ids)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    return folder


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def assert_same_tokenizer(ours, reference, texts=TEXTS) -> None:
    assert ours.vocab_size == len(reference)
    for text in texts:
        ids = reference(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def assert_same_chat(ours, reference, conversations=CONVERSATIONS) -> None:
    for chat in conversations:
        for gen in (False, True):
            expected = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected


# ---------------------------------------------------------------- fast: tiny folders
@pytest.mark.parametrize("config, bos_eos", [
    (None, False),
    (None, True),
    ({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, False),  # transformers 5 ignores the flag ...
    ({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}, True),  # ... both ways
    ({"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "pad_token": "<pad>"}, False),
    ({"eos_token": "</s>", "added_tokens_decoder": {
        "270": {"content": "<tool>", "special": False, "normalized": False, "lstrip": False, "rstrip": False,
                "single_word": False}}}, False),
], ids=["no-config", "json-adds-bos-eos", "config-add-bos", "config-no-bos", "pad-not-in-tokenizer-json",
        "added-tokens-decoder"])
def test_encode_decode_match_transformers(tmp_path, config, bos_eos):
    folder = tiny_folder(tmp_path / "tok", config, bos_eos=bos_eos)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert_same_tokenizer(ours, reference, TEXTS + ["a <pad> b <tool> c </s>"])
    assert ours.bos_token_id == reference.bos_token_id and ours.pad_token_id == reference.pad_token_id
    assert ours.eos_token_ids == (() if reference.eos_token_id is None else (reference.eos_token_id,))


RICH_TEMPLATE = """{{ bos_token }}{% set ns = namespace(sys=none, n=0) %}
{% for m in messages %}
  {% if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m['role'] not in ['user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
<|im_start|>{{ m['role'] }} #{{ ns.n }}{% if ns.sys %} (sys: {{ ns.sys | trim }}){% endif %}

  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}
  {% if m.tool_calls is defined %}{{ m.tool_calls | tojson }}{{ m.tool_calls | tojson(indent=2) }}{% endif %}
  {% if m['role'] == 'user' and loop.index > 3 %}{% break %}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant ({{ strftime_now('%Y') }}) {{ dict(a=1) | tojson }}
{% endif %}{{ eos_token }}"""

RICH_CHATS = CONVERSATIONS + [[
    {"role": "user", "content": "weather <b>&'\"?"},
    {"role": "assistant", "content": None, "tool_calls": [{"name": "get", "arguments": {"city": "Zürich <&>"}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "user", "content": "thanks"}, {"role": "user", "content": "cut here"}, {"role": "user", "content": "never"},
]]


def test_chat_template_features_match_transformers(tmp_path):
    folder = tiny_folder(tmp_path / "tok", {"bos_token": "<s>", "eos_token": "</s>", "chat_template": RICH_TEMPLATE})
    ours, reference = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert_same_chat(ours, reference, RICH_CHATS)


def test_template_file_wins_over_config(tmp_path):
    folder = tiny_folder(tmp_path / "tok", {"chat_template": "{{ 'from config' }}"}, template_file=CHATML)
    ours, reference = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == CHATML
    assert_same_chat(ours, reference)


def test_save_round_trip(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    original = load_tokenizer(tiny_folder(tmp_path / "a", config, template_file=CHATML, bos_eos=True))
    saved = original.save(tmp_path / "b")
    (saved / "chat_template.jinja").write_text("stale")  # a stale file must not win after the next save
    original.save(saved)
    again, reference = load_tokenizer(saved), transformers.AutoTokenizer.from_pretrained(saved)
    assert again.chat_template == CHATML
    for text in TEXTS:
        assert again.encode(text) == original.encode(text) == reference(text).input_ids
    assert_same_chat(again, reference)
    assert (again.bos_token_id, again.eos_token_ids, again.pad_token_id) == (
        original.bos_token_id, original.eos_token_ids, original.pad_token_id)


# ---------------------------------------------------------------- errors
def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"empty[/\\]tokenizer.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "empty")
    folder = tiny_folder(tmp_path / "tok")
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(folder)
    folder = tiny_folder(tmp_path / "tok2")
    (folder / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON"):
        load_tokenizer(folder)


def test_chat_template_errors(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    no_template = load_tokenizer(tiny_folder(tmp_path / "none", {}))
    with pytest.raises(TokenizerError, match="has no chat template"):
        no_template.apply_chat_template(chat)
    raising = load_tokenizer(tiny_folder(tmp_path / "raise", {}, template_file="{{ raise_exception('no users here') }}"))
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: chat template failed to render: .*no users here"):
        raising.apply_chat_template(chat)
    broken = load_tokenizer(tiny_folder(tmp_path / "broken", {"chat_template": "{% for m in messages %}"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json 'chat_template': chat template does not parse"):
        broken.apply_chat_template(chat)
    unsafe = load_tokenizer(tiny_folder(tmp_path / "unsafe", {}, template_file="{{ messages.__class__.__mro__ }}"))
    with pytest.raises(TokenizerError, match="failed to render"):
        unsafe.apply_chat_template(chat)
    with pytest.raises(TokenizerError, match="non-empty list of messages"):
        raising.apply_chat_template([])


def test_runtime_modules_do_not_import_torch():
    code = ("import sys; import edgetune.runtime.text.tokenizer, edgetune.runtime.model.gguf, edgetune.runtime.model.embedded; "
            "bad = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- slow: the embedded SmolLM2 model
try:  # the shared session fixture converts the GGUF: it needs the `train` extra, the fast tests above do not
    from edgetune.tests.test_gguf_convert import _embedded_or_skip, real_model_dir  # noqa: E402,F401
except pytest.skip.Exception as missing:
    _reason = str(missing)

    def _embedded_or_skip():
        pytest.skip(_reason)

    @pytest.fixture(scope="session")
    def real_model_dir():
        pytest.skip(_reason)


@pytest.fixture(scope="module")
def gguf_reference():
    """transformers' own tokenizer built from the GGUF file (~8 s)."""
    src = _embedded_or_skip()
    return transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(real_model_dir, gguf_reference):
    ours = load_tokenizer(real_model_dir)
    folder_reference = transformers.AutoTokenizer.from_pretrained(real_model_dir)
    for reference in (folder_reference, gguf_reference):
        assert_same_tokenizer(ours, reference)
        assert_same_chat(ours, reference)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (
        gguf_reference.bos_token_id, (gguf_reference.eos_token_id,), gguf_reference.pad_token_id)
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
