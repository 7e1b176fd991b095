"""Tiny random Hugging Face checkpoints for numeric tests (built with transformers, the reference)."""
from __future__ import annotations

from pathlib import Path

import torch

# Short training texts for tests that need a data file.
SAMPLE_TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "what is edgetune? a runtime that fine-tunes models.",
    "hello world, how are you today?",
    "adapters live on the edge; the backbone lives on the nodes.",
    "fine, thanks! the dog is lazy.",
    "the fox is quick and brown.",
    "nodes stream activations over grpc.",
    "a step either completes or is replayed whole.",
]

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


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "what is edgetune? a runtime that fine-tunes models from a weak device.",
    "hello world, how are you today? fine, thanks!",
    "adapters live on the edge; the backbone lives on the nodes.",
] * 20


def make_tiny_tokenizer(folder: Path, vocab_size: int = 96) -> None:
    """A small BPE tokenizer (ids 0..2: <|pad|>, <|im_start|>, <|im_end|> = eos) with a ChatML template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, limit_alphabet=50, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "bos_token": None, "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def make_tiny_folder(arch: str, folder: Path, seed: int = 0, **overrides):
    """make_tiny_model plus a tokenizer: a folder edgetune can fine-tune and chat with."""
    model = make_tiny_model(arch, folder, seed=seed, **overrides)
    make_tiny_tokenizer(folder, model.config.vocab_size)
    return model


# ------------------------------------------------ helpers shared by the PEFT tests
VOCAB = 96  # the tiny configs' vocabulary


def hf_model(folder: Path):
    """A fresh transformers model of a tiny checkpoint (fp32, eval): peft changes the one it wraps."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def token_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize(adapter, seed: int = 0, scale: float = 0.2) -> None:
    """Move every trained adapter tensor off its initial value (so zero-initialised B / up do matter);
    frozen ones (a sparse mask's indices) stay as they are."""
    gen = torch.Generator().manual_seed(seed)
    for _, t in adapter.named_parameters():
        t.add_(scale * torch.randn(t.shape, generator=gen).to(t.dtype))


def randomized_peft(folder: Path, peft_config, seed: int = 3, scale: float = 0.2):
    """peft.get_peft_model(hf_model(folder), peft_config) in eval mode, its trainable tensors moved off
    their initial values (so zero-initialised ones matter), e.g. to save_pretrained and load here."""
    import peft

    torch.manual_seed(0)  # peft's own initialisation
    pm = peft.get_peft_model(hf_model(folder), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return pm.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
