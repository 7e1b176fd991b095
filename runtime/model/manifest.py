"""Model fingerprints: proof that the edge and every node use the same weights.

The manifest of a checkpoint lists, for every tensor, its name, stored dtype,
shape and the SHA-256 of its bytes as stored. The fingerprint is the SHA-256 of
the sorted manifest. Nobody needs the whole model to check it: the coordinator
hashes the checkpoint once, and each node (and the edge) hashes only the
tensors it loaded and compares them with the manifest's entries.

    >>> entries = checkpoint_manifest(folder)            # every tensor
    >>> fp = fingerprint(entries)
    >>> verify(checkpoint_manifest(folder, names=mine), entries, who="node-a")
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from edgetune.runtime.errors import ModelLoadError
from edgetune.runtime.model.weights import SafetensorsCheckpoint
from edgetune.runtime.wire.messages import ManifestEntry


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in its own dtype, C order."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def checkpoint_manifest(folder: str | Path, names: Iterable[str] | None = None) -> list[ManifestEntry]:
    """Entries for `names` (default: every tensor) of a safetensors checkpoint, read one at a time."""
    ckpt = SafetensorsCheckpoint(folder)
    return [entry(name, ckpt.read_raw(name)) for name in sorted(ckpt.shapes if names is None else names)]


def entry(name: str, t: torch.Tensor) -> ManifestEntry:
    """The manifest entry of one tensor as stored (its own dtype)."""
    return ManifestEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), tensor_sha256(t))


def fingerprint(entries: Iterable[ManifestEntry]) -> str:
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.name):
        h.update(f"{e.name}\t{e.dtype}\t{','.join(map(str, e.shape))}\t{e.sha256}\n".encode())
    return h.hexdigest()


def verify(loaded: Iterable[ManifestEntry], manifest: Iterable[ManifestEntry], who: str) -> None:
    """Raise ModelLoadError naming every loaded tensor that differs from the manifest."""
    expected = {e.name: e for e in manifest}
    problems = []
    for e in loaded:
        want = expected.get(e.name)
        if want is None:
            problems.append(f"{e.name} is not in the cluster's model")
        elif (want.dtype, tuple(want.shape)) != (e.dtype, tuple(e.shape)):
            problems.append(f"{e.name} is {e.dtype}{list(e.shape)}, the cluster's is {want.dtype}{list(want.shape)}")
        elif want.sha256 != e.sha256:
            problems.append(f"{e.name} has different weights")
    if problems:
        raise ModelLoadError(f"{who}: the model differs from the cluster's ({len(problems)} tensor(s)): "
                             + "; ".join(problems[:5]) + ". Both sides must load the same checkpoint.")
