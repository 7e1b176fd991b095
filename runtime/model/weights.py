"""Reading tensors from a Hugging Face safetensors checkpoint, selectively.

A folder holds `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Only the tensors asked for are read (safetensors
maps the file and copies just those bytes), so a node that serves blocks
[i, j) holds about (j - i) / L of the weights in memory.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edgetune.runtime.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """The tensors of one checkpoint folder: names, shapes, and selective reads."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file_of: dict[str, Path] = self._locate()
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.file_of.values())):
            with self._open(file) as f:
                for name in f.keys():
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
        missing = sorted(n for n in self.file_of if n not in self.shapes)
        if missing:
            raise ModelLoadError(f"{self.folder / INDEX_FILE}: lists tensors not found in their shard: {missing[:5]}")

    def _locate(self) -> dict[str, Path]:
        if not self.folder.is_dir():
            raise ModelLoadError(f"{self.folder}: model folder not found")
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                return {str(name): self.folder / str(file) for name, file in weight_map.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{index}: malformed shard index ({type(e).__name__}: {e})") from None
        single = self.folder / SINGLE_FILE
        if not single.exists():
            raise ModelLoadError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} found")
        with self._open(single) as f:
            return {name: single for name in f.keys()}

    def _open(self, file: Path):
        if not file.exists():
            raise ModelLoadError(f"{file}: checkpoint shard not found")
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{file}: unreadable safetensors file ({e}); the file may be truncated or corrupt") from None

    def read(self, expected: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read exactly the `expected` tensors (name -> shape), checking each exists and fits."""
        problems = []
        for name, shape in expected.items():
            if name not in self.shapes:
                problems.append(f"missing tensor {name!r} (expected shape {tuple(shape)})")
            elif self.shapes[name] != tuple(shape):
                problems.append(f"tensor {name!r} has shape {self.shapes[name]}, the config implies {tuple(shape)}")
        if problems:
            raise ModelLoadError(f"{self.folder}: checkpoint does not match config.json: " + "; ".join(problems[:8]))
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in expected:
            by_file.setdefault(self.file_of[name], []).append(name)
        for file, names in by_file.items():
            with self._open(file) as f:
                for name in names:
                    try:
                        t = f.get_tensor(name)
                    except (SafetensorError, OSError, ValueError) as e:
                        raise ModelLoadError(f"{file}: cannot read tensor {name!r} ({e})") from None
                    out[name] = t.to(device=device, dtype=dtype)
        return out

    def names(self) -> Iterable[str]:
        return self.shapes.keys()

    def read_raw(self, name: str) -> torch.Tensor:
        """One tensor exactly as stored (its own dtype), on the CPU."""
        if name not in self.shapes:
            raise ModelLoadError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        with self._open(self.file_of[name]) as f:
            try:
                return f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"{self.file_of[name]}: cannot read tensor {name!r} ({e})") from None
