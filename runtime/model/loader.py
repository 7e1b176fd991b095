"""Loading a model (or part of one) from a checkpoint folder or a GGUF file."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgetune.runtime.errors import ModelLoadError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.model.transformer import Block, CausalLM, rope_inv_freq
from edgetune.runtime.model.weights import SafetensorsCheckpoint


def resolve_model_folder(path: str | Path | None) -> Path:
    """A Hugging Face folder for `path`: a folder as is, a .gguf converted once (cached), 'embedded' = SmolLM2."""
    if path is not None and Path(path).is_dir():
        return Path(path)
    from edgetune.runtime.model.embedded import resolve_model_path

    return resolve_model_path(path)


def load_model(
    path: str | Path | None = "embedded",
    *,
    start: int = 0,
    end: int | None = None,
    edge: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> CausalLM:
    """Load blocks [start, end) and, if `edge`, the embeddings / final norm / LM head.

    Only those tensors are read from disk. The defaults load the whole model:

        >>> model = load_model("path/to/folder")          # or a .gguf file, or "embedded"
        >>> logits = model(input_ids)                     # (B, T, vocab)
    """
    folder = resolve_model_folder(path)
    config = ModelConfig.from_file(folder / "config.json")
    checkpoint = SafetensorsCheckpoint(folder)
    model = build_part(config, start, end, edge, lambda shapes: checkpoint.read(shapes, dtype, device), device)
    model.source_path = folder
    return model


def part_shapes(config: ModelConfig, start: int = 0, end: int | None = None, edge: bool = True) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor a part [start, end) (+ edge) loads."""
    with torch.device("meta"):
        model = CausalLM(config, start, config.num_layers if end is None else end, edge)
    params = dict(model.named_parameters())
    return {hf: tuple(params[n].shape) for n, hf in model.hf_names().items()}


def _convert(t: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype)


def build_part(config: ModelConfig, start: int, end: int | None, edge: bool,
               read: Callable[[dict[str, tuple[int, ...]]], dict[str, torch.Tensor]],
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               each_block: Callable[[Block], None] | None = None) -> CausalLM:
    """A frozen part whose tensors come from `read(checkpoint name -> shape)`.

    load_model reads from a local checkpoint; a node without the model file gets
    the same tensors from the coordinator (Ray's object store) and passes them in.
    Blocks are built on `device` one at a time, each handed to `each_block` (a quantizing
    node shrinks it there) before the next is built: the part never holds more than one
    block in its unconverted form.
    """
    end = config.num_layers if end is None else end
    if not 0 <= start <= end <= config.num_layers:
        raise ValueError(f"block range [{start}, {end}) is outside the model's {config.num_layers} blocks")
    with torch.device("meta"):
        model = CausalLM(config, start, end, edge)
    names = model.hf_names()  # param name -> checkpoint name
    params = dict(model.named_parameters())
    expected = {hf: tuple(params[n].shape) for n, hf in names.items()}
    tensors = dict(read(expected))  # popped below (the caller keeps its own dict)
    bad = sorted(hf for hf, shape in expected.items() if hf not in tensors or tuple(tensors[hf].shape) != shape)
    if bad:
        raise ModelLoadError(f"model part [{start}, {end}): missing or misshapen tensors {bad[:5]}")
    # every expected tensor is there, so the load is complete (strict would trip on buffers)
    def assign(prefix: str | None) -> None:
        mine = {n: hf for n, hf in names.items() if (prefix is None and not n.startswith("layers.")) or
                (prefix is not None and n.startswith(prefix))}
        # popped as they are used: a converted block drops out of this dict
        state = {n: _convert(tensors.pop(hf), device, dtype) for n, hf in mine.items()}
        model.load_state_dict(state, strict=False, assign=True)

    for i, block in enumerate(model.layers):
        assign(f"layers.{i}.")
        for p in block.parameters():
            p.requires_grad_(False)
        if each_block is not None:
            each_block(block)
    assign(None)  # the edge modules, if any
    model.inv_freq = rope_inv_freq(config).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
