"""GGUF (llama.cpp) -> Hugging Face folder, converted once and cached.

A GGUF file of a Llama-architecture model becomes a folder edgetune (and
transformers) loads like any other checkpoint:

    config.json, generation_config.json     from the `llama.*` / `tokenizer.ggml.*` metadata
    model.safetensors                       every tensor dequantized to float32
    tokenizer.json, tokenizer_config.json   byte-level BPE rebuilt from the vocabulary and merges

Supported tensor types: F32, F16, Q8_0, Q4_0, Q4_1. Supported tokenizer: `gpt2`
(byte-level BPE). Everything else is refused with UnsupportedModelError naming
it; a file that is not a readable GGUF raises ModelLoadError naming the file.

Conversion is atomic (written to a temporary folder next to the target, then
renamed), serialized across processes by a lock file, and skipped when the
target already holds a finished conversion of the same source. The `gguf`
package (the `train` extra) is imported only when a file is read.

    >>> folder = cached_hf_folder("SmolLM2-135M-Instruct.Q4_1.gguf")   # ~/.cache/edgetune/gguf/<sha256>
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.runtime.atomic import atomic_write_text
from edgetune.runtime.errors import ConfigError, EdgetuneError, ModelLoadError, UnsupportedModelError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.text.tokenizer import Tokenizer

# Bump when the converted folder's content changes, so older caches are converted again.
FORMAT_VERSION = 1
MARKER_FILE = ".edgetune-converted"  # written last: its presence means the folder is complete
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face parameter name.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# tokenizer.ggml.pre -> how text is split before BPE, chosen as transformers' GGUF loader does:
# these use GPT-2's built-in split regex (ByteLevel with use_regex) ...
_GPT2_SPLIT_PRE = ("default", "gpt2", "smollm")
# ... and these Llama 3's (tiktoken cl100k-style) pattern.
_LLAMA3_SPLIT_PRE = ("llama-bpe", "llama3", "llama-v3")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


# ================================================================ public API
def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert `gguf_path` into the Hugging Face folder `out_dir` (returned).

    Returns at once when `out_dir` already holds a finished conversion of this
    file. Safe to call from several processes at once: one converts, the others
    wait and reuse its result. A stale `out_dir` (older converter, other source)
    is replaced; a non-empty folder that edgetune did not write is refused.
    """
    return _convert(Path(gguf_path), Path(out_dir), sha256=None)


