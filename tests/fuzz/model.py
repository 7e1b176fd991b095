"""The tiny model the fuzz targets serve: a 2-block Llama of width 32, random and seeded.

Written as a Hugging Face folder (config.json + model.safetensors) with edgetune's own model
code, so a fuzz worker starts without importing transformers (tests/tiny.py builds the same
shape of model with transformers, for numeric tests that need it as the reference).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# tests/tiny.py's tiny_hf_config("llama"): 2 blocks, width 32, 4 heads of 8, 2 KV heads
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
}
HIDDEN = CONFIG["hidden_size"]
LAYERS = CONFIG["num_hidden_layers"]


def write_tiny_folder(folder: Path, seed: int = 0) -> Path:
    """config.json and model.safetensors of the tiny model (the same bytes for the same seed)."""
    from safetensors.torch import save_file

    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.loader import build_part

    gen = torch.Generator().manual_seed(seed)

    def read(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(shapes):
            if name.endswith("norm.weight"):
                out[name] = torch.rand(shapes[name], generator=gen) + 0.5
            else:
                out[name] = torch.randn(shapes[name], generator=gen) * 0.1
        return out

    config = ModelConfig.from_hf_dict(CONFIG)
    model = build_part(config, 0, None, True, read)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file({k: v.contiguous() for k, v in model.hf_state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def tiny_shard(folder: Path, name: str = "node-0"):
    """A Shard serving both blocks of the tiny model in `folder`, as start_route builds one."""
    from edgetune.nodes.shard import Shard
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint

    part = load_model(folder, start=0, end=LAYERS, edge=False)
    return Shard(name, str(folder), part, fingerprint(checkpoint_manifest(folder)), max_cached=8)
