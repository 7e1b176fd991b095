"""What one transformer block costs, from the model config's shapes alone (no weights, no torch).

The partitioner charges memory with `model_cost`; `block_flops` gives the matmul work of one
block, which a planner can divide by a device's throughput before any node is profiled.

All figures are for one micro-batch of `batch` x `tokens` tokens; bytes assume fp32 (4 bytes
per value) unless `dtype_bytes` says otherwise.

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(num_layers=2, hidden_size=8, intermediate_size=16, q_dim=8, kv_dim=4,
    ...                       linear_shapes=lambda: {"mlp.up_proj": (16, 8)}, linear_has_bias=lambda n: False)
    >>> model_cost(cfg, tokens=1).block_bytes   # 4 * (16 * 8 weights + 2 * 8 norm scales)
    576
"""
from __future__ import annotations

from typing import Protocol

from edgetune.runtime.plan.partition import ModelCost

REFERENCE_TOKENS = 128  # the profiler's micro-batch: 1 x 128 tokens
FP32_BYTES = 4


class BlockShapes(Protocol):
    """The parts of a model config the cost model reads (`edgetune.runtime.model.config.ModelConfig`)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_dim: int
    kv_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    def linear_shapes(self) -> dict[str, tuple[int, int]]: ...  # module name -> (out, in)

    def linear_has_bias(self, name: str) -> bool: ...


def block_params(config: BlockShapes) -> int:
    """Values in one block's weights: every linear (and its bias) plus the two RMSNorm scales."""
    linears = config.linear_shapes()
    weights = sum(o * i + (o if config.linear_has_bias(name) else 0) for name, (o, i) in linears.items())
    return weights + 2 * config.hidden_size


def model_cost(config: BlockShapes, tokens: int = REFERENCE_TOKENS, dtype_bytes: int = FP32_BYTES) -> ModelCost:
    """Bytes the partitioner charges per block for a 1 x `tokens` micro-batch.

    block_bytes: one block's weights; activation_bytes: the hidden state crossing a hop
    (tokens, hidden); block_activation_bytes: roughly the inputs and outputs of every matmul
    and norm of a block, which stay saved for backward.
    """
    d, f = config.hidden_size, config.intermediate_size
    hidden = dtype_bytes * tokens * d
    saved = dtype_bytes * tokens * (4 * d + 2 * config.q_dim + 2 * config.kv_dim + 3 * f)
    return ModelCost(config.num_layers, dtype_bytes * block_params(config), hidden, saved)


def block_flops(config: BlockShapes, batch: int, tokens: int) -> int:
    """Floating-point operations of one block's forward pass on (batch, tokens): its matmuls.

    Each linear (out, in) costs 2 * out * in per token; attention costs 2 * tokens^2 * q_dim for
    the scores and as much again for the weighted sum of values, per sequence (the full square,
    as a fused kernel computes it; causal masking does not skip work here). Norms, rotary,
    activations and residual adds are elementwise and left out. Backward costs about twice this.
    """
    linear = sum(2 * o * i for o, i in config.linear_shapes().values())
    attention = 2 * 2 * tokens * config.q_dim  # per token: QK^T row + attention-weighted V row
    return batch * tokens * (linear + attention)


def edge_head_flops(config: BlockShapes, batch: int, tokens: int) -> int:
    """Floating-point operations of the edge's LM head in one training micro-batch: the logits
    (2 * V * D a token) and dL/dh = (softmax - onehot) W (as much again). For a 128k-vocabulary
    model this is several blocks' worth of work, done on the edge while the nodes wait: a planner
    compares it with the nodes' share (`block_flops` x their blocks x 3)."""
    return 2 * 2 * batch * tokens * config.vocab_size * config.hidden_size


def edge_bytes(config: BlockShapes, dtype_bytes: int = FP32_BYTES, head_copy_bytes: int = 0) -> int:
    """Bytes the edge holds for the model: the embedding, the untied head if any, the final norm,
    plus a low-precision copy of the head for the loss (`head_copy_bytes` a value, 0: none)."""
    table = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else table
    return dtype_bytes * (table + head + config.hidden_size) + head_copy_bytes * table


def session_bytes(config: BlockShapes, blocks: int, batch: int, tokens: int, micro_batches: int,
                  dtype_bytes: int = FP32_BYTES) -> int:
    """What one training session holds on a node serving `blocks` blocks: the activations every
    block saves for backward, for each of the step's `micro_batches` micro-batches of
    `batch` x `tokens` tokens (the adapter replica and its gradients are small beside them).

    A node admits a session only while these add up to less than its free memory.
    """
    saved = model_cost(config, tokens=max(1, batch) * max(1, tokens), dtype_bytes=dtype_bytes).block_activation_bytes
    return blocks * saved * max(1, micro_batches)
