"""Tests of edgetune.runtime.train.data: records, loss masks, truncation, splits and resumable batches.

The tokenizer is a small byte-level BPE trained here with `tokenizers`, wrapped in a test
double with the interface edgetune's tokenizer offers. Expected ids and masks are computed
from that backend directly or from transformers' own assistant-token mask, never copied
from the code under test.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jinja2
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from edgetune.runtime.errors import CheckpointError, DataError
from edgetune.runtime.train.data import (
    IGNORE_INDEX,
    BatchStream,
    ChatMessage,
    ChatRecord,
    Example,
    PromptCompletionRecord,
    TextRecord,
    collate,
    load_records,
    resolve_pad_id,
    split_train_eval,
    tokenize_record,
    tokenize_records,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is a local reference here, never a download

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same template with transformers' generation markers around what the assistant writes.
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system hello world, how are you today? I am fine, thank you.",
    "Fine-tuning adapts a pretrained language model to a new task with little data.",
] * 20

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
]


def _train_backend() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return backend


class TinyTokenizer:
    """Test double with edgetune's tokenizer interface over a `tokenizers` backend."""

    def __init__(self, backend: Tokenizer, template: str = CHATML, pad: bool = False) -> None:
        self.backend = backend
        self._literal = Tokenizer.from_str(backend.to_str())  # special tokens in text encoded as plain text
        self._literal.encode_special_tokens = True
        self._template = jinja2.Environment().from_string(template)
        self.eos_token_ids = (backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>"))
        self.bos_token_id = backend.token_to_id("<s>")
        self.pad_token_id = backend.token_to_id("<|endoftext|>") if pad else None

    def encode(self, text: str, add_special_tokens: bool = True, *, split_special_tokens: bool = False) -> list[int]:
        backend = self._literal if split_special_tokens else self.backend
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, *,
                    split_special_tokens: bool = True) -> list[int]:
        # Messages that spell no special token: what edgetune's encode_chat promises; the rest is
        # tested with edgetune's own tokenizer.
        if split_special_tokens and any(s in m["content"] for m in messages for s in SPECIALS):
            raise NotImplementedError("the double only encodes messages that spell no special token")
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    return _train_backend()


