"""Training data: JSONL records -> token ids with loss masks -> padded micro-batches.

Three record formats are accepted, one JSON object per line (see `FORMATS`):

- ``{"text": str}``: loss on every token;
- ``{"prompt": str, "completion": str}``: loss on the completion (and the end token) only;
- ``{"messages": [{"role": str, "content": str}, ...]}``: rendered with the tokenizer's chat
  template; loss on the assistant turns only (their content and end-of-turn tokens).

Text in a record that spells a special token (``<|im_end|>``) is encoded as the plain
characters it is made of, so data cannot forge control tokens (a chat message cannot end its
turn); only the chat template's own special tokens are control tokens. Pass
``special_tokens_in_text=True`` (``--special-tokens-in-text``) for data that writes them on purpose.

Labels are *not* shifted here: ``labels[t]`` is the target for ``input_ids[t]``, and the loss
shifts (``logits[:, :-1]`` predict ``labels[:, 1:]``), as transformers' causal-LM loss does.
Because no position predicts the first token, ``labels[0]`` is always -100, so
``(labels != -100).sum()`` is exactly the number of loss terms.

`BatchStream` yields micro-batches in an order fixed by a seed and can be stopped and resumed
at any batch (its `state_dict()` is plain JSON).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from edgetune.runtime.errors import CheckpointError, ConfigError, DataError, TokenizerError

IGNORE_INDEX = -100  # label value of positions that carry no loss (torch's cross_entropy default)

FORMATS = (
    '{"text": str} | {"prompt": str, "completion": str} | '
    '{"messages": [{"role": str, "content": str}, ...]}'
)
_ACCEPTED = f"accepted formats, one JSON object per line: {FORMATS}"
_KEYS_TO_FORMAT = {
    frozenset({"text"}): "text",
    frozenset({"prompt", "completion"}): "prompt/completion",
    frozenset({"messages"}): "chat",
}


class TokenizerLike(Protocol):
    """What the data pipeline needs from a tokenizer (edgetune.runtime.text.tokenizer provides it)."""

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True, *, split_special_tokens: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, *, split_special_tokens: bool = True
    ) -> list[int]: ...


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Source:
    """Where a record came from, printed as ``FILE:LINE`` (line numbers start at 1)."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class TextRecord:
    text: str
    source: Source | None = None  # None for records built in code


@dataclass(frozen=True)
class PromptCompletionRecord:
    prompt: str
    completion: str
    source: Source | None = None  # None for records built in code


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[ChatMessage, ...]
    source: Source | None = None  # None for records built in code


Record = TextRecord | PromptCompletionRecord | ChatRecord


