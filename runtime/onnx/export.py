"""`edgetune export`: a base model plus a trained adapter as an ONNX folder for the device.

The folder is what onnxruntime-genai loads as it is: `model.onnx` (+ `model.onnx.data`,
external weights), `genai_config.json`, and the tokenizer files.

    >>> export(ExportOptions(model="embedded", adapter="runs/demo/run/adapter", out="export/"))

Modes:
- `merged`: the adapter is folded into the weights (exact for LoRA, DoRA, (IA)^3,
  LN tuning, BitFit), so the graph is the plain decoder (runtime/onnx/graph.py).
- `adapter-inputs` (LoRA): one base graph whose targeted layers take LoRA tensors as
  inputs with a dynamic rank, and the adapter as `adapter.onnx_adapter` (onnxruntime's
  adapter format); more adapters for the same base are switched at run time.

Everything a user can get wrong (paths, an adapter of another base model, a method the
mode cannot export, an unwritable folder) is checked before the long work starts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.runtime.errors import AdapterError, ConfigError

MODES = ("merged", "adapter-inputs")
DTYPES = ("fp32", "fp16")
QUANTIZE = (None, "int8", "int4")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
ADAPTER_FILE = "adapter.onnx_adapter"
DATA_FILE = "model.onnx.data"
EXPORT_INFO = "edgetune_export.json"


@dataclass(frozen=True)
class ExportOptions:
    model: str = "embedded"
    out: str = "export"
    adapter: str | None = None
    mode: str = "merged"
    dtype: str = "fp32"
    quantize: str | None = None
    context_length: int = 0  # 0: the model's max_position_embeddings

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} not in {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {', '.join(DTYPES)}")
        if self.quantize not in QUANTIZE:
            problems.append(f"quantize {self.quantize!r} not in int8, int4")
        if self.mode == "adapter-inputs" and self.adapter is None:
            problems.append("mode adapter-inputs needs --adapter (the LoRA adapter to write as .onnx_adapter)")
        if self.context_length < 0:
            problems.append(f"context_length must be >= 0, got {self.context_length}")
        if problems:
            raise ConfigError("export: " + "; ".join(problems))


def export(opts: ExportOptions) -> Path:
    """Write the ONNX folder; returns its path."""
    from edgetune.runtime.model.loader import load_model, resolve_model_folder
    from edgetune.runtime.onnx.graph import build_decoder

    out = _writable(Path(opts.out))
    folder = resolve_model_folder(opts.model)
    adapter_dir = _adapter_folder(opts.adapter)
    model = load_model(folder)
    adapter = None
    lora: dict[str, str] = {}
    extras = None
    if adapter_dir is not None:
        from edgetune.runtime.peft.hf_format import load_adapter

        adapter = load_adapter(model, adapter_dir)  # AdapterError when it does not fit this base
        model.adapter = None
        if opts.mode == "merged":
            extras = merge_or_extract(adapter, model)
        else:
            lora = _lora_layers(adapter)  # the base graph: LoRA arrives as inputs
    proto = build_decoder(model, opts.dtype, lora, opts.context_length or None, extras,
                          untie_head=opts.quantize is not None)
    if opts.quantize:
        proto = _quantize(proto, opts.quantize, tied=model.config.tie_word_embeddings)
    _save(proto, out)
    if lora:
        write_onnx_adapter(adapter, model, out / ADAPTER_FILE, opts.dtype)
    _write_genai_config(model.config, out, opts, folder, extras.virtual_tokens if extras else 0)
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, out / name)
    return out


# -- checks before the work ---------------------------------------------------------------
def _writable(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".edgetune-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"export: cannot write to {out} ({e.strerror or e}); pick another --out") from None
    return out


def _adapter_folder(path: str | None) -> Path | None:
    if path is None:
        return None
    folder = Path(path)
    if not (folder / "adapter_config.json").exists():
        raise AdapterError(f"export: {folder} is not an adapter folder (no adapter_config.json); "
                           "pass the adapter/ folder of a finetune run")
    return folder


def _lora_layers(adapter) -> dict[str, str]:
    """Full names of the linear layers a LoRA/DoRA adapter targets -> "lora" | "dora" (adapter-inputs)."""
    from edgetune.runtime.peft import LoraConfig

    if len(adapter.methods) != 1 or not isinstance(adapter.methods[0], LoraConfig):
        names = ", ".join(type(m).__name__ for m in adapter.methods)
        raise AdapterError(f"export --mode adapter-inputs takes a LoRA or DoRA adapter; this one is {names} "
                           "(export it with --mode merged)")
    kind = "dora" if adapter.methods[0].use_dora else "lora"
    return {f"model.layers.{layer}.{key.rsplit('.', 1)[0]}": kind
            for layer, tensors in adapter.block_tensors[0].items() for key in tensors if key.endswith(".lora_A")}


def merge_or_extract(adapter, model):
    """Fold every mergeable method into `model`'s weights; return the others as GraphExtras.

    Bottleneck adapters become graph nodes; prefix and prompt tuning become constant
    keys/values ahead of the KV cache (at most one of the two in a stack). UniPELT's gated
    parts become graph nodes too (GraphExtras.unipelt), where it is the stack's last method
    and every other one merges: it then wraps the merged linears as it wraps them in PyTorch.
    """
    import torch

    from edgetune.runtime.onnx.graph import GraphExtras
    from edgetune.runtime.peft import ParallelAdapterConfig, PrefixTuningConfig, PromptTuningConfig, SerialAdapterConfig
    from edgetune.runtime.peft.unipelt import UniPeltConfig

    check_exportable(adapter.methods)
    extras = GraphExtras()
    layers = range(model.config.num_layers)
    if any(isinstance(m, PromptTuningConfig) for m in adapter.methods):
        extras.prefix = _prompt_keys_values(adapter, model)  # before merging: the whole adapter acts
    with torch.no_grad():
        for k, (method, blocks, edge) in enumerate(zip(adapter.methods, adapter.block_tensors, adapter.edge_tensors)):
            if method.mergeable:
                for layer, t in adapter.merge_views(k).items():
                    method.merge(t, model.block(layer))
                method.merge_edge(edge, model)
            elif isinstance(method, (SerialAdapterConfig, ParallelAdapterConfig)):
                kind = "serial" if isinstance(method, SerialAdapterConfig) else "parallel"
                scaling = getattr(method, "scaling", 1.0)
                for layer, t in blocks.items():
                    extras.bottleneck.setdefault(layer, []).append((kind, t, method.activation, scaling))
            elif isinstance(method, PrefixTuningConfig):
                derived = method.derive_blocks(edge, layers) or blocks
                extras.prefix = {layer: (t["prefix_key"].float().numpy(), t["prefix_value"].float().numpy())
                                 for layer, t in derived.items()}
            elif isinstance(method, PromptTuningConfig):
                pass  # done above
            elif isinstance(method, UniPeltConfig):
                extras.unipelt = {layer: (method, t) for layer, t in blocks.items()}
    return extras


def check_exportable(methods) -> None:
    """Refuse (AdapterError) a method stack `--mode merged` cannot write: each method must merge or
    have graph ops, at most one method adds virtual tokens, and UniPELT comes last, after methods
    that all merge (it then wraps the merged linears as it wraps them in PyTorch)."""
    from edgetune.runtime.peft import ParallelAdapterConfig, PrefixTuningConfig, PromptTuningConfig, SerialAdapterConfig
    from edgetune.runtime.peft.unipelt import UniPeltConfig

    graph_ops = (SerialAdapterConfig, ParallelAdapterConfig, PrefixTuningConfig, PromptTuningConfig, UniPeltConfig)
    for method in methods:
        if not method.mergeable and not isinstance(method, graph_ops):
            raise AdapterError(f"export: {type(method).__name__} has no ONNX form yet")
    virtual = [type(m).__name__ for m in methods if isinstance(m, (PrefixTuningConfig, PromptTuningConfig))]
    if len(virtual) > 1:
        raise AdapterError(f"export: a stack with more than one virtual-token method ({', '.join(virtual)}) "
                           "is not supported")
    if any(isinstance(m, UniPeltConfig) for m in methods[:-1]) or (
            isinstance(methods[-1], UniPeltConfig) and not all(m.mergeable for m in methods[:-1])):
        names = ", ".join(type(m).__name__ for m in methods)
        raise AdapterError(f"export: UniPELT exports as the last method of a stack whose other methods all merge "
                           f"(LoRA, (IA)^3, ...); this stack is {names}")


def _prompt_keys_values(adapter, model) -> dict:
    """Prompt tuning's virtual tokens come first, so causal attention keeps their keys and values
    (every layer's, rotated at positions 0..P-1) independent of the input: run them once, with
    the whole adapter, and store the result. layer -> (keys, values), each (P, KVH, hd)."""
    import torch

    from edgetune.runtime.model.transformer import KVCache

    cache = KVCache()
    model.adapter = adapter
    try:
        with torch.no_grad():
            model(torch.zeros(1, 0, dtype=torch.long), cache=cache)  # no real token: the virtual ones alone
    finally:
        model.adapter = None
    return {layer: tuple(t[0].transpose(0, 1).float().numpy() for t in kv) for layer, kv in cache.layers.items()}


# -- writing ----------------------------------------------------------------------------
def _save(proto, out: Path) -> None:
    import onnx

    for stale in (out / "model.onnx", out / DATA_FILE):
        stale.unlink(missing_ok=True)  # external data is appended to: start clean
    onnx.save_model(proto, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def write_onnx_adapter(adapter, model, path: Path, dtype: str = "fp32") -> Path:
    """The LoRA tensors as onnxruntime's adapter file: A^T (in, r) and scaling * B^T (r, out) per layer,
    plus DoRA's per-output scale m / ||W + s B A|| (it needs the base weights of `model`)."""
    import onnxruntime as ort
    import torch

    method = adapter.methods[0]
    npdt = np.float16 if dtype == "fp16" else np.float32
    params = {}
    with torch.no_grad():
        for layer, tensors in adapter.block_tensors[0].items():
            for key, a in tensors.items():
                if not key.endswith(".lora_A"):
                    continue
                module = key.rsplit(".", 1)[0]
                b = tensors[f"{module}.lora_B"].float()
                name = f"model.layers.{layer}.{module}"
                params[f"{name}.lora_A.weight"] = a.float().T.contiguous().numpy().astype(npdt)
                params[f"{name}.lora_B.weight"] = (method.scaling * b).T.contiguous().numpy().astype(npdt)
                if method.use_dora:
                    weight = model.block(layer).get_submodule(module).weight.float()
                    norm = (weight + method.scaling * (b @ a.float())).norm(dim=1)
                    scale = tensors[f"{module}.lora_magnitude_vector"].float() / norm
                    params[f"{name}.dora_scale"] = scale.numpy().astype(npdt)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))
    return path


