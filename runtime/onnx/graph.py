"""The decoder as an ONNX graph built node by node, with onnxruntime's fused operators.

Not a trace: each block is written as the few operators onnxruntime runs fastest
on a CPU, the same ones its GenAI model builder emits --

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul on the packed q|k|v weights (three MatMuls where q/k/v take LoRA inputs)
    GroupQueryAttention (rotary embedding, GQA, KV cache and causal mask in one kernel)
    MatMul, Sigmoid, Mul (SiLU-gated MLP)

with the I/O names onnxruntime-genai and Optimum use: `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` -> `logits`, `present.{i}.key|value`.

`lora` maps the linear layers (e.g. "model.layers.0.self_attn.q_proj") that get LoRA
inputs (adapter-inputs mode) to "lora" or "dora":
`model.layers.{i}.{module}.lora_A.weight` (in, r) and `...lora_B.weight` (r, out), with
a dynamic rank r; their product (scaling folded into B) is added to the layer's output.
Fed zero-rank tensors, they add nothing and the base model runs. DoRA layers also take
`...dora_scale` (out,), the magnitude over the adapted weight's row norms (default ones).
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


@dataclass
class GraphExtras:
    """The parts of an adapter that cannot be folded into the weights, as graph pieces.

    bottleneck: layer -> [(kind "serial" | "parallel", tensors, activation, scaling)]
    prefix: layer -> (keys, values), each (P, kv_heads, head_dim): constants every query
        attends to ahead of the KV cache -- prefix tuning's (not rotated, as in HF PEFT), or
        prompt tuning's virtual tokens run through the model once at export (they precede
        every real token, so their keys and values never depend on the input).
    The prefix stays out of the cache the caller holds (`present` has real tokens only, as
    onnxruntime-genai expects), and real tokens sit at positions P.., as in PyTorch.
    unipelt: layer -> (UniPeltConfig, its block tensors): per-token gates (Sigmoid of a MatMul
        of the sublayer's normed input) on LoRA branches of q/k/v, on a serial adapter after
        the MLP, and on a prefix's share of the attention: the layer's attention runs as it
        would without the prefix, plus the gate times a second GroupQueryAttention over
        [prefix, cache, new] keys whose values are zero but the prefix's (unipelt.py).
    """

    bottleneck: dict = field(default_factory=dict)
    prefix: dict = field(default_factory=dict)
    unipelt: dict = field(default_factory=dict)

    @property
    def virtual_tokens(self) -> int:
        if self.prefix:
            return int(next(iter(self.prefix.values()))[0].shape[0])
        return next(iter(self.unipelt.values()))[0].num_virtual_tokens if self.unipelt else 0


_ACT = {"relu": "Relu", "tanh": "Tanh", "gelu": "Gelu"}  # silu is written as x * sigmoid(x)
I64_MAX = np.iinfo(np.int64).max


def _np(t, dtype) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype)


def build_decoder(model, dtype: str = "fp32", lora: dict[str, str] | None = None,
                  context_length: int | None = None, extras: GraphExtras | None = None,
                  untie_head: bool = False) -> onnx.ModelProto:
    """The whole CausalLM `model` (weights as they are now: merge an adapter first) as ONNX.

    `untie_head` stores tied embeddings twice, the table for the lookup and the head for
    the MatMul, so the quantizer sees the head as a MatMul weight; it then ties them again
    (the lookup reads the head's quantized blocks, export._quantize_embedding).
    """
    import torch

    from edgetune.runtime.model.transformer import rope_inv_freq

    cfg = model.config
    extras = extras or GraphExtras()
    lora = lora or {}
    elem, npdt = _FLOAT[dtype]
    g = GraphBuilder()
    L, H, KVH, hd = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
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

    P = extras.virtual_tokens
    batch = g.node("Slice", [g.node("Shape", [ids]), g.init("const/zero_1d", np.array([0], np.int64)),
                             g.init("const/one_1d", np.array([1], np.int64))])  # [B]
    prefixed_lengths = None  # (seqlens, total) of an attention over [prefix, cache, new] keys
    if P:  # the attention sees P more keys than the caller counts, and real tokens sit at P..
        ones = g.node("ConstantOfShape", [g.node("Concat", [batch, g.init("const/P", np.array([P], np.int64))], axis=0)],
                      value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
        prefixed_lengths = _lengths(g, g.node("Concat", [ones, mask], axis=1))  # mask (B, P + total)
        pos = g.node("Add", [pos, g.init("const/P_scalar", np.array(P, np.int64))])
    # GroupQueryAttention wants int32 per-row "last real position" and the total length; UniPELT's
    # layers attend to the real keys as the base model does, its prefix goes to a second attention
    seqlens, total = prefixed_lengths if extras.prefix else _lengths(g, mask)
    # rotary tables (context, head_dim/2), from the model's own frequencies (llama3 scaling included)
    freqs = torch.outer(torch.arange(ctx_len, dtype=torch.float32), rope_inv_freq(cfg))
    cos = g.init("cos_cache", freqs.cos().numpy().astype(npdt))
    sin = g.init("sin_cache", freqs.sin().numpy().astype(npdt))

    # embeddings; with tied embeddings one (D, V) matrix serves the embedding (transposed) and the head
    head = g.init("lm_head.MatMul.weight", _np(model.head_weight.T, npdt))  # (D, V)
    if cfg.tie_word_embeddings and not untie_head:
        table = g.node("Transpose", [head], perm=[1, 0])  # (V, D)
    else:
        table = g.init("model.embed_tokens.weight", _np(model.embed_tokens.weight, npdt))
    h = g.node("Gather", [table, ids])  # (B, S, D)
    residual, pending = h, None  # pending: the last sublayer output not yet added to the residual
    for i, block in enumerate(model.blocks()):
        p = f"model.layers.{i}"
        x, residual = _norm(g, residual, pending, _np(block.input_layernorm.weight, npdt), f"{p}.input_layernorm.weight", eps)
        attn = block.self_attn
        qkv_names = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        uni = extras.unipelt.get(i)  # (UniPeltConfig, tensors) or None
        if any(n in lora for n in qkv_names) or uni:  # LoRA inputs or gated LoRA on q/k/v: three MatMuls
            q, k, v = (_linear(g, x, getattr(attn, f"{n}_proj"), name, npdt, lora, elem)
                       for n, name in zip("qkv", qkv_names))
            if uni:
                q, k, v = (_gated_lora(g, x, y, uni, f"self_attn.{n}_proj", npdt, f"{p}.unipelt")
                           for n, y in zip("qkv", (q, k, v)))
        else:  # one MatMul on the packed q|k|v weights; GroupQueryAttention splits it
            q, k, v = _packed_qkv(g, x, attn, f"{p}.self_attn.qkv_proj", npdt), "", ""
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        if i in extras.prefix:  # attention runs on [prefix, cache, new]; the caller keeps [cache, new]
            past_k, past_v = (_prefixed(g, past, arr.astype(npdt), batch, f"{p}.prefix_{kind}")
                              for past, arr, kind in zip((past_k, past_v), extras.prefix[i], ("key", "value")))
            present_k, present_v = f"{p}/attn/present_key", f"{p}/attn/present_value"
        out = g.node("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos, sin, pos],
                     [f"{p}/attn/output", present_k, present_v], domain=MS,
                     num_heads=H, kv_num_heads=KVH, scale=float(hd ** -0.5), do_rotary=1, rotary_interleaved=0,
                     local_window_size=-1)[0]
        if uni:  # + g_P * the prefix's share: the same queries and keys, values zero but the prefix's
            out = g.node("Add", [out, g.node("Mul", [_gate(g, x, uni, "prefix", npdt, f"{p}.unipelt"),
                                                      _gated_prefix_share(g, q, k, v, past_k, past_v, uni, batch,
                                                                          prefixed_lengths, cos, sin, pos, npdt,
                                                                          f"{p}.unipelt", H, KVH, hd)])])
        if i in extras.prefix:
            for full, kind in ((present_k, "key"), (present_v, "value")):
                g.node("Slice", [full, g.init(f"{p}.prefix_{kind}.length", np.array([P], np.int64)),
                                 g.init(f"{p}.prefix_{kind}.end", np.array([I64_MAX])),
                                 g.init(f"{p}.prefix_{kind}.axis", np.array([2], np.int64))], [f"present.{i}.{kind}"])
        o = _linear(g, out, attn.o_proj, f"{p}.self_attn.o_proj", npdt, lora, elem)
        for kind, t, act, _ in extras.bottleneck.get(i, []):
            if kind == "serial":
                o = g.node("Add", [o, _bottleneck(g, o, t, "attn_adapter", act, npdt, f"{p}.attn_adapter")])
        x, residual = _norm(g, residual, o, _np(block.post_attention_layernorm.weight, npdt),
                            f"{p}.post_attention_layernorm.weight", eps)
        mlp = block.mlp
        gate = _linear(g, x, mlp.gate_proj, f"{p}.mlp.gate_proj", npdt, lora, elem)
        up = _linear(g, x, mlp.up_proj, f"{p}.mlp.up_proj", npdt, lora, elem)
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])  # silu(gate) * up
        pending = _linear(g, act, mlp.down_proj, f"{p}.mlp.down_proj", npdt, lora, elem)
        mlp_out = pending
        for kind, t, act_name, scaling in extras.bottleneck.get(i, []):
            if kind == "serial":
                pending = g.node("Add", [pending, _bottleneck(g, mlp_out, t, "mlp_adapter", act_name, npdt, f"{p}.mlp_adapter")])
            else:  # parallel: fed by the MLP's input, scaled
                side = _bottleneck(g, x, t, "parallel_adapter", act_name, npdt, f"{p}.parallel_adapter")
                pending = g.node("Add", [pending, g.node("Mul", [side, g.init(f"{p}.parallel_adapter.scaling",
                                                                              np.array(scaling, npdt))])])
        if uni:  # serial adapter after the MLP, gated by the MLP's normed input
            side = _bottleneck(g, pending, uni[1], "mlp_adapter", uni[0].activation, npdt, f"{p}.unipelt.mlp_adapter")
            pending = g.node("Add", [pending, g.node("Mul", [_gate(g, x, uni, "adapter", npdt, f"{p}.unipelt"), side])])
    x, _ = _norm(g, residual, pending, _np(model.norm.weight, npdt), "model.norm.weight", eps)
    g.node("MatMul", [x, head], ["logits"])
    return g.model("edgetune-decoder")


def _lengths(g: GraphBuilder, mask: str) -> tuple[str, str]:
    """GroupQueryAttention's int32 seqlens_k (B,) -- each row's last real position -- and total length."""
    one = g.init(f"{mask}/one", np.array([1], np.int64))
    seqlens = g.node("Cast", [g.node("Sub", [g.node("ReduceSum", [mask, one], keepdims=0), one])], to=TensorProto.INT32)
    total = g.node("Cast", [g.node("Gather", [g.node("Shape", [mask]), g.init(f"{mask}/idx1", np.array(1, np.int64))],
                                   axis=0)], to=TensorProto.INT32)
    return seqlens, total


def _gate(g: GraphBuilder, x: str, uni, kind: str, npdt, name: str) -> str:
    """UniPELT's per-token gate sigmoid(x w^T + b): (B, S, 1)."""
    t = uni[1]
    z = g.node("MatMul", [x, g.init(f"{name}.gate_{kind}.weight", _np(t[f"gate_{kind}.weight"].T, npdt))])  # (B, S, 1)
    return g.node("Sigmoid", [g.node("Add", [z, g.init(f"{name}.gate_{kind}.bias", _np(t[f"gate_{kind}.bias"], npdt))])])


def _gated_lora(g: GraphBuilder, x: str, y: str, uni, module: str, npdt, name: str) -> str:
    """y + g_L(x) * (x A^T) (s B)^T when UniPELT's LoRA targets `module`, else y."""
    method, t = uni
    if f"{module}.lora_A" not in t:
        return y
    a = g.init(f"{name}.{module}.lora_A", _np(t[f"{module}.lora_A"].T, npdt))  # (in, r)
    b = g.init(f"{name}.{module}.lora_B", _np(method.lora_scaling * t[f"{module}.lora_B"].T, npdt))  # (r, out)
    delta = g.node("MatMul", [g.node("MatMul", [x, a]), b])
    return g.node("Add", [y, g.node("Mul", [_gate(g, x, uni, "lora", npdt, name), delta])])


def _gated_prefix_share(g: GraphBuilder, q: str, k: str, v: str, past_k: str, past_v: str, uni, batch: str,
                        lengths: tuple[str, str], cos: str, sin: str, pos: str, npdt, name: str,
                        H: int, KVH: int, hd: int) -> str:
    """sum over the prefix keys of softmax_all(q K^T) pv, (B, S, H hd): GroupQueryAttention over
    [prefix, cache, new] keys with every value zeroed but the prefix's (its presents are unused)."""
    t = uni[1]
    zero = g.init(f"{name}.zero", np.array(0, npdt))
    keys = _prefixed(g, past_k, _np(t["prefix_key"], npdt), batch, f"{name}.prefix_key")
    values = _prefixed(g, g.node("Mul", [past_v, zero]), _np(t["prefix_value"], npdt), batch, f"{name}.prefix_value")
    return g.node("GroupQueryAttention", [q, k, g.node("Mul", [v, zero]), keys, values, *lengths, cos, sin, pos],
                  3, domain=MS, num_heads=H, kv_num_heads=KVH, scale=float(hd ** -0.5), do_rotary=1,
                  rotary_interleaved=0, local_window_size=-1)[0]


def _prefixed(g: GraphBuilder, past: str, prefix: np.ndarray, batch: str, name: str) -> str:
    """The layer's past with the prefix (P, KVH, hd) ahead of it: (B, KVH, P + past, hd)."""
    arr = np.ascontiguousarray(prefix.transpose(1, 0, 2))[None]  # (1, KVH, P, hd)
    shape = g.node("Concat", [batch, g.init(f"{name}.shape", np.array(arr.shape[1:], np.int64))], axis=0)
    return g.node("Concat", [g.node("Expand", [g.init(name, arr), shape]), past], axis=2)


def _bottleneck(g: GraphBuilder, x: str, t: dict, prefix: str, act: str, npdt, name: str) -> str:
    """up(act(down(x))) with the adapter's (r, D) / (D, r) weights and biases."""
    z = g.node("Add", [g.node("MatMul", [x, g.init(f"{name}.down.weight", _np(t[f"{prefix}.down.weight"].T, npdt))]),
                       g.init(f"{name}.down.bias", _np(t[f"{prefix}.down.bias"], npdt))])
    z = g.node("Mul", [z, g.node("Sigmoid", [z])]) if act == "silu" else g.node(_ACT[act], [z])
    return g.node("Add", [g.node("MatMul", [z, g.init(f"{name}.up.weight", _np(t[f"{prefix}.up.weight"].T, npdt))]),
                          g.init(f"{name}.up.bias", _np(t[f"{prefix}.up.bias"], npdt))])


def _norm(g: GraphBuilder, residual: str, pending: str | None, weight: np.ndarray, name: str, eps: float):
    """RMSNorm of residual + pending; returns (normed, new residual)."""
    w = g.init(name, weight)
    if pending is None:
        return g.node("SimplifiedLayerNormalization", [residual, w], axis=-1, epsilon=eps, stash_type=1), residual
    g._count += 1
    out, summed = f"/skipnorm_{g._count}/out", f"/skipnorm_{g._count}/sum"
    # the optional mean / inverse-std outputs stay unnamed: the kernel then skips writing them
    g.node("SkipSimplifiedLayerNormalization", [residual, pending, w], [out, "", "", summed], domain=MS, epsilon=eps)
    return out, summed


def _packed_qkv(g: GraphBuilder, x: str, attn, name: str, npdt) -> str:
    """x @ [Wq; Wk; Wv]^T (+ [bq; bk; bv]): (B, S, (H + 2 KVH) hd)."""
    import torch

    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)  # (q + 2kv, D)
    y = g.node("MatMul", [x, g.init(f"{name}.MatMul.weight", _np(w.T, npdt))])
    if attn.q_proj.bias is not None:
        b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        y = g.node("Add", [y, g.init(f"{name}.bias", _np(b, npdt))])
    return y


def _linear(g: GraphBuilder, x: str, layer, name: str, npdt, lora, elem: int) -> str:
    """x @ W^T (+ x @ A @ B when `name` takes LoRA inputs) (* DoRA's scale) (+ b)."""
    y = g.node("MatMul", [x, g.init(f"{name}.MatMul.weight", _np(layer.weight.T, npdt))])
    if name in lora:
        d_out, d_in = layer.weight.shape
        # Inputs that default to zero-rank initializers: with no adapter active they add nothing.
        a = g.input(g.init(f"{name}.lora_A.weight", np.zeros((d_in, 0), npdt)), elem, [d_in, "lora_rank"])
        b = g.input(g.init(f"{name}.lora_B.weight", np.zeros((0, d_out), npdt)), elem, ["lora_rank", d_out])
        y = g.node("Add", [y, g.node("MatMul", [g.node("MatMul", [x, a]), b])])
        if lora[name] == "dora":  # magnitude / ||W + s B A|| per output, default 1: the base layer
            y = g.node("Mul", [y, g.input(g.init(f"{name}.dora_scale", np.ones(d_out, npdt)), elem, [d_out])])
    if layer.bias is not None:
        y = g.node("Add", [y, g.init(f"{name}.bias", _np(layer.bias, npdt))])
    return y
