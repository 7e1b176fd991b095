"""Counter-based randomness for dropout masks.

A mask is a pure function of its key (seed, step, micro_batch, layer, module,
...): the key is hashed to a 64-bit seed, and element i of the mask comes from
SplitMix64(seed + i * golden), computed with integer tensor ops on the tensor's
own device. So a replayed or recomputed micro-batch draws exactly the same
mask, on whatever node and device (CPU or CUDA) it runs, with no generator
state to carry around.
"""
from __future__ import annotations

import hashlib
import struct

import torch

_MASK64 = (1 << 64) - 1


def _signed(u: int) -> int:
    """A uint64 constant as the int64 torch stores (same bits)."""
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def key_seed(key: tuple[int | str, ...]) -> int:
    """A 63-bit seed derived from a key tuple of ints and strings."""
    h = hashlib.blake2b(digest_size=8)
    for part in key:
        data = part.encode() if isinstance(part, str) else struct.pack("<q", int(part))
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def keyed_uniform(shape: torch.Size | tuple[int, ...], key: tuple[int | str, ...] | torch.Tensor,
                  device: torch.device | str) -> torch.Tensor:
    """Uniform [0, 1) float32 values of `shape`, a pure function of `key` (device-independent).

    `key` may also be a row of `seed_table` (compiled blocks take it as an input)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if isinstance(key, torch.Tensor):
        seed, golden = key[0], key[1]
    else:
        seed, golden = key_seed(key), _GOLDEN
    z = torch.arange(numel, dtype=torch.int64, device=device) * golden + seed  # wraps mod 2^64
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 40).to(torch.float32) * (1.0 / (1 << 24))).view(shape)  # top 24 bits


def seed_table(keys: list[tuple[int | str, ...]], device: torch.device | str) -> torch.Tensor:
    """(len(keys), 2) int64: each key's seed beside the SplitMix64 increment; a row stands in for its key.

    The increment travels as data, not as a constant, because a compiler folds
    `arange * constant` into index arithmetic that does not wrap at 64 bits (torch.compile's
    inductor then fails); multiplied at run time, it wraps like eager code does."""
    return torch.tensor([[key_seed(k), _GOLDEN] for k in keys], dtype=torch.int64, device=device)


def splitmix64_reference(seed: int, index: int) -> float:
    """Plain-Python value of keyed_uniform's element `index` for a key seed (for tests)."""
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z = z ^ (z >> 31)
    return (z >> 40) / float(1 << 24)


def keyed_dropout(x: torch.Tensor, p: float, key: tuple[int | str, ...] | torch.Tensor) -> torch.Tensor:
    """Inverted dropout of x with probability p, mask drawn from `key` alone."""
    if p <= 0.0:
        return x
    keep = keyed_uniform(x.shape, key, x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)