def load_records(path: str | Path) -> list[Record]:
    """Read a JSONL training file; blank lines are skipped.

    Every line must hold one record in the same format (see `FORMATS`); anything else raises
    `DataError` with a message ``FILE:LINE: what is wrong; accepted formats: ...``. Mixing
    formats in one file is refused because it is almost always a mistake (a stray key);
    put differently formatted data in separate files.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: training data file not found; pass the path of a JSONL file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read training data: {e}") from e
    records: list[Record] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        source = Source(str(path), number)
        text = _decode_line(line, source, first=number == 1)
        if not text.strip():
            continue
        record = _parse_record(text, source)
        if records and type(record) is not type(records[0]):
            raise _bad(source, f"record is in {_format_name(record)} format but {records[0].source} "
                               f"is in {_format_name(records[0])} format; use one format per file")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no training records (the file is empty or blank); {_ACCEPTED}")
    return records


def _where(source: Source | None) -> str:
    return str(source) if source is not None else "<record>"


def _bad(source: Source, what: str) -> DataError:
    return DataError(f"{source}: {what}; {_ACCEPTED}")


def _format_name(record: Record) -> str:
    return {TextRecord: "text", PromptCompletionRecord: "prompt/completion", ChatRecord: "chat"}[type(record)]


def _decode_line(line: bytes, source: Source, first: bool) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff") if first else text  # a byte-order mark some editors write


def _parse_record(text: str, source: Source) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(source, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _bad(source, f"expected a JSON object, got {_json_type(obj)}")
    kind = _KEYS_TO_FORMAT.get(frozenset(obj))
    if kind is None:
        raise _bad(source, f"unexpected combination of keys {sorted(obj)}")
    if kind == "text":
        text_value = _string_field(obj, "text", source)
        if not text_value:
            raise _bad(source, '"text" is empty')
        return TextRecord(text_value, source)
    if kind == "prompt/completion":
        prompt, completion = _string_field(obj, "prompt", source), _string_field(obj, "completion", source)
        return PromptCompletionRecord(prompt, completion, source)
    return ChatRecord(_parse_messages(obj["messages"], source), source)


def _string_field(obj: dict, key: str, source: Source, where: str = "") -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _bad(source, f'{where}"{key}" must be a string, got {_json_type(value)}')
    return value


def _parse_messages(value: Any, source: Source) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list):
        raise _bad(source, f'"messages" must be a list of messages, got {_json_type(value)}')
    if not value:
        raise _bad(source, '"messages" is empty')
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]: "
        if not isinstance(message, dict):
            raise _bad(source, f"{where}expected an object with \"role\" and \"content\", got {_json_type(message)}")
        missing = sorted({"role", "content"} - set(message))
        extra = sorted(set(message) - {"role", "content"})
        if missing or extra:
            problem = f"missing {missing}" if missing else f"unexpected keys {extra}"
            raise _bad(source, f'{where}{problem} (a message has exactly "role" and "content")')
        messages.append(ChatMessage(_string_field(message, "role", source, where),
                                    _string_field(message, "content", source, where)))
    if not any(m.role == "assistant" for m in messages):
        raise _bad(source, 'no message has role "assistant", so there is nothing to learn from')
    if messages[0].role == "assistant":
        # Its loss mask starts where the template's rendering of the messages before it ends,
        # and chat templates (like transformers) cannot render an empty conversation.
        raise _bad(source, 'messages[0] has role "assistant"; a conversation must open with another role '
                           '(e.g. "system" or "user")')
    return tuple(messages)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence.

    ``labels[t]`` is ``input_ids[t]`` where the loss applies and `IGNORE_INDEX` elsewhere
    (unshifted; ``labels[0]`` is always ignored). ``truncated`` says max_seq_len cut it.
    """

    input_ids: list[int]
    labels: list[int]
    source: Source | None = None
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_record(
    record: Record, tokenizer: TokenizerLike, max_seq_len: int, *, special_tokens_in_text: bool = False
) -> Example:
    """Token ids and loss labels of one record, truncated to ``max_seq_len`` (keeping the start).

    The record's text is encoded as plain text: special tokens spelled in it are not control
    tokens unless ``special_tokens_in_text``. The result may have no supervised token left
    after truncation; `tokenize_records` drops such examples.
    """
    _check_max_seq_len(max_seq_len)
    split = not special_tokens_in_text
    if isinstance(record, TextRecord):
        ids = _with_eos(tokenizer.encode(record.text, add_special_tokens=True, split_special_tokens=split), tokenizer)
        labels = list(ids)
    elif isinstance(record, PromptCompletionRecord):
        # Encoded separately, as at inference: the prompt is tokenized alone, then the model writes.
        prompt = tokenizer.encode(record.prompt, add_special_tokens=True, split_special_tokens=split)
        completion = tokenizer.encode(record.completion, add_special_tokens=False, split_special_tokens=split)
        completion = _with_eos(completion, tokenizer)
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    elif isinstance(record, ChatRecord):
        ids, labels = _tokenize_chat(record, tokenizer, split)
    else:
        raise TypeError(f"not a training record: {type(record).__name__}")
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], record.source, truncated)


def tokenize_records(
    records: Sequence[Record], tokenizer: TokenizerLike, max_seq_len: int, *, special_tokens_in_text: bool = False
) -> list[Example]:
    """Tokenize every record (see `tokenize_record`); drop (with one warning giving the count) those
    left with no supervised token after truncation, and raise `DataError` if that drops all of them."""
    examples = [tokenize_record(record, tokenizer, max_seq_len, special_tokens_in_text=special_tokens_in_text)
                for record in records]
    kept = [example for example in examples if example.num_supervised > 0]
    dropped = [example for example in examples if example.num_supervised == 0]
    if dropped and not kept:
        raise DataError(f"{_where(dropped[0].source)}: all {len(examples)} examples have no supervised token within "
                        f"max_seq_len={max_seq_len}; raise max_seq_len or shorten the prompts")
    if dropped:
        warnings.warn(f"dropped {len(dropped)} of {len(examples)} examples with no supervised token within "
                      f"max_seq_len={max_seq_len} (first: {_where(dropped[0].source)})", stacklevel=2)
    return kept