def cached_hf_folder(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The converted folder of `gguf_path` in the conversion cache, converting it on first use.

    The cache lives in `cache_dir`, else `$EDGETUNE_CACHE`, else
    `~/.cache/edgetune`; the folder is `gguf/<sha256 of the file>`.
    """
    src = _existing_file(Path(gguf_path))
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    sha = file_sha256(src, root)
    return _convert(src, root / "gguf" / sha, sha256=sha)


def gguf_config(gguf_path: str | Path) -> ModelConfig:
    """The model config in a GGUF file's header, reading no tensor data (`edgetune plan`)."""
    path = _existing_file(Path(gguf_path).expanduser())
    reader = _open_gguf(path)
    return _model_config(_metadata(reader, path), {t.name for t in reader.tensors}, path)


def default_cache_root() -> Path:
    """`$EDGETUNE_CACHE`, else `~/.cache/edgetune`."""
    env = os.environ.get("EDGETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgetune"


def file_sha256(path: str | Path, cache_root: str | Path | None = None) -> str:
    """Hex sha256 of a file, remembered under `cache_root/hashes` keyed by path, size and mtime.

    Hashing a 100 MB model takes a noticeable fraction of a second; a second
    call for an unchanged file only stats it.
    """
    path = _existing_file(Path(path)).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    entry = root / "hashes" / (hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):  # no or a corrupt entry
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    digest = _hash_file(path)
    with contextlib.suppress(OSError):  # an unwritable cache only costs hashing again next time
        atomic_write_text(entry, json.dumps({**key, "sha256": digest}, sort_keys=True))
    return digest


# ================================================================ conversion driver
def _convert(src: Path, out: Path, sha256: str | None) -> Path:
    src = _existing_file(src)
    fingerprint = _Fingerprint(src, sha256)
    if _is_complete(out, fingerprint):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgetuneError(f"{out.parent}: cannot create the conversion folder ({e}); "
                            "set EDGETUNE_CACHE to a writable folder or choose another output folder") from None
    with _exclusive_lock(out.parent / f".{out.name}.lock"):
        if _is_complete(out, fingerprint):  # another process finished while we waited
            return out
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_hf_folder(src, tmp)
            atomic_write_text(tmp / MARKER_FILE, json.dumps(fingerprint.marker(), indent=2, sort_keys=True))
            _fsync_tree(tmp)
            _replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


class _Fingerprint:
    """What identifies the source file; its sha256 is computed only when size/mtime do not settle it."""

    def __init__(self, src: Path, sha256: str | None) -> None:
        stat = src.stat()
        self.name, self.size, self.mtime_ns = src.name, stat.st_size, stat.st_mtime_ns
        self._src, self._sha256 = src, sha256

    @functools.cached_property
    def sha256(self) -> str:
        return self._sha256 or _hash_file(self._src)

    def marker(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "source": self.name, "size": self.size, "mtime_ns": self.mtime_ns,
                "sha256": self.sha256}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(out: Path, fingerprint: _Fingerprint) -> bool:
    marker = _read_marker(out)
    if marker is None or marker.get("format") != FORMAT_VERSION or marker.get("size") != fingerprint.size:
        return False
    return marker.get("mtime_ns") == fingerprint.mtime_ns or marker.get("sha256") == fingerprint.sha256


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, first moving a stale conversion there out of the way."""
    if out.exists():
        if not out.is_dir() or (_read_marker(out) is None and any(out.iterdir())):
            raise ModelLoadError(
                f"{out}: exists and is not an edgetune conversion; remove it or choose another output folder"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "stale")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, out)


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of conversions that died; only called while holding the lock."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for leftover in out.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (kept on disk: deleting lock files races)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename in _replace_folder is still atomic
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_hf_folder(src: Path, folder: Path) -> None:
    """Everything but the marker: validate all metadata first, then dequantize tensor by tensor."""
    from safetensors.numpy import save_file

    reader = _open_gguf(src)
    meta = _metadata(reader, src)
    config = _model_config(meta, {t.name for t in reader.tensors}, src)
    tokenizer = _gguf_tokenizer(meta, src)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    tensors = _hf_tensors(reader, config, src)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(folder / "config.json", config.to_hf_dict())
    _write_json(folder / "generation_config.json", _generation_config(config))
    tokenizer.save(folder)


# ================================================================ reading the GGUF
def _existing_file(path: Path) -> Path:
    if not path.is_file():
        what = "is a folder, not a .gguf file" if path.is_dir() else "file not found"
        raise ModelLoadError(f"{path}: {what}")
    return path


def _open_gguf(path: Path) -> Any:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except EdgetuneError:
        raise
    except Exception as e:  # the reader parses untrusted bytes: any failure means a bad file
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or another format"
        ) from None
    if reader.byte_order != "I":
        raise UnsupportedModelError(f"{path}: big-endian GGUF files are not supported")
    return reader


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # a corrupt key/value section
        raise ModelLoadError(f"{path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from None


def _f32(value: Any) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that is the
    # same float32 is what the original config.json said.
    return float(str(np.float32(value)))


def _model_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UnsupportedModelError(f"{path}: architecture {arch!r} is not supported (supported: {supported})")
    _refuse_unsupported_features(meta, tensor_names, path)

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ModelLoadError(f"{path}: GGUF metadata key 'llama.{key}' is missing")
        return meta[f"llama.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // max(heads, 1)))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{path}: attention.value_length != key_length is not supported")
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        rotary = meta["llama.rope.dimension_count"]
        raise UnsupportedModelError(
            f"{path}: partial rotary embeddings (rope.dimension_count {rotary} < head_dim {head_dim}) are not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    try:
        return ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=int(meta.get("llama.vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=int(meta.get("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos_ids)),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
    except ConfigError as e:
        raise ModelLoadError(f"{path}: GGUF metadata describes an invalid model ({e})") from None


def _refuse_unsupported_features(meta: dict[str, Any], tensor_names: set[str], path: Path) -> None:
    scaling = meta.get("llama.rope.scaling.type", "none")
    factor = float(meta.get("llama.rope.scaling.factor", 1.0))
    if scaling not in ("none", "linear") or (scaling == "linear" and factor != 1.0):
        raise UnsupportedModelError(f"{path}: rope scaling {scaling!r} (factor {factor}) is not supported")
    if "rope_freqs.weight" in tensor_names:  # llama 3.1-style scaled rope, stored as per-frequency factors
        raise UnsupportedModelError(
            f"{path}: rope frequency factors (tensor 'rope_freqs.weight', Llama 3.1 rope scaling) are not supported")
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise UnsupportedModelError(f"{path}: mixture-of-experts models (llama.expert_count) are not supported")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{int(match.group(1))}.{_BLOCK_TENSORS[match.group(2)]}.weight"
    return None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the model needs (lm_head only when untied)."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for i in range(config.num_layers):
        for name, shape in config.linear_shapes().items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = (config.hidden_size,)
    return shapes


def _hf_tensors(reader: Any, config: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, under its HF name, Q/K rows back in HF's rotary order."""
    expected = _expected_shapes(config)
    named = {t.name: t for t in reader.tensors}
    unknown = sorted(n for n in named if _hf_name(n) not in expected)
    if unknown:
        raise UnsupportedModelError(f"{path}: unsupported tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    bad_types = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TENSOR_TYPES))
    if bad_types:
        supported = ", ".join(SUPPORTED_TENSOR_TYPES)
        raise UnsupportedModelError(f"{path}: tensor types {bad_types} are not supported (supported: {supported})")
    missing = sorted(set(expected) - {_hf_name(n) for n in named})
    if missing:
        raise ModelLoadError(f"{path}: tensors missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    rotary_heads = {".self_attn.q_proj.weight": config.num_heads, ".self_attn.k_proj.weight": config.num_kv_heads}
    out = {}
    for gguf_name in sorted(named):
        hf_name = _hf_name(gguf_name)
        weight = _dequantize(named[gguf_name], expected[hf_name], path)
        for suffix, n_head in rotary_heads.items():
            if hf_name.endswith(suffix):
                weight = _undo_rope_permutation(weight, n_head)
        out[hf_name] = weight
    return out


def _dequantize(tensor: Any, shape: tuple[int, ...], path: Path) -> np.ndarray:
    import gguf

    # GGUF lists dimensions fastest-first: (in, out) for a linear whose HF weight is (out, in).
    gguf_shape = tuple(int(d) for d in reversed(tensor.shape))
    if gguf_shape != shape:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has shape {gguf_shape}, the metadata implies {shape}")
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:  # a data section too short for its declared shape
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} is corrupt ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def _undo_rope_permutation(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation.

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... while HF rotates
    halves (x_i, x_{i + head_dim/2}); its converter reorders each head's rows
    with reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2). We undo that.
    """
    rows, cols = weight.shape  # (n_head * head_dim, hidden)
    half = rows // n_head // 2
    # (n_head, head_dim/2, 2, in) -> (n_head, 2, head_dim/2, in)
    return np.ascontiguousarray(weight.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols))


# ================================================================ tokenizer
@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table: byte-level BPE spells every token in it.

    Printable Latin-1 bytes stand for themselves; the others (controls, space,
    ...) get the characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _byte_level_spelling(token: str, alphabet: frozenset[str]) -> str:
    """A token as the BPE vocabulary spells it; files sometimes store raw text (e.g. ' ' for 'Ġ')."""
    if set(token) <= alphabet:
        return token
    table = _byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))


def _pre_tokenizer(pre: str, path: Path) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_SPLIT_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3_SPLIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    supported = ", ".join(_GPT2_SPLIT_PRE + _LLAMA3_SPLIT_PRE)
    raise UnsupportedModelError(f"{path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported (supported: {supported})")


def _gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Byte-level BPE from `tokenizer.ggml.*`, as transformers' GGUF loader builds it."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.model / tokens)")
    if kind != "gpt2":
        raise UnsupportedModelError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = frozenset(_byte_alphabet())
    spelled = [_byte_level_spelling(t, alphabet) for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or ()]
    if any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{path}: malformed tokenizer.ggml.merges entry (expected 'left right')")
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole and are special; one spelled outside
    # the byte alphabet is a mislabelled ordinary token. User-defined ones are matched whole too.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == _TOKEN_TYPE_CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind_ in zip(tokens, types) if kind_ == _TOKEN_TYPE_USER_DEFINED and t in vocab])
    return Tokenizer(
        backend,
        special_tokens={name: _token_at(meta, key, spelled, path) for name, key in _SPECIAL_TOKEN_KEYS.items()},
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        source=str(path),
    )


def _token_at(meta: dict[str, Any], key: str, spelled: list[str], path: Path) -> str | None:
    if key not in meta:
        return None
    index = int(meta[key])
    if not 0 <= index < len(spelled):
        raise ModelLoadError(f"{path}: {key}={index} is outside the vocabulary of {len(spelled)} tokens")
    return spelled[index]


# ================================================================ small file helpers
def _generation_config(config: ModelConfig) -> dict[str, Any]:
    return config.special_token_fields()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a crash must not leave a marked, empty folder)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened on every platform
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hash_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(functools.partial(handle.read, chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()

