"""Which kernels a block runs (`edgetune node --kernels`, `finetune --local --kernels`).

The registry lists, for every op a block runs, its PyTorch reference (the CPU path and the
test oracle, in `model/transformer.py`) and the faster versions:

    op            eager (reference)         compiled                      fused (CUDA)
    rms_norm      fp32 normalise, scale     reference, under torch.compile  Liger rms_norm
    add_rms_norm  residual add + rms_norm   reference, under torch.compile  Liger fused_add_rms_norm
    rope          rotate_half               reference, under torch.compile  Liger rope
    swiglu        silu(gate) * up           reference, under torch.compile  Liger swiglu
    attention     SDPA                      SDPA                            SDPA (flash / mem-efficient)
    linear        BlockAdapter.linear       one autograd function (W')    Triton GEMM + low-rank epilogue

Modes:
- `eager`: the references; `auto` on a CPU.
- `compiled`: `torch.compile` of each block's forward (and through AOT autograd its backward),
  with LoRA/(IA)^3 linears as one autograd function (`adapted_linear.py`). Works on any device;
  the first micro-batch of each shape pays the compile (seconds per block class).
- `fused`: CUDA only; `auto` on a CUDA device. Liger-Kernel's Triton ops where Liger is
  installed (the reference otherwise, said once in the log), and edgetune's Triton GEMM for
  LoRA/rsLoRA linears.

Every mode falls back to the reference per module for what it does not cover (DoRA, active
dropout, several methods on one linear, quantized weights in the fused linear), so a result
never depends on the mode beyond rounding.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

from edgetune.runtime.errors import ConfigError

KERNELS = ("auto", "eager", "compiled", "fused")
OPS = ("rms_norm", "add_rms_norm", "rope", "swiglu", "attention", "linear")
log = logging.getLogger("edgetune.kernels")


def check_kernels(name: str) -> str:
    if name not in KERNELS:
        raise ConfigError(f"kernels {name!r}: choose one of {', '.join(KERNELS)}")
    return name


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernels(name: str, device: str) -> str:
    """The concrete mode for `name` on `device`: auto is fused on CUDA, eager elsewhere;
    ConfigError for fused on a device without CUDA (unless Triton's interpreter is on)."""
    check_kernels(name)
    cuda = str(device).startswith("cuda")
    if name == "auto":
        return "fused" if cuda else "eager"
    if name == "fused" and not cuda and not _interpreted():
        raise ConfigError(f"--kernels fused runs Triton kernels on CUDA devices; this one is {device}: "
                          "use --kernels compiled (any device) or eager")
    return name


def _liger_ops():
    """Liger-Kernel's functional ops adapted to BlockOps' signatures, or None without Liger."""
    try:
        from liger_kernel.transformers import functional as lf
    except Exception as e:  # ImportError, or Triton failing to initialise
        log.info("Liger-Kernel unavailable (%s): rms_norm, rope and swiglu run the PyTorch reference", e)
        return None

    def rms_norm(x, weight, eps):
        return lf.liger_rms_norm(x, weight, eps, 0.0, "llama", False)

    def add_rms_norm(h, delta, weight, eps):
        # Liger returns (normed, h + delta)
        out, residual = lf.liger_fused_add_rms_norm(delta, h, weight, eps, 0.0, "llama", False)
        return residual, out

    def rope(q, k, cos, sin):
        return lf.liger_rope(q, k, cos, sin)

    def swiglu(gate, up):
        return lf.liger_swiglu(gate, up)

    return dict(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rope=rope, swiglu=swiglu)


def block_ops(mode: str):
    """The BlockOps of a concrete mode (eager, compiled or fused)."""
    from edgetune.runtime.compute.adapted_linear import make_adapted_linear
    from edgetune.runtime.model.transformer import REFERENCE_OPS

    if mode == "eager":
        return REFERENCE_OPS
    if mode == "compiled":
        return replace(REFERENCE_OPS, linear=make_adapted_linear("torch"), name="compiled")
    if mode == "fused":
        from edgetune.runtime.compute.triton_lora import _triton

        _triton()  # a clear ConfigError now rather than at the first forward
        liger = None if _interpreted() else _liger_ops()  # Liger's kernels do not run interpreted
        return replace(REFERENCE_OPS, linear=make_adapted_linear("triton"), name="fused", **(liger or {}))
    raise ConfigError(f"kernels {mode!r} is not a concrete mode (eager, compiled, fused)")


def describe(ops) -> dict[str, str]:
    """op -> the implementation `ops` runs ('reference', 'liger', 'autograd function', 'triton')."""
    from edgetune.runtime.model.transformer import REFERENCE_OPS

    out = {}
    for op in OPS:
        fn = getattr(ops, op)
        if fn is getattr(REFERENCE_OPS, op):
            out[op] = "reference"
        elif op == "linear":
            out[op] = {"torch": "autograd function", "triton": "triton"}[fn.backend]
        else:
            out[op] = "liger"
    return out