@pytest.fixture(scope="module")
def tok(backend) -> TinyTokenizer:
    return TinyTokenizer(backend)


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _supervised_spans(example: Example) -> list[list[int]]:
    """The supervised token ids, one list per contiguous run of labels != -100."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token  # labels are unshifted copies of the ids
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def _messages(dicts: list[dict]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(d["role"], d["content"]) for d in dicts)


# ---------------------------------------------------------------- loading


def test_load_records_reads_all_three_formats_and_skips_blank_lines(tmp_path):
    text = _write(tmp_path, ['{"text": "hello"}', "", "   ", '{"text": "world"}'], "text.jsonl")
    pc = _write(tmp_path, [json.dumps({"prompt": "Q?", "completion": "A."})], "pc.jsonl")
    chat = _write(tmp_path, [json.dumps({"messages": CONVERSATION})], "chat.jsonl")

    texts = load_records(text)
    assert [r.text for r in texts] == ["hello", "world"]
    assert [r.source.line for r in texts] == [1, 4]
    assert all(isinstance(r, TextRecord) for r in texts)
    [record] = load_records(pc)
    assert isinstance(record, PromptCompletionRecord) and (record.prompt, record.completion) == ("Q?", "A.")
    [record] = load_records(chat)
    assert isinstance(record, ChatRecord)
    assert [(m.role, m.content) for m in record.messages] == [(m["role"], m["content"]) for m in CONVERSATION]


GOOD = '{"text": "fine"}'
GOOD_CHAT = json.dumps({"messages": CONVERSATION})


@pytest.mark.parametrize("first, bad, fragment", [
    (GOOD, '{"text": "unterminated', "invalid JSON"),
    (GOOD, '["text", "a list"]', "expected a JSON object, got array"),
    (GOOD, '{"text": 5}', '"text" must be a string, got number'),
    (GOOD, '{"text": ""}', '"text" is empty'),
    (GOOD, '{"prompt": "only a prompt"}', "unexpected combination of keys ['prompt']"),
    (GOOD, '{"text": "a", "prompt": "b"}', "unexpected combination of keys ['prompt', 'text']"),
    (GOOD, '{"txt": "typo"}', "unexpected combination of keys ['txt']"),
    ('{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": null}',
     '"completion" must be a string, got null'),
    (GOOD_CHAT, '{"messages": []}', '"messages" is empty'),
    (GOOD_CHAT, '{"messages": "hi"}', '"messages" must be a list'),
    (GOOD_CHAT, '{"messages": [{"role": "user"}]}', "messages[0]: missing ['content']"),
    (GOOD_CHAT, '{"messages": [{"content": "hi"}]}', "messages[0]: missing ['role']"),
    (GOOD_CHAT, '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}',
     'messages[1]: "content" must be a string'),
    (GOOD_CHAT, '{"messages": [{"role": "user", "content": "a", "name": "x"}]}',
     "messages[0]: unexpected keys ['name']"),
    (GOOD_CHAT, '{"messages": ["hi"]}', "messages[0]: expected an object"),
    (GOOD_CHAT, '{"messages": [{"role": "user", "content": "no answer"}]}', 'no message has role "assistant"'),
    (GOOD_CHAT, '{"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hi"}]}',
     'messages[0] has role "assistant"'),
    (GOOD, GOOD_CHAT, "chat format but"),  # a file mixing formats
])
def test_malformed_record_names_file_line_problem_and_formats(tmp_path, first, bad, fragment):
    path = _write(tmp_path, [first, "", bad, first])
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert fragment in message
    assert '{"prompt": str, "completion": str}' in message  # says which formats are accepted


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_records(path)


def test_missing_and_empty_files_are_data_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: training data file not found"):
        load_records(missing)
    blank = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="no training records"):
        load_records(blank)


# ---------------------------------------------------------------- tokenization


def test_text_record_is_encoded_with_eos_and_supervised_everywhere(tok, backend):
    record = TextRecord("The quick brown fox.")
    example = tokenize_record(record, tok, max_seq_len=512)
    expected = backend.encode("The quick brown fox.").ids + [backend.token_to_id("<|im_end|>")]
    assert expected[0] == backend.token_to_id("<s>")
    assert example.input_ids == expected
    assert example.labels == [IGNORE_INDEX] + expected[1:]  # the first token is never a target
    assert not example.truncated

    # A text that spells an end token gets a real one: what it spells is plain text ...
    spelled = tokenize_record(TextRecord("Paris.<|endoftext|>"), tok, 512)
    literal = Tokenizer.from_str(backend.to_str())
    literal.encode_special_tokens = True
    assert spelled.input_ids == literal.encode("Paris.<|endoftext|>").ids + [backend.token_to_id("<|im_end|>")]
    assert backend.token_to_id("<|endoftext|>") not in spelled.input_ids
    # ... unless the data may spell control tokens: then it already ends with one and gets no second.
    ended = tokenize_record(TextRecord("Paris.<|endoftext|>"), tok, 512, special_tokens_in_text=True)
    assert ended.input_ids == backend.encode("Paris.<|endoftext|>").ids
    assert ended.input_ids != spelled.input_ids


def test_prompt_completion_supervises_exactly_the_completion_and_eos(tok, backend):
    record = PromptCompletionRecord("What is the capital of France?", " The capital is Paris.")
    example = tokenize_record(record, tok, max_seq_len=512)
    prompt_ids = backend.encode(record.prompt).ids
    completion_ids = backend.encode(record.completion, add_special_tokens=False).ids
    eos = backend.token_to_id("<|im_end|>")
    assert example.input_ids == prompt_ids + completion_ids + [eos]
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    [span] = _supervised_spans(example)
    assert tok.decode(span) == " The capital is Paris.<|im_end|>"


def test_chat_supervises_exactly_the_assistant_contents_and_their_end_of_turn(tok):
    example = tokenize_record(ChatRecord(_messages(CONVERSATION)), tok, max_seq_len=512)
    assert example.input_ids == tok.encode(tok.apply_chat_template(CONVERSATION), add_special_tokens=False)
    spans = [tok.decode(span) for span in _supervised_spans(example)]
    assert spans == [m["content"] + "<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant"]


def test_chat_mask_equals_transformers_assistant_token_mask(backend):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>")
    out = reference.apply_chat_template(CONVERSATION, chat_template=CHATML_GENERATION, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    example = tokenize_record(ChatRecord(_messages(CONVERSATION)), TinyTokenizer(backend), 512)
    assert example.input_ids == list(out["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in example.labels] == list(out["assistant_masks"])


def test_edgetune_tokenizer_folder_gives_transformers_ids_and_masks(backend, tmp_path):
    """End to end with edgetune's own tokenizer loaded from a folder transformers wrote."""
    transformers = pytest.importorskip("transformers")
    tokenizer_module = pytest.importorskip("edgetune.runtime.text.tokenizer")
    writer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend.to_str()),
                                                  bos_token="<s>", eos_token="<|im_end|>",
                                                  chat_template=CHATML_GENERATION)
    writer.save_pretrained(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = tokenizer_module.load_tokenizer(tmp_path)

    chat = tokenize_record(ChatRecord(_messages(CONVERSATION)), tok, 512)
    out = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert chat.input_ids == list(out["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in chat.labels] == list(out["assistant_masks"])

    pc = tokenize_record(PromptCompletionRecord("Hello world?", " Fine, thank you."), tok, 512)
    expected = (reference("Hello world?")["input_ids"]
                + reference(" Fine, thank you.", add_special_tokens=False)["input_ids"] + [reference.eos_token_id])
    assert pc.input_ids == expected
    [span] = _supervised_spans(pc)
    assert reference.decode(span) == " Fine, thank you.<|im_end|>"


def assert_special_tokens_in_records_stay_text(tok, reference) -> None:
    """Records spelling special tokens, tokenized by edgetune's tokenizer, against transformers:
    plain text by default (`split_special_tokens=True`), control tokens with special_tokens_in_text."""
    from edgetune.tests.test_tokenizer import INJECTION, reference_chat_ids

    def ref(text: str, split: bool, add_special_tokens: bool = True) -> list[int]:
        return reference(text, add_special_tokens=add_special_tokens, split_special_tokens=split).input_ids

    eos, im_end = reference.eos_token_id, reference.convert_tokens_to_ids("<|im_end|>")
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": INJECTION},
            {"role": "assistant", "content": "No."}]
    record = ChatRecord(_messages(chat))
    safe = tokenize_record(record, tok, 512)
    unsafe = tokenize_record(record, tok, 512, special_tokens_in_text=True)
    assert safe.input_ids == reference_chat_ids(reference, chat, INJECTION, add_generation_prompt=False)
    assert unsafe.input_ids == list(reference.apply_chat_template(chat, return_dict=True)["input_ids"])
    assert (safe.input_ids.count(im_end), unsafe.input_ids.count(im_end)) == (3, 4)  # one per turn, or a forged one
    for example in (safe, unsafe):
        assert [reference.decode(span) for span in _supervised_spans(example)] == ["No.<|im_end|>\n"]

    text = tokenize_record(TextRecord(INJECTION), tok, 512)
    assert text.input_ids == ref(INJECTION, split=True) + [eos]
    assert tokenize_record(TextRecord(INJECTION), tok, 512, special_tokens_in_text=True).input_ids == (
        ref(INJECTION, split=False) + [eos])

    pc = PromptCompletionRecord(INJECTION, " fine<|im_end|>")
    prompt, completion = ref(INJECTION, split=True), ref(pc.completion, split=True, add_special_tokens=False)
    assert tokenize_record(pc, tok, 512).input_ids == prompt + completion + [eos]
    allowed = tokenize_record(pc, tok, 512, special_tokens_in_text=True)  # already ends with eos: none added
    assert allowed.input_ids == ref(INJECTION, split=False) + ref(pc.completion, split=False, add_special_tokens=False)
    assert allowed.input_ids[-1] == eos and allowed.input_ids[:-1].count(im_end) == 1


def test_special_tokens_in_records_are_text_unless_asked(backend, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer_module = pytest.importorskip("edgetune.runtime.text.tokenizer")
    writer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend.to_str()),
                                                  bos_token="<s>", eos_token="<|im_end|>", chat_template=CHATML)
    writer.save_pretrained(tmp_path)
    assert_special_tokens_in_records_stay_text(tokenizer_module.load_tokenizer(tmp_path),
                                               transformers.AutoTokenizer.from_pretrained(tmp_path))


try:  # the embedded SmolLM2, converted from its GGUF once per session
    from edgetune.tests.test_gguf_convert import real_model_dir  # noqa: F401
except pytest.skip.Exception as missing:
    _reason = str(missing)

    @pytest.fixture(scope="session")
    def real_model_dir():
        pytest.skip(_reason)


@pytest.mark.slow
def test_real_tokenizer_keeps_special_tokens_in_records_as_text(real_model_dir):
    transformers = pytest.importorskip("transformers")
    from edgetune.runtime.text.tokenizer import load_tokenizer

    assert_special_tokens_in_records_stay_text(load_tokenizer(real_model_dir),
                                               transformers.AutoTokenizer.from_pretrained(real_model_dir))


def test_chat_boundary_inside_a_token_falls_back_to_the_common_prefix_with_a_warning(backend):
    # "Assistant: " then "Paris": byte-level BPE spells the space and the word as one token " Paris".
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = TinyTokenizer(backend, template)
    messages = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Paris"}]
    with pytest.warns(UserWarning, match="turn boundary falls inside a token"):
        example = tokenize_record(ChatRecord(_messages(messages)), tok, 512)
    [span] = _supervised_spans(example)
    assert tok.decode(span) == " Paris\n"  # the boundary token, holding the answer, stays supervised


def test_chat_template_that_rewrites_earlier_turns_is_refused(backend, tmp_path):
    # Renders the last message differently from earlier ones, so prefixes are not prefixes.
    template = ("{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}"
                "{% endfor %}")
    tok = TinyTokenizer(backend, template)
    path = _write(tmp_path, [json.dumps({"messages": CONVERSATION})])
    [record] = load_records(path)
    with pytest.raises(DataError, match=rf"^{path}:1: the chat template renders"):
        tokenize_record(record, tok, 512)


def test_truncation_keeps_the_start(tok, backend):
    text = " ".join(CORPUS[:4])
    full = backend.encode(text).ids + [backend.token_to_id("<|im_end|>")]
    example = tokenize_record(TextRecord(text), tok, max_seq_len=7)
    assert example.input_ids == full[:7]
    assert example.labels == [IGNORE_INDEX] + full[1:7]
    assert example.truncated


def test_examples_without_supervision_after_truncation_are_dropped_and_counted(tok, tmp_path):
    long_prompt = " ".join(CORPUS[:4])
    lines = [json.dumps({"prompt": long_prompt, "completion": " yes"}),
             json.dumps({"prompt": "Q?", "completion": " yes"}),
             json.dumps({"prompt": long_prompt, "completion": " no"})]
    records = load_records(_write(tmp_path, lines))
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 examples .*max_seq_len=8 \(first: .*data.jsonl:1\)"):
        kept = tokenize_records(records, tok, max_seq_len=8)
    assert [example.source.line for example in kept] == [2]

    with pytest.raises(DataError, match="all 2 examples have no supervised token"):
        tokenize_records([records[0], records[2]], tok, max_seq_len=8)


def test_nothing_is_dropped_or_warned_when_everything_fits(tok, tmp_path):
    records = load_records(_write(tmp_path, [json.dumps({"messages": CONVERSATION})] * 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tokenize_records(records, tok, max_seq_len=512)) == 3


# ---------------------------------------------------------------- split and batches


def _examples(n: int) -> list[Example]:
    # Distinct lengths and contents so every example is recognisable in a batch.
    examples = []
    for i in range(n):
        ids = list(range(100 * i, 100 * i + 2 + i % 5))
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    return examples


def test_split_is_a_deterministic_partition():
    examples = _examples(10)
    train, held = split_train_eval(examples, 0.3, seed=7)
    assert len(held) == 3 and len(train) == 7
    assert sorted(map(id, train + held)) == sorted(map(id, examples))
    again_train, again_held = split_train_eval(examples, 0.3, seed=7)
    assert again_train == train and again_held == held
    others = [split_train_eval(examples, 0.3, seed=s)[1] for s in range(1, 6)]
    assert any(other != held for other in others)  # the seed matters


@pytest.mark.parametrize("n, fraction, n_eval", [(10, 0.0, 0), (2, 0.01, 1), (1, 0.5, 0), (3, 0.99, 2), (5, 0.5, 2)])
def test_split_sizes(n, fraction, n_eval):
    train, held = split_train_eval(_examples(n), fraction, seed=0)
    assert (len(train), len(held)) == (n - n_eval, n_eval)


def test_collate_pads_right_and_masks_padding():
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8, 9], [IGNORE_INDEX, IGNORE_INDEX])
    c = Example([1, 2, 3, 4], [IGNORE_INDEX, 2, IGNORE_INDEX, 4])
    batch = collate([a, b, c], pad_id=0)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]]
    assert batch.labels.tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100], [-100, 2, -100, 4]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.num_tokens == 4


