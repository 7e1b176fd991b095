"""The precision a node holds and runs its frozen blocks in (`edgetune node --dtype`).

The adapter's master copy and its optimizer stay fp32 on the edge whatever a node runs in: a
node casts the pushed adapter tensors to its dtype inside each forward, so autograd returns
their gradients in fp32, and it hands hidden states and their gradients to the wire in fp32
(the wire codec then decides what travels).

    >>> resolve_dtype("auto", "cpu")
    'fp32'
    >>> value_bytes("bf16")
    2
"""
from __future__ import annotations

from pathlib import Path

from edgetune.runtime.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_dtype(name: str) -> str:
    """`name` if it is one of DTYPES, else a ConfigError that lists them."""
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """The concrete dtype for `name` on `device`: `auto` is bf16 on a CUDA device that supports
    it and fp32 anywhere else; fp16/bf16 on a CPU are honoured (slow on most CPUs, but exact to
    what a GPU node computes)."""
    check_dtype(name)
    if name != "auto":
        return name
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
    return "fp32"


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX (oneDNN's bf16 GEMMs); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


BIG_VOCAB = 32768  # from here on the LM head is a laptop's biggest matmul: `auto` takes it in bf16


def resolve_head_dtype(name: str, device: str, vocab_size: int) -> str:
    """The edge's LM-head dtype for the loss: `auto` is bf16 for a vocabulary of BIG_VOCAB or more
    where the device computes bf16 natively (see native_bf16), fp32 elsewhere (a small head costs
    little, and fp32 keeps its loss exact)."""
    if name not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"head dtype {name!r}: choose one of auto, fp32, bf16")
    if name != "auto":
        return name
    return "bf16" if vocab_size >= BIG_VOCAB and native_bf16(device) else "fp32"


def dtype_name(dtype) -> str:
    """The concrete dtype name of a torch dtype: torch.bfloat16 -> 'bf16'."""
    torch_name = str(dtype).removeprefix("torch.")
    for name, t in _TORCH.items():
        if t == torch_name:
            return name
    raise ConfigError(f"{dtype} is not a dtype blocks run in ({', '.join(_TORCH)})")


def value_bytes(name: str) -> int:
    """Bytes one value of a concrete dtype takes."""
    if name not in _BYTES:
        raise ConfigError(f"dtype {name!r} is not a concrete dtype ({', '.join(_BYTES)})")
    return _BYTES[name]


def torch_dtype(name: str):
    """The torch dtype of a concrete dtype name (imports torch)."""
    import torch

    value_bytes(name)  # checks the name
    return getattr(torch, _TORCH[name])
