"""On-device generation from an ONNX export with onnxruntime: no torch.

Reads the folder layout onnxruntime-genai uses (what `edgetune export` and
`python -m onnxruntime_genai.models.builder` write):

- `genai_config.json`: the decoder's file name, layer / head counts, I/O names
  (`past_key_values.%d.key` patterns), eos / bos / pad ids, context length;
- `model.onnx` (+ its external data): inputs `input_ids` (B, T) and
  `attention_mask` (B, past + T) int64, optionally `position_ids` (B, T),
  `past_key_values.{i}.key|value` (B, kv_heads, past, head_dim); outputs
  `logits` (B, T, V) and `present.{i}.key|value` (B, kv_heads, past + T, head_dim);
- the tokenizer files (`tokenizer.json`, `tokenizer_config.json`, maybe
  `chat_template.jinja`).

An adapter-inputs export also takes LoRA tensors as graph inputs
(`model.layers.0.self_attn.q_proj.lora_A.weight` (in, rank), `...lora_B.weight`
(rank, out), rank dynamic). With no adapter active they are fed with rank 0, so
the base model runs; `generate(..., adapter="a.onnx_adapter")` activates an
onnxruntime adapter file (`RunOptions.add_active_adapter`) instead.

    >>> gen = OnnxGenerator("exports/smollm2")
    >>> ids = gen.generate(gen.chat_prompt("What is the capital of France?"), max_new_tokens=32,
    ...                    on_token=lambda t: print(gen.decode([t]), end=""))
    >>> gen.decode(ids)
    'The capital of France is Paris.'
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgetune.runtime.errors import AdapterError, ConfigError, ModelLoadError
from edgetune.runtime.jsonfile import read_json_object
from edgetune.runtime.text.sampling import SamplingConfig
from edgetune.runtime.text.tokenizer import Tokenizer, load_tokenizer

GENAI_CONFIG = "genai_config.json"

# genai_config.json's I/O name keys and onnxruntime-genai's defaults for them.
_INPUT_DEFAULTS = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "position_ids": "position_ids",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
}
_OUTPUT_DEFAULTS = {
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

# Per layer: (key, value), each (B, kv_heads, seq, head_dim); numpy arrays or OrtValues.
KV = list[tuple[Any, Any]]


# ---------------------------------------------------------------- genai_config.json
@dataclass(frozen=True)
class GenaiConfig:
    """What the runtime needs from genai_config.json (the `model` object)."""

    filename: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    inputs: dict[str, str]   # key of _INPUT_DEFAULTS -> graph name (patterns keep their %d)
    outputs: dict[str, str]  # key of _OUTPUT_DEFAULTS -> graph name

    def past_names(self, layer: int) -> tuple[str, str]:
        return self.inputs["past_key_names"] % layer, self.inputs["past_value_names"] % layer

    def present_names(self, layer: int) -> tuple[str, str]:
        return self.outputs["present_key_names"] % layer, self.outputs["present_value_names"] % layer


def read_genai_config(folder: str | Path) -> GenaiConfig:
    """Parse `folder/genai_config.json`; every problem is reported in one ConfigError."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{path}: not found; an ONNX export folder needs the {GENAI_CONFIG} that "
                             "`edgetune export` (or onnxruntime-genai's model builder) writes")
    model = read_json_object(path, ConfigError).get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise ConfigError(f"{path}: expected an object with 'model': {{'decoder': {{...}}}}")
    problems: list[str] = []

    def integer(obj: dict, key: str, where: str, required: bool = True) -> int | None:
        value = obj.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{where}.{key} must be a non-negative integer, got {value!r}")
            return None
        return value

    filename = decoder.get("filename")
    if not isinstance(filename, str) or not filename:
        problems.append(f"model.decoder.filename must name the ONNX file, got {filename!r}")
    sizes = {k: integer(decoder, k, "model.decoder") for k in ("num_hidden_layers", "num_key_value_heads", "head_size")}
    context_length = integer(model, "context_length", "model")
    eos = model.get("eos_token_id")
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos) if isinstance(eos, list) else None
    if eos_ids is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
        problems.append(f"model.eos_token_id must be an integer or a list of integers, got {eos!r}")
    inputs = _io_names(decoder, "inputs", _INPUT_DEFAULTS, problems)
    outputs = _io_names(decoder, "outputs", _OUTPUT_DEFAULTS, problems)
    bos, pad = integer(model, "bos_token_id", "model", False), integer(model, "pad_token_id", "model", False)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return GenaiConfig(filename, sizes["num_hidden_layers"], sizes["num_key_value_heads"], sizes["head_size"],
                       context_length, eos_ids, bos, pad, inputs, outputs)


