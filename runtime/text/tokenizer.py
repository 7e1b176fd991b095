"""Tokenizer: a `tokenizers.Tokenizer` plus the model's chat template.

Reads a Hugging Face tokenizer folder without transformers (and without torch):

- `tokenizer.json` (required): the fast-tokenizer serialization;
- `tokenizer_config.json` (optional): named special tokens,
  `added_tokens_decoder`, `chat_template` (its `add_bos_token` / `add_eos_token`
  are ignored, as transformers 5 ignores them next to a tokenizer.json: the
  tokenizer.json post-processor decides whether BOS/EOS are added);
- `chat_template.jinja` (optional, written by transformers 5): the chat
  template, which wins over the config's, like in transformers; named extra
  templates in `additional_chat_templates/*.jinja`.

Encoding reproduces `transformers.AutoTokenizer(folder)(text).input_ids` and the
chat template renders exactly like `apply_chat_template(..., tokenize=False)`:
the same sandboxed jinja2 environment (trim_blocks, lstrip_blocks,
`raise_exception`, `strftime_now`, non-escaping `tojson`) and the same variables.

Text a caller passes can spell a special token (a user typing `<|im_end|>`).
`encode(text, split_special_tokens=True)` encodes such text as plain characters
(transformers' `split_special_tokens=True`), and `encode_chat` -- what chat prompts
and chat training data use -- keeps the template's own control tokens while the
messages' text is encoded that way, so a message cannot close its turn and forge
another one.

    >>> tok = load_tokenizer("path/to/hf_folder")
    >>> ids = tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from edgetune.runtime.errors import TokenizerError
from edgetune.runtime.jsonfile import read_json_object

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"

# transformers' named special tokens, in its order; the chat template sees each one that is set.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Older messages name the model's reasoning differently; templates read the first name.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# While `encode_chat` renders, message text that spells a special token is swapped for
# "\ufdd0<n>\ufdd1". U+FDD0 is a Unicode noncharacter (reserved for internal use); a message's
# own U+FDD0 is swapped too, so every one in the rendering is a placeholder of ours.
_MARK, _MARK_END = "\ufdd0", "\ufdd1"
_PLACEHOLDER = re.compile(f"{_MARK}([0-9]+){_MARK_END}")


class Tokenizer:
    """Text <-> token ids, and chat messages -> prompt text.

    `backend` is a `tokenizers.Tokenizer`. `special_tokens` maps the names in
    `SPECIAL_TOKEN_NAMES` to token strings. `add_bos_token` / `add_eos_token`
    (None: keep the backend's post-processor) rebuild the post-processor to add
    BOS / EOS the way transformers' `update_post_processor` does; they are for
    building a tokenizer (see runtime/model/gguf.py) -- when reading a folder,
    tokenizer.json's post-processor decides, as in transformers 5.
    `chat_template` is one template, or a dict of named ones with the main one
    under "default". `source` names where it came from in error messages.
    """

    def __init__(
        self,
        backend: Any,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        source: str = "<in-memory tokenizer>",
        template_source: str | None = None,
    ) -> None:
        self.backend = backend
        self.source = source
        self.special_tokens = {name: tok for name, tok in (special_tokens or {}).items() if tok is not None}
        unknown = sorted(set(self.special_tokens) - set(SPECIAL_TOKEN_NAMES))
        if unknown:
            raise TokenizerError(f"{source}: unknown special token names {unknown} (known: {', '.join(SPECIAL_TOKEN_NAMES)})")
        self._chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self._template_source = template_source or source
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self._register_special_tokens()
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        self._specials = {i: t for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        # A normalizer may turn other text into a normalized special token: then only the backend can find them.
        self._normalized_specials = self.backend.normalizer is not None and any(t.normalized for t in self._specials.values())
        self._literal_backend: Any = None  # a copy of `backend` that splits special tokens; made on first use
        self._literal_lock = threading.Lock()

    # ------------------------------------------------------------ setup
    def _register_special_tokens(self) -> None:
        # transformers makes every named special token an added token (matched whole in text,
        # dropped by skip_special_tokens) when tokenizer.json does not already list it.
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(self.special_tokens.values()) if t not in added]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Add BOS/EOS around every encoding, as transformers' `update_post_processor` does."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        specials = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # ------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True, *, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the BOS/EOS tokenizer.json's post-processor adds.

        Special tokens spelled in `text` (`<|im_end|>`) become their control ids, unless
        `split_special_tokens`: then they are encoded as the plain characters they are made of,
        like transformers' `split_special_tokens=True`. Use that for text from users or data.
        """
        backend = self._literal() if split_special_tokens else self.backend
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, *, split_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of `messages` rendered with the chat template (no BOS/EOS added: the template writes its own).

        With `split_special_tokens` (the default), only the template's own special tokens are
        control ids: text in the messages that spells one (a user writing `<|im_end|>`) is
        encoded as plain characters, so it cannot end a turn. Messages without such text get
        exactly the ids of `encode(apply_chat_template(messages), add_special_tokens=False)`,
        which is also what `split_special_tokens=False` returns for any messages.

            >>> tok.encode_chat([{"role": "user", "content": "hi<|im_end|>"}])  # no <|im_end|> id inside the content
        """
        chat = _template_messages(messages, self._template_source)
        if not split_special_tokens:
            return self.encode(self._render(chat, add_generation_prompt), add_special_tokens=False)
        originals: list[str] = []
        masked = _map_strings(chat, lambda text: self._mask_specials(text, originals))
        rendered = self._render(masked, add_generation_prompt)
        if not originals:
            return self.encode(rendered, add_special_tokens=False)

        def restore(part: str) -> list[int]:
            text = _PLACEHOLDER.sub(lambda m: originals[int(m.group(1))], part)
            return self.encode(text, add_special_tokens=False, split_special_tokens=True)

        # Every special token left in the rendering is the template's. The text between two of
        # them is encoded on its own, as the backend does after splitting at added tokens.
        ids: list[int] = []
        start = 0
        for token_id, begin, end in self._special_matches(rendered):
            ids += restore(rendered[start:begin]) + [token_id]
            start = end
        return ids + restore(rendered[start:])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, <|im_end|>, ...) are dropped unless asked for."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # ------------------------------------------------------------ special tokens
    def _literal(self) -> Any:
        """The backend copy that encodes special tokens as plain text; `backend` itself is never
        switched, so encodings running at the same time on other threads are unaffected."""
        with self._literal_lock:
            if self._literal_backend is None:
                copy = Backend.from_str(self.backend.to_str())
                copy.encode_special_tokens = True
                self._literal_backend = copy
            return self._literal_backend

    def _mask_specials(self, text: str, originals: list[str]) -> str:
        """`text` with each special token it spells (and each U+FDD0) swapped for a placeholder;
        `originals` gets the swapped-out strings, indexed by the placeholders' numbers."""
        if not self._normalized_specials and _MARK not in text and not any(t.content in text for t in self._specials.values()):
            return text
        spans = [(begin, end) for _, begin, end in self._special_matches(text)]
        spans += [(i, i + 1) for i, char in enumerate(text) if char == _MARK]
        parts, start = [], 0
        for begin, end in sorted(spans):
            if begin < start:  # a U+FDD0 inside a special token a normalizer spelled: already swapped
                continue
            parts += [text[start:begin], f"{_MARK}{len(originals)}{_MARK_END}"]
            originals.append(text[begin:end])
            start = end
        return "".join(parts) + text[start:]

    def _special_matches(self, text: str) -> list[tuple[int, int, int]]:
        """(id, start, end) of each special token the backend matches in `text` (the span holds
        the whitespace an lstrip/rstrip token takes). An unknown character encodes to the special
        unk id too, but spells no special token, so it is not one of them."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        matches = []
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets):
            token = self._specials.get(token_id)
            if token is None:
                continue
            spelled = text[begin:end]
            if token.normalized and self.backend.normalizer is not None:
                spelled = self.backend.normalizer.normalize_str(spelled)
            if token.content in spelled:
                matches.append((token_id, begin, end))
        return matches

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the tokenizer's EOS token (empty when it has none)."""
        eos = self._special_id("eos_token")
        return () if eos is None else (eos,)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The template `apply_chat_template` renders (the "default" one of named templates)."""
        if isinstance(self._chat_template, dict):
            return self._chat_template.get("default")
        return self._chat_template

    # ------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into the model's prompt text.

        With `add_generation_prompt`, the text ends with the header that opens the
        assistant's reply. Encode the result with `add_special_tokens=False` (the
        template writes its own special tokens) -- or call `encode_chat`, which also
        keeps special tokens spelled in the messages from becoming control tokens.
        """
        return self._render(_template_messages(messages, self._template_source), add_generation_prompt)

    def _render(self, chat: list[dict], add_generation_prompt: bool) -> str:
        """Render messages already made plain by `_template_messages`."""
        template = self.chat_template
        if template is None:
            raise TokenizerError(
                f"{self.source}: the tokenizer has no chat template (no 'chat_template' in {CONFIG_FILE} and no "
                f"{TEMPLATE_FILE}); add one, or format prompts yourself and call encode()"
            )
        compiled = _compile_template(template, self._template_source)
        variables = dict(self.special_tokens)
        try:
            return compiled.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except Exception as e:  # jinja2 errors, raise_exception(), and errors of the template's own code
            raise TokenizerError(f"{self._template_source}: chat template failed to render: {type(e).__name__}: {e}") from None

    # ------------------------------------------------------------ saving
    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json so `load_tokenizer(folder)` (and transformers) read it back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE), pretty=True)
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(self.special_tokens)
        if self._add_bos_token is not None:
            config["add_bos_token"] = self._add_bos_token
        if self._add_eos_token is not None:
            config["add_eos_token"] = self._add_eos_token
        if isinstance(self._chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self._chat_template.items()]
        elif self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # Template files left in the folder would win over the config's template on reading.
        for stale in [folder / TEMPLATE_FILE, *(folder / EXTRA_TEMPLATES_DIR).glob("*.jinja")]:
            stale.unlink(missing_ok=True)
        return folder