def resolve_pad_id(tokenizer: TokenizerLike) -> int:
    """The tokenizer's pad id, else its first end-of-sequence id (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return _eos_id(tokenizer)


def _check_max_seq_len(max_seq_len: int) -> None:
    # Two tokens is the least that yields one loss term (the first token is never a target).
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")


def _eos_id(tokenizer: TokenizerLike) -> int:
    if not tokenizer.eos_token_ids:
        raise TokenizerError("the tokenizer defines no end-of-sequence token; set eos_token_id in the model's "
                             "generation_config.json or tokenizer_config.json")
    return tokenizer.eos_token_ids[0]


def _with_eos(ids: list[int], tokenizer: TokenizerLike) -> list[int]:
    """Append the first eos id unless the ids already end with one of the eos ids."""
    eos = _eos_id(tokenizer)
    return ids if ids and ids[-1] in tokenizer.eos_token_ids else ids + [eos]


def _tokenize_chat(record: ChatRecord, tokenizer: TokenizerLike, split: bool) -> tuple[list[int], list[int]]:
    """ids and labels of a conversation; loss on each assistant turn's content and end-of-turn.

    The whole conversation is rendered and tokenized once (without added special tokens: the
    template writes its own, as transformers does; with ``split``, special tokens spelled in the
    messages are plain text, see `encode_chat`). An assistant turn spans, in characters,
    from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
    ``render(messages[:i+1])``; both must be prefixes of the full rendering. The tokenizer
    interface gives no character offsets, so each prefix is tokenized too and its token count
    is the boundary -- exact whenever the prefix's ids are a prefix of the full ids (always
    for templates that separate turns with special tokens). See `_token_boundary` otherwise.
    """
    messages = [{"role": m.role, "content": m.content} for m in record.messages]
    full_text = _render(tokenizer, messages, False, record.source)
    ids = _encode_chat(tokenizer, messages, False, split, record.source)
    labels = [IGNORE_INDEX] * len(ids)

    def boundary(n_messages: int, add_generation_prompt: bool) -> int:
        prefix = _render(tokenizer, messages[:n_messages], add_generation_prompt, record.source)
        prefix_ids = _encode_chat(tokenizer, messages[:n_messages], add_generation_prompt, split, record.source)
        return _token_boundary(prefix, prefix_ids, full_text, ids, record.source)

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = boundary(i, True), boundary(i + 1, False)
            labels[start:end] = ids[start:end]
    return ids, labels


def _render(tokenizer: TokenizerLike, messages: list[dict], add_generation_prompt: bool, source: Source | None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TokenizerError as e:
        raise DataError(f"{_where(source)}: the chat template could not render this conversation "
                        f"(first {len(messages)} messages): {e}") from e


def _encode_chat(
    tokenizer: TokenizerLike, messages: list[dict], add_generation_prompt: bool, split: bool, source: Source | None
) -> list[int]:
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, split_special_tokens=split)
    except TokenizerError as e:
        raise DataError(f"{_where(source)}: the chat template could not render this conversation "
                        f"(first {len(messages)} messages): {e}") from e


def _token_boundary(
    prefix: str, prefix_ids: list[int], full_text: str, full_ids: list[int], source: Source | None
) -> int:
    """Number of leading tokens of ``full_ids`` that encode the character prefix ``prefix``
    (whose own ids are ``prefix_ids``).

    If the prefix's own ids are not a prefix of ``full_ids`` (a token merges across the
    boundary, e.g. a generation prompt ending in a space), the boundary falls back to the
    length of the common prefix -- the first token whose spelling depends on what follows --
    with a warning naming the record.
    """
    if not full_text.startswith(prefix):
        raise DataError(f"{_where(source)}: the chat template renders a part of the conversation differently from the "
                        "whole, so the assistant turns cannot be located; use a template that renders "
                        "earlier turns the same way whatever follows them")
    common = 0
    for a, b in zip(prefix_ids, full_ids):
        if a != b:
            break
        common += 1
    if common != len(prefix_ids):
        warnings.warn(f"{_where(source)}: a chat turn boundary falls inside a token; the loss mask is placed at the "
                      f"nearest token boundary before it (token {common})", stacklevel=5)
    return common


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """A right-padded micro-batch; ``num_tokens`` counts the labels that carry loss."""

    input_ids: torch.Tensor       # (B, T) int64, padding = pad_id
    labels: torch.Tensor          # (B, T) int64, IGNORE_INDEX at padding and unsupervised tokens
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token, 0 = padding
    num_tokens: int

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device), self.num_tokens)

    def split(self, parts: int) -> list[Batch]:
        """Split the rows into `parts` micro-batches (as even as possible; empty ones dropped)."""
        pieces = zip(*(t.tensor_split(parts) for t in (self.input_ids, self.labels, self.attention_mask)))
        return [Batch(ids, labels, mask, int((labels != IGNORE_INDEX).sum())) for ids, labels, mask in pieces if len(ids)]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Pad examples on the right to the longest one; used for training and evaluation."""
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return Batch(input_ids, labels, attention_mask, int((labels != IGNORE_INDEX).sum()))