def _io_names(decoder: dict, key: str, defaults: dict[str, str], problems: list[str]) -> dict[str, str]:
    given = decoder.get(key, {})
    if not isinstance(given, dict):
        problems.append(f"model.decoder.{key} must be an object of role -> graph name")
        return dict(defaults)
    names = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    for role, name in names.items():
        patterned = role.endswith("_names")
        if not isinstance(name, str) or patterned != ("%d" in name):
            want = "a name with one %d for the layer index" if patterned else "a graph name"
            problems.append(f"model.decoder.{key}.{role} must be {want}, got {name!r}")
    return names


# ---------------------------------------------------------------- prompts and sampling
def encode_prompt(
    tokenizer: Tokenizer, text: str, *, chat: bool = False, system: str | None = None, special_tokens_in_text: bool = False
) -> list[int]:
    """Token ids of a prompt: `text` as is, or (chat) a user turn rendered with the chat template,
    ending with the header of the assistant's reply.

    In a chat, special tokens spelled in `text` or `system` (`<|im_end|>`) are plain text, so
    they cannot end the user's turn, unless `special_tokens_in_text`.
    """
    if not chat:
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.encode_chat(messages, add_generation_prompt=True, split_special_tokens=not special_tokens_in_text)


def pick_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator | None) -> int:
    """One token from last-position logits (V,): argmax (first of ties), or a seeded sample."""
    if cfg.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()  # (V,)
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        sorted_p[np.cumsum(sorted_p) - sorted_p >= cfg.top_p] = 0.0
        probs = np.zeros_like(probs)
        probs[order] = sorted_p
        probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def position_ids(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last `length` tokens counting real tokens only: (B, total) -> (B, length)."""
    return np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)[:, -length:].astype(np.int64)


# ---------------------------------------------------------------- the generator
class OnnxGenerator:
    """An ONNX export loaded for generation: tokenizer, chat template and an ORT session.

    `providers` are onnxruntime execution providers (default: CPU); `threads` the
    intra-op threads (0: onnxruntime's default). The session runs at full graph
    optimisation (ORT_ENABLE_ALL).

        >>> gen = OnnxGenerator("exports/smollm2", threads=2)
        >>> new_ids = gen.generate("The capital of France is", max_new_tokens=8)
        >>> gen.generate(gen.chat_prompt("Hi"), greedy=False, temperature=0.7, top_p=0.9, seed=1,
        ...              adapter="exports/smollm2/support.onnx_adapter")
    """

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None, threads: int = 0) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelLoadError(f"{self.folder}: ONNX export folder not found; pass the --out folder of `edgetune export`")
        self.config = read_genai_config(self.folder)
        info = self.folder / "edgetune_export.json"  # absent in other exporters' folders
        self.virtual_tokens = int(read_json_object(info, ModelLoadError).get("virtual_tokens", 0)) if info.exists() else 0
        self.tokenizer = load_tokenizer(self.folder)
        self.session = _open_session(self.folder / self.config.filename, providers, threads)
        self._check_graph()
        self._adapters: dict[str, tuple[ort.LoraAdapter, dict[str, ort.OrtValue]]] = {}

    # ------------------------------------------------------------ graph I/O
    def _check_graph(self) -> None:
        """Match the graph's inputs/outputs to genai_config.json; find position_ids and adapter inputs."""
        cfg, where = self.config, f"{self.folder / self.config.filename} vs {self.folder / GENAI_CONFIG}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        past = [n for layer in range(cfg.num_layers) for n in cfg.past_names(layer)]
        present = [n for layer in range(cfg.num_layers) for n in cfg.present_names(layer)]
        need_in = [cfg.inputs["input_ids"], cfg.inputs["attention_mask"], *past]
        missing = [n for n in need_in if n not in inputs] + [n for n in [cfg.outputs["logits"], *present] if n not in outputs]
        if missing:
            raise ModelLoadError(f"{where}: the model lacks {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                                 f"({len(missing)} names the config promises); re-export the folder")
        first = inputs[past[0]]
        self.kv_dtype = _ORT_FLOATS.get(first.type)
        shape = list(first.shape)
        fits = len(shape) == 4 and all(not isinstance(got, int) or got == want
                                       for got, want in ((shape[1], cfg.num_kv_heads), (shape[3], cfg.head_size)))
        if self.kv_dtype is None or not fits:
            raise ModelLoadError(f"{where}: {first.name} is {first.type} {shape}, but the config says "
                                 f"(batch, {cfg.num_kv_heads}, past, {cfg.head_size}) float; re-export the folder")
        self.takes_positions = cfg.inputs["position_ids"] in inputs
        self._output_names = [cfg.outputs["logits"], *present]  # fetched by every step
        known = set(need_in) | {cfg.inputs["position_ids"]}
        extra = {n: i for n, i in inputs.items() if n not in known}
        for name, arg in extra.items():
            if not _is_adapter_input(arg):
                raise ModelLoadError(f"{where}: graph input {name} ({arg.type} {arg.shape}) is neither in the config "
                                     "nor an adapter input with a dynamic rank dimension")
        # Adapter tensors may also be initializers listed as inputs (overridable, e.g. holding zero-rank
        # defaults); plain weights that old exporters list as inputs have no dynamic dimension.
        overridable = {i.name: i for i in self.session.get_overridable_initializers() if _is_adapter_input(i)}
        self.adapter_inputs = {**overridable, **extra}
        self._no_adapter = {n: _zero_rank(arg) for n, arg in self.adapter_inputs.items()}

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: KV | None,
             adapter: str | Path | None = None) -> tuple[ort.OrtValue, KV]:
        """One forward pass: (B, T) ids, (B, past + T) mask -> logits (B, T, V) and presents, as OrtValues."""
        cfg = self.config
        B, T = input_ids.shape
        if B > 1 and T > 1 and (attention_mask.shape[1] > T or self.virtual_tokens):
            # onnxruntime's GroupQueryAttention refuses it; say why in our terms
            raise ConfigError(f"{self.folder}: {T} new tokens after past context (a continued conversation, or the "
                              "prefix of a prefix/prompt-tuning export) run one sequence at a time on this graph; "
                              f"got a batch of {B}: call once per sequence")
        arrays: dict[str, Any] = {cfg.inputs["input_ids"]: input_ids.astype(np.int64),
                                  cfg.inputs["attention_mask"]: attention_mask.astype(np.int64)}
        if self.takes_positions:
            arrays[cfg.inputs["position_ids"]] = position_ids(attention_mask, T)
        if past is None:  # the first pass: an empty cache
            empty = np.zeros((B, cfg.num_kv_heads, 0, cfg.head_size), self.kv_dtype)
            past = [(empty, empty)] * cfg.num_layers
        for layer, kv in enumerate(past):
            arrays.update(zip(cfg.past_names(layer), kv))
        feeds = {n: a if isinstance(a, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                 for n, a in arrays.items()}
        run_options = None
        feeds.update(self._no_adapter)
        if adapter is not None:
            lora, params = self._load_adapter(adapter)
            run_options = ort.RunOptions()
            run_options.add_active_adapter(lora)
            # onnxruntime's Python run() wants every graph input fed, and appends the active adapter's
            # tensors after the feeds: feeding those same tensors keeps the result independent of which
            # copy it takes.
            feeds.update(params)
        out = self.session.run_with_ort_values(self._output_names, feeds, run_options)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(cfg.num_layers)]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, past: KV | None = None,
               adapter: str | Path | None = None) -> tuple[np.ndarray, KV]:
        """One pass: logits (B, T, V) float32 and the presents [(key, value) per layer] as numpy.

        `attention_mask` (B, past + T) defaults to all ones; `past` is a previous call's presents.

            >>> logits, kv = gen.logits(np.array([[5, 6, 7]]))
            >>> step, kv = gen.logits(np.array([[8]]), np.ones((1, 4), np.int64), past=kv)
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            past_len = 0 if past is None else np.asarray(past[0][0]).shape[2]
            attention_mask = np.ones((input_ids.shape[0], past_len + input_ids.shape[1]), np.int64)
        logits, presents = self._run(input_ids, np.asarray(attention_mask), past, adapter)
        return logits.numpy().astype(np.float32), [(k.numpy(), v.numpy()) for k, v in presents]

    # ------------------------------------------------------------ adapters
    def _load_adapter(self, path: str | Path) -> tuple[ort.LoraAdapter, dict[str, ort.OrtValue]]:
        """An `.onnx_adapter` file, checked against the graph's adapter inputs once, then cached."""
        key = str(Path(path).resolve())
        if key in self._adapters:
            return self._adapters[key]
        if not self.adapter_inputs:
            raise AdapterError(f"{path}: {self.folder} was exported without adapter inputs; "
                               "re-export with `edgetune export --mode adapter-inputs` to switch adapters")
        if not Path(path).is_file():
            raise AdapterError(f"{path}: adapter file not found (an .onnx_adapter written by `edgetune export`)")
        try:
            params = ort.AdapterFormat.read_adapter(key).get_parameters()
            lora = ort.LoraAdapter()
            lora.Load(key)
        except Exception as e:  # onnxruntime raises plain RuntimeErrors for unreadable files
            raise AdapterError(f"{path}: not a readable onnxruntime adapter file ({e})") from None
        self._check_adapter(path, params)
        self._adapters[key] = (lora, params)
        return self._adapters[key]

    def _check_adapter(self, path: str | Path, params: dict[str, ort.OrtValue]) -> None:
        problems = []
        for name, value in params.items():
            arg = self.adapter_inputs.get(name)
            if arg is None:
                problems.append(f"{name} is not an adapter input of the model")
                continue
            shape, fixed = value.shape(), arg.shape
            if value.data_type() != arg.type or len(shape) != len(fixed) or any(
                    isinstance(f, int) and f != s for f, s in zip(fixed, shape)):
                problems.append(f"{name} is {value.data_type()} {shape}, the model wants {arg.type} {fixed}")
        if problems:
            raise AdapterError(f"{path}: does not fit {self.folder} (trained on another base?): "
                               + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))

    # ------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (with the BOS the tokenizer adds, if any)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, text: str, system: str | None = None, special_tokens_in_text: bool = False) -> list[int]:
        """Token ids of `text` as a user turn (after an optional system message), rendered with the
        model's chat template and ending with the assistant header (add_generation_prompt).
        Special tokens spelled in the text are plain text unless `special_tokens_in_text`."""
        return encode_prompt(self.tokenizer, text, chat=True, system=system, special_tokens_in_text=special_tokens_in_text)

    # ------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        *,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos: Sequence[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        adapter: str | Path | None = None,
    ) -> list[int]:
        """The new token ids (the prompt's not included) for one prompt: text, or token ids.

        The prompt runs once; then each new token runs alone against the KV cache.
        Generation stops after an `eos` token (default: genai_config's eos ids; `()`
        never stops), after `max_new_tokens`, or when prompt + new tokens fill the
        model's context_length. `on_token(id)` is called as each token is chosen, for
        streaming. `adapter` names an `.onnx_adapter` file to activate (adapter-inputs
        exports only); None runs the base model.
        """
        cfg = SamplingConfig(max_new_tokens, greedy, temperature, top_p, seed)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        context = self.config.context_length
        if not ids or len(ids) >= context:
            raise ConfigError(f"generation: the prompt has {len(ids)} tokens; it needs 1 to {context - 1} "
                              f"(the model's context_length is {context})")
        stop = set(self.config.eos_token_ids if eos is None else eos)
        rng = None if greedy else np.random.default_rng(seed)
        mask = np.ones((1, len(ids)), np.int64)  # (1, tokens so far)
        logits, past = self._run(np.array([ids], np.int64), mask, None, adapter)
        new: list[int] = []
        for _ in range(min(cfg.max_new_tokens, context - len(ids))):
            token = pick_token(logits.numpy()[0, -1], cfg, rng)  # logits (1, T, V)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or len(new) == cfg.max_new_tokens or len(ids) + len(new) == context:
                break
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self._run(np.array([[token]], np.int64), mask, past, adapter)
        return new


def _open_session(path: Path, providers: Sequence[str] | None, threads: int) -> ort.InferenceSession:
    if not path.is_file():
        raise ModelLoadError(f"{path}: ONNX model file not found (genai_config.json's model.decoder.filename)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(0, int(threads))
    options.log_severity_level = 3  # errors only: graph warnings are for exporters, not for a device's console
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types for a bad file
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None


def _is_adapter_input(arg: Any) -> bool:
    """A float graph input with a dynamic (rank) dimension, like lora_A (in, rank) / lora_B (rank, out)."""
    return arg.type in _ORT_FLOATS and any(not isinstance(d, int) for d in arg.shape)


def _zero_rank(arg: Any) -> ort.OrtValue:
    """The 'no adapter' value of an adapter input: its dynamic (rank) dimensions set to 0, e.g. (in, 0)."""
    shape = [d if isinstance(d, int) else 0 for d in arg.shape]
    return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _ORT_FLOATS[arg.type]))
