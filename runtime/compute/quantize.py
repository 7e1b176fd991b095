"""Frozen linear weights held quantized on a node (`edgetune node --quantize none|int8|nf4`).

QLoRA-style: the weights of every linear layer of a node's blocks are stored quantized and
dequantized on the fly, in forward and in the backward to the inputs (the weights themselves
are frozen, so nothing else needs them); norms and biases stay in the node's dtype. Both
formats come from torchao and run on CPU and CUDA:

- `nf4`: torchao's NF4Tensor (4-bit NormalFloat in blocks of 64 values, each block's scale
  quantized to int8 in blocks of `scaler_block_size` scales): about 0.52 bytes a value.
- `int8`: torchao's weight-only int8 (one scale per output row): about 1 byte a value.

Both are torch tensor subclasses that `F.linear` dispatches on, so the transformer's code runs
unchanged. DoRA reads the base weights themselves in every forward and is refused on a
quantized node (see `check_methods`).

    >>> bytes_per_value("nf4", "bf16") < bytes_per_value("int8", "bf16") < bytes_per_value("none", "bf16")
    True
"""
from __future__ import annotations

import logging

from edgetune.runtime.compute.precision import value_bytes
from edgetune.runtime.errors import ConfigError

SCHEMES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # values per NF4 block (one absmax scale each)
NF4_SCALER_BLOCKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # scales per second-level block, largest that fits


def check_scheme(name: str) -> str:
    if name not in SCHEMES:
        raise ConfigError(f"quantization {name!r}: choose one of {', '.join(SCHEMES)}")
    return name


def bytes_per_value(scheme: str, dtype: str) -> float:
    """Bytes one weight value takes on a node, scales included (the partitioner's figure)."""
    check_scheme(scheme)
    if scheme == "nf4":
        return 0.5 + 1 / NF4_BLOCK  # 4-bit codes + an int8 scale per block (second-level scales: negligible)
    if scheme == "int8":
        return 1.0  # + one scale per output row: negligible
    return float(value_bytes(dtype))


def nf4_scaler_block(numel: int, shape: tuple[int, ...]) -> int:
    """The largest second-level block that divides a tensor's NF4 blocks; ConfigError where
    the tensor does not split into blocks of NF4_BLOCK values."""
    if numel % NF4_BLOCK:
        raise ConfigError(f"nf4 needs weights whose size is a multiple of {NF4_BLOCK}; a {tuple(shape)} weight has "
                          f"{numel} values: use --quantize int8 or none for this model")
    blocks = numel // NF4_BLOCK
    return next(s for s in NF4_SCALER_BLOCKS if blocks % s == 0)


def _torchao():
    # Importing torchao logs a warning for each optional CUDA extension it cannot load and for
    # each enum it registers with torch.compile: nothing a user can act on, so not shown.
    logging.disable(logging.WARNING)
    try:
        import torchao.quantization
    except ImportError as e:
        raise ConfigError(f"--quantize int8/nf4 needs torchao ({e}); install the node's extra: "
                          "pip install 'edgetune[cluster]'") from None
    finally:
        logging.disable(logging.NOTSET)
    return torchao.quantization


def quantize_blocks(part, scheme: str) -> None:
    """Replace the linear weights of every block of `part` (a CausalLM) by quantized ones, in place."""
    for layer in range(part.start, part.end):
        quantize_block(part.block(layer), scheme)


def quantize_block(block, scheme: str) -> None:
    """Replace one block's linear weights by quantized ones, in place (the loader calls it as each
    block is built, so a node never holds its whole part unquantized)."""
    check_scheme(scheme)
    if scheme == "none":
        return
    import torch

    ao = _torchao()
    for linear in block.linears().values():
        w = linear.weight.detach()
        if scheme == "nf4":
            q = ao.to_nf4(w, NF4_BLOCK, nf4_scaler_block(w.numel(), tuple(w.shape)))
            linear.weight = torch.nn.Parameter(q, requires_grad=False)
        else:
            ao.quantize_(linear, ao.Int8WeightOnlyConfig())
            linear.weight.requires_grad_(False)


def tensor_bytes(t) -> int:
    """Bytes a tensor really holds: for a quantized tensor subclass, its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)  # only tensor subclasses have it
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


def plain_weight(weight):
    """The ordinary tensor a (possibly quantized) weight stands for: what its forward multiplies by."""
    if hasattr(weight, "get_original_weight"):  # torchao's NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize()  # weight-only int8; a plain tensor returns itself


def check_methods(methods, scheme: str, node: str) -> None:
    """ConfigError when a PEFT method cannot run on weights held as `scheme`."""
    if scheme == "none":
        return
    readers = [type(m).__name__ for m in methods if m.reads_base_weight]
    if readers:
        raise ConfigError(f"node {node} holds its blocks' weights quantized ({scheme}), but DoRA reads the base "
                          f"weights in every forward ({', '.join(readers)} with use_dora); train DoRA on nodes "
                          "started without --quantize, or use LoRA")