# Weight-only quantization as onnxruntime-genai's builder does it for CPUs: MatMulNBits,
# symmetric blocks of 32 weights, int8 compute inside the kernel (accuracy level 4).
QUANT_BLOCK_SIZE = 32
QUANT_ACCURACY_LEVEL = 4


def _quantize(model, precision: str, tied: bool = False):
    """The graph with every weight MatMul as MatMulNBits (4 or 8 bits) and the embedding lookup as
    GatherBlockQuantized on blocks of the same kind; LoRA MatMuls stay float."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per MatMul otherwise

    lora = [n.name for n in model.graph.node if n.op_type == "MatMul" and any("lora_" in i for i in n.input)]
    bits = 4 if precision == "int4" else 8
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK_SIZE,
                                     is_symmetric=True, accuracy_level=QUANT_ACCURACY_LEVEL, nodes_to_exclude=lora)
    quantizer.process()
    model = quantizer.model.model
    _quantize_embedding(model, bits, tied)
    return model


def _quantize_embedding(model, bits: int, tied: bool) -> None:
    """The (V, D) embedding table as symmetric blocks along D (GatherBlockQuantized). A tied
    table is the LM head's own quantized weights, shared as onnxruntime-genai's builder does;
    an untied one is quantized here in the same layout."""
    from onnx import helper, numpy_helper

    from edgetune.runtime.onnx.graph import MS

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    at, gather = next(((i, n) for i, n in enumerate(graph.node) if n.op_type == "Gather" and n.input[0] in inits),
                      (None, None))
    if gather is None:
        return
    V, D = inits[gather.input[0]].dims  # the table (V, D)
    if D % QUANT_BLOCK_SIZE:
        return  # a partial last block would not line up with D: the table stays float
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"), None)
    if tied and head is not None and len(head.input) == 3:  # symmetric: no zero points
        data, scales = head.input[1], head.input[2]  # (V, D / block, block * bits / 8), (V, D / block)
    else:
        packed, scale = block_quantize(numpy_helper.to_array(inits[gather.input[0]]), bits, QUANT_BLOCK_SIZE)
        data, scales = f"{gather.input[0]}_Q{bits}", f"{gather.input[0]}_scales"
        graph.initializer.extend([numpy_helper.from_array(packed, data), numpy_helper.from_array(scale, scales)])
    shape = f"{gather.input[0]}_Q_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([V, -1], np.int64), shape))
    rows = f"{gather.name}/rows"
    nodes = [helper.make_node("Reshape", [data, shape], [rows], name=f"{gather.name}/Reshape"),  # (V, D * bits / 8)
             helper.make_node("GatherBlockQuantized", [rows, gather.input[1], scales], list(gather.output),
                              name=f"{gather.name}/GatherBlockQuantized", domain=MS, bits=bits,
                              block_size=QUANT_BLOCK_SIZE, gather_axis=0, quantize_axis=1)]
    graph.node.remove(gather)
    for k, node in enumerate(nodes):
        graph.node.insert(at + k, node)
    graph.initializer.remove(inits[gather.input[0]])


def block_quantize(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization along the last axis, in MatMulNBits' layout: (rows, cols)
    -> packed uint8 (rows, cols / block, block * bits / 8) and scales (rows, cols / block), with
    value = (q - 2^(bits-1)) * scale; 4-bit pairs hold the even column in the low nibble."""
    rows, cols = table.shape
    blocks = table.astype(np.float32).reshape(rows, cols // block, block)
    top = 2 ** (bits - 1) - 1
    scale = np.abs(blocks).max(axis=-1) / top
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(blocks / scale[..., None]), -top, top) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale.astype(table.dtype)


