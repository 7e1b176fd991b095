"""The chunked LM-head loss equals plain cross-entropy over full logits, in value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from edgetune.runtime.train.loss import head_loss_sum


def _reference(hidden, weight, labels):
    """Cross-entropy written independently: full logits, logits shifted, torch's F.cross_entropy."""
    T = labels.shape[1]
    logits = F.linear(hidden[:, -T:], weight)[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 7, 1024])
@pytest.mark.parametrize("extra", [0, 3])  # leading prompt-tuning positions
def test_value_and_gradient_match_full_logits(chunk, extra):
    g = torch.Generator().manual_seed(chunk + extra)
    B, T, D, V = 3, 9, 16, 50
    weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 6:] = -100  # right padding
    h1 = torch.randn(B, T + extra, D, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    ours = head_loss_sum(h1, weight, labels, chunk_tokens=chunk)
    ref = _reference(h2, weight, labels)
    (0.37 * ours).backward()
    (0.37 * ref).backward()
    assert abs(ours.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    assert (h1.grad - h2.grad).abs().max().item() <= 1e-5


def test_all_ignored_gives_zero():
    h = torch.randn(1, 4, 8, requires_grad=True)
    loss = head_loss_sum(h, torch.randn(10, 8), torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_a_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen LM head"):
        head_loss_sum(torch.randn(1, 3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(1, 3, dtype=torch.long))


def test_a_bf16_head_gives_the_fp32_loss_to_bf16_precision():
    """The edge's bf16 LM head (--head-dtype bf16): matmuls in bf16, softmax and loss in fp32;
    the gradient comes back in the hidden states' dtype."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 9, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g) / 32 ** 0.5
    labels = torch.randint(0, 300, (2, 9), generator=g)
    ref = _reference(hidden, weight, labels)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    loss = head_loss_sum(hidden, weight.to(torch.bfloat16), labels, chunk_tokens=4)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.dtype == torch.float32
    assert abs(float(loss) - float(ref)) <= 2e-2 * abs(float(ref))
    assert (grad - ref_grad).norm() <= 3e-2 * ref_grad.norm()
    assert float(loss) != float(ref)  # the matmuls really ran in bf16


def test_the_head_dtype_resolves_per_device(monkeypatch):
    from edgetune.runtime.compute import precision
    from edgetune.runtime.errors import ConfigError

    big = precision.BIG_VOCAB
    assert precision.resolve_head_dtype("fp32", "cuda", big) == "fp32"
    assert precision.resolve_head_dtype("bf16", "cpu", 96) == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: device == "cuda")
    assert precision.resolve_head_dtype("auto", "cuda", big) == "bf16"
    assert precision.resolve_head_dtype("auto", "cpu", big) == "fp32"  # emulated bf16: slower
    assert precision.resolve_head_dtype("auto", "cuda", big - 1) == "fp32"  # a small head: keep it exact
    with pytest.raises(ConfigError, match="choose one of auto, fp32, bf16"):
        precision.resolve_head_dtype("fp16", "cpu", big)