def split_train_eval(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and split off ``round(eval_fraction * n)`` examples for evaluation.

    With ``eval_fraction > 0`` and at least 2 examples, eval gets at least one and train keeps
    at least one.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    order = [examples[i] for i in _permutation(len(examples), seed)]
    n_eval = 0
    if eval_fraction > 0 and len(examples) >= 2:
        n_eval = min(max(1, round(eval_fraction * len(examples))), len(examples) - 1)
    return order[n_eval:], order[:n_eval]


def _permutation(n: int, seed: int) -> list[int]:
    # torch's CPU generator gives the same permutation on every platform for a given seed.
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


class BatchStream:
    """Endless, deterministic micro-batches: epoch ``e`` visits the examples in the order
    ``permutation(seed + e)``, ``batch_size`` at a time (an epoch's last batch may be smaller).

    `state_dict` records the position, so a stream restored with `load_state_dict` yields
    exactly the batches the original would have yielded next::

        stream = BatchStream(train, batch_size=4, seed=0, pad_id=pad)
        batch = stream.next_batch()
        state = stream.state_dict()          # JSON-serialisable
        resumed = BatchStream(train, batch_size=4, seed=0, pad_id=pad)
        resumed.load_state_dict(state)       # resumed.next_batch() == stream.next_batch()
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int) -> None:
        if not examples:
            raise DataError("no training examples to make batches from")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._examples = list(examples)
        self._batch_size = batch_size
        self._seed = seed
        self._pad_id = pad_id
        self._fingerprint = _fingerprint(self._examples)
        self._epoch = 0
        self._index = 0  # position in this epoch's order of the next example to yield
        self._order = _permutation(len(self._examples), seed)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        return self._epoch if self._index < len(self._examples) else self._epoch + 1

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self._examples) / self._batch_size)

    def next_batch(self) -> Batch:
        if self._index >= len(self._examples):
            self._start_epoch(self._epoch + 1)
        chosen = self._order[self._index : self._index + self._batch_size]
        self._index += len(chosen)
        return collate([self._examples[i] for i in chosen], self._pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index, "seed": self._seed,
                "batch_size": self._batch_size, "num_examples": len(self._examples),
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the position in ``state``; the stream must be built on the same data,
        seed and batch size, else `CheckpointError` says which differs."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"batch stream state lacks {missing}; it was not written by BatchStream.state_dict")
        for key in ("seed", "batch_size", "num_examples", "fingerprint"):
            if state[key] != expected[key]:
                raise CheckpointError(f"batch stream state has {key}={state[key]!r} but this run has "
                                      f"{expected[key]!r}; resume with the same data, tokenizer, seed and batch size")
        epoch, index = state["epoch"], state["index"]
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0 and 0 <= index <= len(self._examples)):
            raise CheckpointError(f"batch stream state has an invalid position epoch={epoch!r} index={index!r}")
        self._start_epoch(epoch)
        self._index = index

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._index = 0
        self._order = _permutation(len(self._examples), self._seed + epoch)


def _fingerprint(examples: Sequence[Example]) -> str:
    """A hash of every example's ids and labels: resuming on changed data is an error."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(array("q", [len(example.input_ids)]).tobytes())
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()[:16]