_GENAI_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _write_genai_config(cfg, out: Path, opts: ExportOptions, folder: Path, virtual_tokens: int = 0) -> None:
    """genai_config.json: what onnxruntime-genai needs to run the folder as it is."""
    hf = json.loads((folder / "config.json").read_text())
    generation = folder / "generation_config.json"
    special = json.loads(generation.read_text()) if generation.exists() else {}
    eos = special.get("eos_token_id", hf.get("eos_token_id"))
    bos = special.get("bos_token_id", hf.get("bos_token_id"))
    pad = special.get("pad_token_id", hf.get("pad_token_id")) or (eos[0] if isinstance(eos, list) else eos)
    context = opts.context_length or cfg.max_position_embeddings
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
    }
    config = {
        "model": {"bos_token_id": bos, "context_length": context, "decoder": decoder, "eos_token_id": eos,
                  "pad_token_id": pad, "type": _GENAI_TYPES.get(cfg.architecture, "llama"),
                  "vocab_size": cfg.vocab_size},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    # what edgetune itself records (onnxruntime-genai refuses unknown keys in its config)
    (out / EXPORT_INFO).write_text(json.dumps({"mode": opts.mode, "dtype": opts.dtype, "quantize": opts.quantize,
                                               "adapter": ADAPTER_FILE if opts.mode == "adapter-inputs" else None,
                                               "base_model": str(folder),
                                               # prefix/prompt tuning: constant keys/values the graph puts
                                               # ahead of the caller's cache (and counts in the mask itself)
                                               "virtual_tokens": virtual_tokens}, indent=2))
