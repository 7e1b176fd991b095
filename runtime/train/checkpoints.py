"""Training checkpoints: adapter + optimizer + schedule + data position + step, written atomically.

Layout under `<out>/checkpoints/`:

    step-000050/adapter.safetensors   adapter tensors (edgetune's internal names)
    step-000050/trainer.pt            optimizer, scheduler, data-stream position, RNG, step
    step-000050/meta.json             step and the run config (written last)
    latest                            name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and
`latest` is replaced atomically after it, so a crash mid-write never leaves a
half checkpoint that `--resume` would read. If the newest checkpoint is
unreadable anyway (disk trouble), restore falls back to the previous one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgetune.runtime.atomic import atomic_write_text
from edgetune.runtime.errors import CheckpointError, EdgetuneError

log = logging.getLogger("edgetune.checkpoint")

# Options that may change between an interrupted run and its resumption
# without changing the result.
_RESUMABLE_CHANGES = {"resume", "progress", "threads", "device", "save_every", "eval_every", "keep_checkpoints", "out",
                      "credentials", "identity", "insecure", "token_file", "coordinator"}  # how to reach it, not what


class ConfigMismatch(CheckpointError):
    """The checkpoint belongs to a run with other options: resuming would not reproduce it."""


class CheckpointDir:
    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if p.is_dir() and (p / "meta.json").exists())

    def refuse_existing(self) -> None:
        if self._complete():
            raise CheckpointError(
                f"{self.root} already holds checkpoints of an earlier run; pass --resume to continue it, "
                "or choose another --out"
            )

    # -- save -------------------------------------------------------------------
    def save(self, cfg, adapter, optimizer, scheduler, stream, state) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{state.step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{final.name}."))
        try:
            save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
            torch.save({
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "stream": stream.state_dict(),
                "step": state.step,
                "tokens_seen": state.tokens_seen,
                "torch_rng": torch.get_rng_state(),
                "method_state": adapter.state_tensors(),  # AdaLoRA's importance averages, ...
            }, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": state.step, "config": cfg.to_dict()}, indent=2))
            if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", final.name + "\n")
        for old in self._complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # -- restore ----------------------------------------------------------------
    def restore_latest(self, cfg, adapter, optimizer, scheduler, stream, state) -> Path:
        candidates = self._complete()
        if not candidates:
            raise CheckpointError(f"--resume: no checkpoint found under {self.root}")
        errors = []
        for ckpt in reversed(candidates):
            try:
                self._restore(ckpt, cfg, adapter, optimizer, scheduler, stream, state)
                log.info("resumed from %s (step %d)", ckpt, state.step)
                return ckpt
            except ConfigMismatch:
                raise  # an older checkpoint of the same run would differ the same way
            except CheckpointError as e:
                errors.append(str(e))
                log.warning("checkpoint %s is unreadable (%s); trying an older one", ckpt, e)
        raise CheckpointError("--resume: no readable checkpoint: " + " | ".join(errors))

    def _restore(self, ckpt: Path, cfg, adapter, optimizer, scheduler, stream, state) -> None:
        try:
            meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
            saved_cfg = meta["config"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt / 'meta.json'}: unreadable ({e})") from None
        current = cfg.to_dict()
        differs = sorted(k for k in set(current) | set(saved_cfg)
                         if k not in _RESUMABLE_CHANGES and _norm(current.get(k)) != _norm(saved_cfg.get(k)))
        if differs:
            detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {current.get(k)!r}" for k in differs)
            raise ConfigMismatch(f"{ckpt}: the run config differs from the checkpoint's ({detail}); "
                                  "resume with the same options or start a new --out")
        try:
            tensors = load_file(str(ckpt / "adapter.safetensors"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{ckpt / 'adapter.safetensors'}: unreadable ({e})") from None
        try:
            trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged pickle/zip
            raise CheckpointError(f"{ckpt / 'trainer.pt'}: unreadable ({type(e).__name__}: {e})") from None
        try:
            adapter.load_state_dict(tensors)
            adapter.load_state_tensors(trainer.get("method_state", {}))
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            stream.load_state_dict(trainer["stream"])
            torch.set_rng_state(trainer["torch_rng"])
        except (EdgetuneError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: does not fit this run ({e})") from None
        state.step = int(trainer["step"])
        state.tokens_seen = int(trainer["tokens_seen"])


def _norm(value: Any) -> Any:
    """Compare configs after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))
