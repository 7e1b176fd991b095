"""Tiny random Hugging Face checkpoints for numeric tests (built with transformers, the reference)."""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "llama_tied", "llama3_scaled", "mistral", "qwen2")


def tiny_hf_config(arch: str = "llama", **overrides):
    import transformers

    common = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "llama_tied":
        cls = transformers.LlamaConfig
        common.update(tie_word_embeddings=True, num_key_value_heads=4)
    elif arch == "llama3_scaled":
        cls = transformers.LlamaConfig
        common.update(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif arch == "mistral":
        cls = transformers.MistralConfig
        common.update(sliding_window=None)
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
        common.update(use_sliding_window=False)
    else:
        raise ValueError(arch)
    common.update(overrides)
    return cls(**common)


def make_tiny_model(arch: str, folder: Path, seed: int = 0, **overrides):
    """Save a random tiny model of `arch` to `folder` in HF layout; return the transformers model (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # random norms and biases too, so a wrong norm/bias path cannot hide behind ones/zeros
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model