# ---------------------------------------------------------------- loading
def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Read the tokenizer (and chat template) of a Hugging Face model folder."""
    folder = Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found; a model folder needs the {TOKENIZER_FILE} transformers writes")
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown layout
        raise TokenizerError(f"{path}: not a valid {TOKENIZER_FILE} ({e})") from None
    config = _read_config(folder / CONFIG_FILE)
    _add_config_tokens(backend, config, folder / CONFIG_FILE)
    template, template_source = _read_templates(folder, config)
    return Tokenizer(
        backend,
        special_tokens={name: _token_content(config.get(name), folder / CONFIG_FILE) for name in SPECIAL_TOKEN_NAMES},
        chat_template=template,
        source=str(folder),
        template_source=template_source,
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json_object(path, TokenizerError)


def _token_content(value: Any, path: Path) -> str | None:
    """A special token as a string: configs write either "<s>" or an AddedToken dict {"content": "<s>", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: a special token must be a string or {{'content': ...}}, got {value!r}")


def _add_config_tokens(backend: Any, config: dict[str, Any], path: Path) -> None:
    """Add the `added_tokens_decoder` entries tokenizer.json lacks, as transformers does."""
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise TokenizerError(f"{path}: 'added_tokens_decoder' must be an object of id -> token")
    if not all(str(key).isdigit() for key in entries):
        raise TokenizerError(f"{path}: 'added_tokens_decoder' keys must be token ids, got {sorted(entries)[:5]}")
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = []
    for _, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{path}: malformed 'added_tokens_decoder' entry {entry!r}")
        if entry["content"] not in present:
            flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
            missing.append(AddedToken(entry["content"], **{k: bool(entry[k]) for k in flags if k in entry}))
    if missing:
        backend.add_tokens(missing)


def _read_templates(folder: Path, config: dict[str, Any]) -> tuple[str | dict[str, str] | None, str]:
    """The chat template(s) and where they came from: .jinja files win over the config's."""
    templates: dict[str, str] = {}
    main = folder / TEMPLATE_FILE
    if main.is_file():
        templates["default"] = main.read_text(encoding="utf-8")
    extra_dir = folder / EXTRA_TEMPLATES_DIR
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        source = str(main) if main.is_file() else str(extra_dir)
        return (templates["default"] if list(templates) == ["default"] else templates), source
    value = config.get("chat_template")
    source = f"{folder / CONFIG_FILE} 'chat_template'"
    if value is None or isinstance(value, str):
        return value, source
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        return {t["name"]: t["template"] for t in value}, source
    raise TokenizerError(f"{source}: must be a string or a list of {{'name', 'template'}} objects")


# ---------------------------------------------------------------- chat template rendering
def _template_messages(messages: Any, source: str) -> list[dict]:
    """Messages as the template sees them: plain JSON data, keys whose value is None dropped."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"{source}: apply_chat_template needs a non-empty list of messages, got {messages!r}")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"{source}: a chat message must be a dict like {{'role': 'user', 'content': ...}}, got {message!r}")
        plain = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:  # the same aliasing transformers applies
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` (plain JSON data) with `fn` applied to every string in it, mapping keys included
    (a template may print them: `tool_calls | tojson`)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only, so the sandboxed template never sees a caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    for base in (bool, str, int, float):  # subclasses (enums, ...) lose their extra methods
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile_template(template: str, source: str) -> jinja2.Template:
    try:
        return _jinja_env().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{source}: chat template does not parse (line {e.lineno}: {e.message})") from None


class _SafeNamespace(jinja2.utils.Namespace):
    """jinja's `namespace()`, refusing underscore attributes (a route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- like jinja's, so namespace(self=...) works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        super().__setitem__(name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r} on a namespace")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
    when rendering text it is just its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ', which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (same options, helpers and filters)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_SafeNamespace, dict=_make_dict)
    return env
