"""Counter-based randomness for dropout masks.

A mask is a pure function of its key (seed, step, micro_batch, layer, module...):
the key is hashed to a 64-bit seed for a fresh Philox/MT generator. A replayed
or recomputed micro-batch (e.g. on a node that lost its saved activations)
therefore draws exactly the same masks, wherever it runs.
"""
from __future__ import annotations

import hashlib
import struct

import torch


def key_seed(key: tuple[int | str, ...]) -> int:
    """A 63-bit seed derived from a key tuple of ints and strings."""
    h = hashlib.blake2b(digest_size=8)
    for part in key:
        data = part.encode() if isinstance(part, str) else struct.pack("<q", int(part))
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def keyed_dropout(x: torch.Tensor, p: float, key: tuple[int | str, ...]) -> torch.Tensor:
    """Inverted dropout of x with probability p, mask drawn from `key` alone."""
    if p <= 0.0:
        return x
    gen = torch.Generator(device=x.device)
    gen.manual_seed(key_seed(key))
    keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) >= p
    return x * keep.to(x.dtype) / (1.0 - p)
