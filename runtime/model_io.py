"""Loading a model (or part of one) from a checkpoint folder or a GGUF file."""
from __future__ import annotations

from pathlib import Path

import torch

from edgetune.runtime.checkpoint import SafetensorsCheckpoint
from edgetune.runtime.config import ModelConfig
from edgetune.runtime.model import CausalLM, rope_inv_freq


def resolve_model_folder(path: str | Path | None) -> Path:
    """A Hugging Face folder for `path`: a folder as is, a .gguf converted once (cached), 'embedded' = SmolLM2."""
    if path is not None and Path(path).is_dir():
        return Path(path)
    from edgetune.runtime.embedded import resolve_model_path

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
    end = config.num_layers if end is None else end
    if not 0 <= start <= end <= config.num_layers:
        raise ValueError(f"block range [{start}, {end}) is outside the model's {config.num_layers} blocks")
    with torch.device("meta"):
        model = CausalLM(config, start, end, edge)
    names = model.hf_names()  # param name -> checkpoint name
    params = dict(model.named_parameters())
    tensors = SafetensorsCheckpoint(folder).read({hf: tuple(params[n].shape) for n, hf in names.items()}, dtype, device)
    # read() returned every expected tensor, so the load is complete (strict would trip on buffers)
    model.load_state_dict({n: tensors[hf] for n, hf in names.items()}, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.source_path = folder
    return model.eval()
