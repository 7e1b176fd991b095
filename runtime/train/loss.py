"""Next-token loss through the LM head without materialising (B, T, V) logits.

The LM head is frozen in every PEFT method, so the loss needs only the
gradient with respect to the hidden states. `head_loss_sum` walks the tokens
in chunks: for each chunk it computes the logits (chunk, V), their
cross-entropy, and at once the gradient dL/dh = (softmax - onehot) W, then
drops the logits. Backward only scales the stored (N, D) gradient. Peak memory
for the loss falls from ~3 x (B*T*V) floats (logits, log-softmax, their
gradient) to one chunk of logits; the matmuls are the same as in the plain
loss.

The matmuls run in the head weight's dtype: an edge that computes bf16 natively (a GPU, a CPU
with AVX512-BF16/AMX) passes a bf16 copy of the head and gets about twice the speed; the
softmax, the loss and its sum stay fp32, and dL/dh comes back in the hidden states' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored against token t + 1; the last position predicts nothing. (B, T) -> (B, T)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # h (N, D), weight (V, D) frozen, targets (N,) with IGNORE where there is no loss
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            t = targets[rows]
            valid = t != IGNORE  # (c,)
            if not bool(valid.any()):
                continue
            logp = torch.log_softmax((h[rows].to(weight.dtype) @ weight.T).float(), dim=-1)  # (c, V)
            safe_t = t.clamp(min=0)
            total -= (logp.gather(1, safe_t[:, None]).squeeze(1) * valid).sum()
            if grad_h is not None:
                probs = logp.exp_()  # softmax, in place
                probs[torch.arange(len(t), device=h.device), safe_t] -= 1.0
                # zero the ignored rows after the matmul: (c, D) is far smaller than (c, V)
                grad_h[rows] = (probs.to(weight.dtype) @ weight).to(h.dtype) * valid[:, None].to(h.dtype)  # (c, D)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)), None, None, None


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy of F.linear(hidden, weight) against `labels` (-100 ignored).

    hidden (B, T', D) are final-normed hidden states and may carry leading
    prompt-tuning positions (T' > T); labels (B, T) are unshifted. The head
    weight (V, D) must be frozen.
    """
    if weight.requires_grad:
        raise ValueError("head_loss_sum needs a frozen LM head (no PEFT method trains it)")
    T = labels.shape[1]
    h = hidden[:, -T:].reshape(-1, hidden.shape[-1])  # (B*T, D)
    return _ChunkedHeadLoss.apply(h, weight, shift_labels(labels).reshape(-1), chunk_tokens)


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss from full logits (B, T', V): the plain reference formulation."""
    T = labels.shape[1]
    logits = logits[:, -T:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift_labels(labels).reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