def test_pad_id_falls_back_to_the_first_eos(tok, backend):
    assert resolve_pad_id(tok) == backend.token_to_id("<|im_end|>")
    assert resolve_pad_id(TinyTokenizer(backend, pad=True)) == backend.token_to_id("<|endoftext|>")


def _rows(batch) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]


def test_stream_epochs_cover_every_example_once_in_a_new_order():
    examples = _examples(7)
    stream = BatchStream(examples, batch_size=3, seed=1, pad_id=-1)
    assert stream.batches_per_epoch == 3
    epochs = []
    for _ in range(3):
        epochs.append([row for _ in range(3) for row in _rows(stream.next_batch())])
    for order in epochs:
        assert sorted(order) == sorted(e.input_ids for e in examples)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 7])
def test_resumed_stream_yields_the_same_batches_across_epoch_boundaries(k):
    examples = _examples(7)  # batch 3: epochs are batches of 3, 3, 1
    uninterrupted = BatchStream(examples, batch_size=3, seed=11, pad_id=0)
    expected = [uninterrupted.next_batch() for _ in range(k + 6)][k:]

    first = BatchStream(examples, batch_size=3, seed=11, pad_id=0)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = BatchStream(examples, batch_size=3, seed=11, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(getattr(got, name), getattr(want, name))
        assert got.num_tokens == want.num_tokens


def test_resuming_on_different_data_or_settings_is_refused():
    examples = _examples(7)
    state = BatchStream(examples, batch_size=3, seed=0, pad_id=0).state_dict()
    changed = examples[:-1] + [Example([1, 2], [IGNORE_INDEX, 2])]
    with pytest.raises(CheckpointError, match="fingerprint"):
        BatchStream(changed, batch_size=3, seed=0, pad_id=0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="batch_size"):
        BatchStream(examples, batch_size=2, seed=0, pad_id=0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="lacks"):
        BatchStream(examples, batch_size=3, seed=0, pad_id=0).load_state_dict({"epoch": 0})
