"""LoRA's adapted linear as a Triton GEMM with a fused low-rank epilogue (CUDA; tests run it
under TRITON_INTERPRET=1 on the CPU in fp32).

One kernel computes  Y = X Wk^T + s U V^T (+ bias)  tile by tile: the base GEMM accumulates
over K in fp32, then the tile's rank-r update (U: (M, r), V: (N, r), r padded to 16) is added
before the single store. So y = x W^T + s (x A^T) B^T never writes x W^T or the low-rank
product to memory. Backward to the inputs is the same kernel on transposed views (no copies):

    forward:   U = x A^T             y  = X W^T   + s U B^T
    backward:  V = g B               dx = g (W^T)^T + s V (A^T)^T
               dA = s V^T x,  dB = s g^T U   (rank-r GEMMs, left to cuBLAS)

Saved for backward: x and U = x A^T (r values a token) -- not x W^T, not W'.
"""
from __future__ import annotations

import torch

from edgetune.runtime.errors import ConfigError


def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ConfigError(f"--kernels fused needs Triton ({e}); it comes with CUDA builds of PyTorch") from None
    return triton, tl


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = _triton()

    @triton.jit
    def gemm_lowrank(X, W, U, V, BIAS, Y, M, N, K, R, scale,
                     sxm, sxk, swn, swk, sum_, sur, svn, svr, sym, syn,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(W + rn[None, :] * swn + kk[:, None] * swk, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        rr = tl.arange(0, BLOCK_R)
        u = tl.load(U + rm[:, None] * sum_ + rr[None, :] * sur, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        v = tl.load(V + rn[None, :] * svn + rr[:, None] * svr, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        if IEEE:
            acc += scale * tl.dot(u, v, input_precision="ieee")
        else:
            acc += scale * tl.dot(u, v)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    _KERNEL = gemm_lowrank
    return _KERNEL


def gemm_lowrank(x: torch.Tensor, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T + scale * u (M, R) @ v (N, R)^T (+ bias (N,)), in x's dtype.

    Any strides: transposed views go in as they are."""
    triton, _ = _triton()
    M, K = x.shape
    N = w.shape[0]
    R = u.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    interpreted = x.device.type == "cpu"
    bm, bn, bk = (32, 32, 32) if interpreted else (128, 128, 32)
    br = max(16, triton.next_power_of_2(R))
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _kernel()[grid](x, w, u, v, bias if bias is not None else y, y, M, N, K, R, float(scale),
                    x.stride(0), x.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
                    v.stride(0), v.stride(1), y.stride(0), y.stride(1),
                    HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
                    **({} if interpreted else {"num_warps": 8, "num_stages": 3}))
    return y


class _TritonLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        u = x2 @ A.T  # (M, r)
        y = gemm_lowrank(x2, weight, u, B, scale, bias)
        ctx.save_for_backward(x2, u, weight, A, B)
        ctx.scale, ctx.in_shape = scale, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, u, weight, A, B = ctx.saved_tensors
        s = ctx.scale
        g2 = g.reshape(-1, g.shape[-1]).contiguous()
        vg = g2 @ B  # (M, r)
        dx = gemm_lowrank(g2, weight.T, vg, A.T, s).view(ctx.in_shape) if ctx.needs_input_grad[0] else None
        dA = (vg.T @ x2) * s if ctx.needs_input_grad[3] else None
        dB = (g2.T @ u) * s if ctx.needs_input_grad[4] else None
        return dx, None, None, dA, dB, None


def lora_linear(x, weight, bias, A, B, scale: float) -> torch.Tensor:
    """x W^T + b + scale (x A^T) B^T through the fused kernel; gradients for x, A and B."""
    return _TritonLora.apply(x, weight, bias, A, B, scale)
