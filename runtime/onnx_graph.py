"""The decoder as an ONNX graph built node by node, with onnxruntime's fused operators.

Not a trace: each block is written as the few operators onnxruntime runs fastest
on a CPU, the same ones its GenAI model builder emits --

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul on the packed q|k|v weights
    GroupQueryAttention (rotary embedding, GQA, KV cache and causal mask in one kernel)
    MatMul, Sigmoid, Mul (SiLU-gated MLP)

with the I/O names onnxruntime-genai and Optimum use: `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` -> `logits`, `present.{i}.key|value`.

`lora` names the linear layers (e.g. "model.layers.0.self_attn.q_proj") that get LoRA
inputs (adapter-inputs mode):
`model.layers.{i}.{module}.lora_A.weight` (in, r) and `...lora_B.weight` (r, out), with
a dynamic rank r; their product (scaling folded into B) is added to the layer's output.
Fed zero-rank tensors, they add nothing and the base model runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
OPSET = 21
_FLOAT = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}


@dataclass
class GraphBuilder:
    """Nodes, initializers and I/O of one graph; names are unique by construction."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    _count: int = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        self._count += 1
        base = f"/{op}_{self._count}"
        names = [f"{base}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=base, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="edgetune")
        model.ir_version = 10
        return model


def _np(t, dtype) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype)


def build_decoder(model, dtype: str = "fp32", lora: set[str] | frozenset = frozenset(),
                  context_length: int | None = None) -> onnx.ModelProto:
    """The whole CausalLM `model` (weights as they are now: merge an adapter first) as ONNX."""
    import torch

    from edgetune.runtime.model import rope_inv_freq

    cfg = model.config
    elem, npdt = _FLOAT[dtype]
    g = GraphBuilder()
    L, H, KVH, hd, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    eps = float(cfg.rms_norm_eps)
    ctx_len = context_length or cfg.max_position_embeddings

    ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    pos = g.input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    for i in range(L):
        for kind in ("key", "value"):
            g.input(f"past_key_values.{i}.{kind}", elem, ["batch_size", KVH, "past_sequence_length", hd])
    g.output("logits", elem, ["batch_size", "sequence_length", cfg.vocab_size])
    for i in range(L):
        for kind in ("key", "value"):
            g.output(f"present.{i}.{kind}", elem, ["batch_size", KVH, "total_sequence_length", hd])

    # GroupQueryAttention wants int32 per-row "last real position" and the total length.
    one = g.init("const/one_i64", np.array([1], np.int64))
    seqlens = g.node("Cast", [g.node("Sub", [g.node("ReduceSum", [mask, one], keepdims=0), one])], to=TensorProto.INT32)
    total = g.node("Cast", [g.node("Gather", [g.node("Shape", [mask]), g.init("const/idx1", np.array(1, np.int64))],
                                   axis=0)], to=TensorProto.INT32)
    # rotary tables (context, head_dim/2), from the model's own frequencies (llama3 scaling included)
    freqs = torch.outer(torch.arange(ctx_len, dtype=torch.float32), rope_inv_freq(cfg))
    cos = g.init("cos_cache", freqs.cos().numpy().astype(npdt))
    sin = g.init("sin_cache", freqs.sin().numpy().astype(npdt))

    # embeddings; with tied embeddings one (D, V) matrix serves the embedding (transposed) and the head
    head = g.init("lm_head.MatMul.weight", _np(model.head_weight.T, npdt))  # (D, V)
    if cfg.tie_word_embeddings:
        table = g.node("Transpose", [head], perm=[1, 0])  # (V, D)
    else:
        table = g.init("model.embed_tokens.weight", _np(model.embed_tokens.weight, npdt))
    h = g.node("Gather", [table, ids])  # (B, S, D)

    residual, pending = h, None  # pending: the last sublayer output not yet added to the residual
    for i, block in enumerate(model.blocks()):
        p = f"model.layers.{i}"
        x, residual = _norm(g, residual, pending, _np(block.input_layernorm.weight, npdt), f"{p}.input_layernorm.weight", eps)
        attn = block.self_attn
        q = _linear(g, x, attn.q_proj, f"{p}.self_attn.q_proj", npdt, lora, elem)
        k = _linear(g, x, attn.k_proj, f"{p}.self_attn.k_proj", npdt, lora, elem)
        v = _linear(g, x, attn.v_proj, f"{p}.self_attn.v_proj", npdt, lora, elem)
        out = g.node("GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                                             total, cos, sin, pos],
                     [f"{p}/attn/output", f"present.{i}.key", f"present.{i}.value"], domain=MS,
                     num_heads=H, kv_num_heads=KVH, scale=float(hd ** -0.5), do_rotary=1, rotary_interleaved=0,
                     local_window_size=-1)[0]
        o = _linear(g, out, attn.o_proj, f"{p}.self_attn.o_proj", npdt, lora, elem)
        x, residual = _norm(g, residual, o, _np(block.post_attention_layernorm.weight, npdt),
                            f"{p}.post_attention_layernorm.weight", eps)
        mlp = block.mlp
        gate = _linear(g, x, mlp.gate_proj, f"{p}.mlp.gate_proj", npdt, lora, elem)
        up = _linear(g, x, mlp.up_proj, f"{p}.mlp.up_proj", npdt, lora, elem)
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])  # silu(gate) * up
        pending = _linear(g, act, mlp.down_proj, f"{p}.mlp.down_proj", npdt, lora, elem)
    x, _ = _norm(g, residual, pending, _np(model.norm.weight, npdt), "model.norm.weight", eps)
    g.node("MatMul", [x, head], ["logits"])
    return g.model("edgetune-decoder")


def _norm(g: GraphBuilder, residual: str, pending: str | None, weight: np.ndarray, name: str, eps: float):
    """RMSNorm of residual + pending; returns (normed, new residual)."""
    w = g.init(name, weight)
    if pending is None:
        return g.node("SimplifiedLayerNormalization", [residual, w], axis=-1, epsilon=eps, stash_type=1), residual
    out, _, _, summed = g.node("SkipSimplifiedLayerNormalization", [residual, pending, w], 4, domain=MS, epsilon=eps)
    return out, summed


def _linear(g: GraphBuilder, x: str, layer, name: str, npdt, lora, elem: int) -> str:
    """x @ W^T (+ b) (+ x @ A @ B when `name` takes LoRA inputs)."""
    y = g.node("MatMul", [x, g.init(f"{name}.MatMul.weight", _np(layer.weight.T, npdt))])
    if layer.bias is not None:
        y = g.node("Add", [y, g.init(f"{name}.bias", _np(layer.bias, npdt))])
    if name in lora:
        d_out, d_in = layer.weight.shape
        # Inputs that default to zero-rank initializers: with no adapter active they add nothing.
        a = g.input(g.init(f"{name}.lora_A.weight", np.zeros((d_in, 0), npdt)), elem, [d_in, "lora_rank"])
        b = g.input(g.init(f"{name}.lora_B.weight", np.zeros((0, d_out), npdt)), elem, ["lora_rank", d_out])
        y = g.node("Add", [y, g.node("MatMul", [g.node("MatMul", [x, a]), b])])
    return y
