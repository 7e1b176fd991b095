"""The adapter: a stack of PEFT methods and the master copy of their tensors.

An `Adapter` is the thing that is trained and saved. It holds, for each method
in its stack, the tensors of every targeted block plus any edge-only tensors.
`for_blocks` hands each block a `BlockAdapter` -- that block's tensors and the
rules that use them -- which is what `Block.forward` takes as an argument.

Methods compose in stack order: e.g. the MAM adapter is
`[PrefixTuning(...), ParallelAdapter(...)]` on the same blocks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edgetune.runtime.errors import AdapterError
from edgetune.runtime.model.transformer import LINEAR_NAMES
from edgetune.runtime.peft import stats
from edgetune.runtime.peft.base import HOOKS, Method, Tensors
from edgetune.runtime.peft.rng import seed_table

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import Block, CausalLM


# where a block draws dropout masks: its linear layers and the MLP output (adapters after it)
SEED_NAMES = (*LINEAR_NAMES, "mlp")


class BlockAdapter:
    """One block's view of the adapter: (method, tensors) pairs and the hook dispatch.

    Dropout masks come from keys (dropout_key, layer, module, method index): hashed as they are
    needed, or all hashed ahead into `seeds` (see with_hashed_keys) for compiled blocks.
    """

    def __init__(self, layer: int, entries: Sequence[tuple[Method, Tensors]], dropout_key: tuple | None,
                 seeds: torch.Tensor | None = None) -> None:
        self.layer = layer
        self.dropout_key = dropout_key
        self.seeds = seeds  # int64 (len(SEED_NAMES) * slots, 2), rng.seed_table's rows, or None
        self.methods = [m for m, _ in entries]
        self._entries = list(entries)
        # per hook, only the entries whose method overrides it
        self._by_hook = {h: [(m, t) for m, t in entries if type(m).overrides(h)] for h in HOOKS}
        # methods touching linear layers, in stack order (linear() needs their interleaving)
        self._linear_entries = [(m, t) for m, t in entries
                                if type(m).overrides("pre_linear") or type(m).overrides("post_linear")]
        # whether some method gates its changes per token (UniPELT): only then does the attention
        # take the gated path (gated_attention); every other stack runs exactly as before
        self.has_gates = bool(self._by_hook["gates"])

    @property
    def draws(self) -> bool:
        """Whether this forward draws dropout masks (training with a key)."""
        return self.dropout_key is not None or self.seeds is not None

    def _slots(self) -> int:
        return max(1, len(self._entries))

    def _key(self, name: str, method_index: int = 0) -> tuple | torch.Tensor | None:
        if self.seeds is not None:
            return self.seeds[SEED_NAMES.index(name) * self._slots() + method_index]
        if self.dropout_key is None:
            return None
        return (*self.dropout_key, self.layer, name, method_index)

    def with_hashed_keys(self) -> BlockAdapter:
        """The same view with every dropout key it can ask for hashed ahead into one int64 tensor.

        Code compiled once then draws each step's masks from a tensor input (the masks equal
        those of the hashed-on-demand keys, bit for bit) instead of constants baked in per step."""
        if self.dropout_key is None:
            return self
        device = next((t.device for _, ts in self._entries for t in ts.values()), torch.device("cpu"))
        keys = [(*self.dropout_key, self.layer, name, i) for name in SEED_NAMES for i in range(self._slots())]
        return BlockAdapter(self.layer, self._entries, None, seed_table(keys, device))

    def linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T + b, with every method's changes to this linear layer.

        Methods wrap the linear in stack order: method k changes the linear as
        methods < k left it, so an input rescaling by a later method ((IA)^3 on
        a feed-forward module) also feeds an earlier method's branch (LoRA).
        That is what merging in stack order computes, so merges stay exact.
        """
        entries = self._linear_entries
        inputs = []  # what each method's (wrapped) linear receives, outermost first
        for m, t in reversed(entries):
            inputs.append(x)
            x = m.pre_linear(t, name, x)
        inputs.reverse()
        y = F.linear(x, weight, bias)
        i = 0  # dropout-key index among the post_linear methods
        for (m, t), x_j in zip(entries, inputs):
            if type(m).overrides("post_linear"):
                y = m.post_linear(t, name, x_j, y, weight, bias, self._key(name, i))
                i += 1
        return y

    def without_dropout(self) -> BlockAdapter:
        """The same view with no dropout key (what a block runs where no method drops anything)."""
        if self.dropout_key is None and self.seeds is None:
            return self  # nothing to drop: no new view per block and micro-batch
        return BlockAdapter(self.layer, self._entries, None)

    @property
    def linear_entries(self) -> list[tuple[Method, Tensors]]:
        """The (method, tensors) pairs that change linear layers, in stack order (for fused kernels)."""
        return self._linear_entries

    def norm_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        for m, t in self._by_hook["norm_weight"]:
            weight = m.norm_weight(t, name, weight)
        return weight

    def prefix_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for m, t in self._by_hook["prefix_kv"]:
            k, v = m.prefix_kv(t, k, v)
        return k, v

    def after_attention(self, out: torch.Tensor) -> torch.Tensor:
        for m, t in self._by_hook["after_attention"]:
            out = m.after_attention(t, out)
        return out

    def after_mlp(self, out: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        for m, t in self._by_hook["gates"]:
            self._record(m.gates(t, "mlp", mlp_in))
        for i, (m, t) in enumerate(self._by_hook["after_mlp"]):
            out = m.after_mlp(t, out, mlp_in, self._key("mlp", i))
        return out

    # -- per-token gates (Method.gates) -------------------------------------------
    def _record(self, gates: Tensors) -> Tensors:
        for kind, g in gates.items():
            stats.record(f"gate.{kind}.{self.layer}", g)
        return gates

    def _prefix_keys(self, tensors: Tensors) -> tuple[int, int]:
        """[start, stop) of the prefix keys of the method holding `tensors`, after prefix_kv:
        each method prepends its num_prefix_tokens() keys in stack order, so later ones come first."""
        start = 0
        for m, t in reversed(self._by_hook["prefix_kv"]):
            if t is tensors:
                return start, start + m.num_prefix_tokens()
            start += m.num_prefix_tokens()
        raise AdapterError("a method gates a prefix but adds none (it must override prefix_kv)")

    def gated_attention(self, attention: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, attn_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """`attention` (q, k, v, mask) -> (B, H, T, hd) with every method's attention gates applied.

        q: (B, H, T, hd); k, v: (B, KVH, S, hd) after prefix_kv; x: the attention's normed input
        (B, T, D), which the gates read. For each gated prefix (keys P = [a, b)) token t gets

            out_t = sum_{j real} softmax_real(s_t)_j v_j + g_t * sum_{j in P} softmax_all(s_t)_j pv_j

        The other keys keep the softmax they had without the gated prefix; the prefix's share is
        weighted by ONE softmax over all keys, and SDPA is linear in V, so it is the attention of
        the same q, k with every value but the prefix's zeroed. A closed gate or zero prefix
        values (UniPELT's init) leave the attention exactly as without the method: a prefix that
        stayed inside the shared softmax would take weight from the real keys whatever the gate.
        """
        spans = []  # (gate (B, T), a, b)
        for m, t in self._by_hook["gates"]:
            gates = self._record(m.gates(t, "attention", x))
            if "prefix" in gates:
                spans.append((gates["prefix"], *self._prefix_keys(t)))
        if not spans:
            return attention(q, k, v, attn_mask)
        kept, at = [], 0  # key ranges outside every gated prefix
        for _, a, b in sorted(spans, key=lambda s: s[1]):
            kept.append((at, a))
            at = b
        kept.append((at, k.shape[2]))

        def outside(t: torch.Tensor, dim: int) -> torch.Tensor:  # t without the gated keys along dim
            parts = [t.narrow(dim, a, b - a) for a, b in kept if b > a] or [t.narrow(dim, 0, 0)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

        mask = None if attn_mask is None else outside(attn_mask, -1)  # (B, 1, T, S - gated)
        out = attention(q, outside(k, 2), outside(v, 2), mask)  # (B, H, T, hd)
        B, KVH, S, hd = v.shape
        for g, a, b in spans:
            v_p = torch.cat([v.new_zeros(B, KVH, a, hd), v[:, :, a:b], v.new_zeros(B, KVH, S - b, hd)], dim=2)
            out = out + g[:, None, :, None].to(out.dtype) * attention(q, k, v_p, attn_mask)
        return out


class Adapter:
    """A stack of methods with their trainable tensors (the edge's master copy).

    tensors[k]["edge"] are method k's edge-only tensors; tensors[k][layer] its
    tensors for one block. Names inside a block follow HF PEFT where it has the
    method (e.g. "self_attn.q_proj.lora_A").
    """

    def __init__(self, methods: Sequence[Method], block_tensors: list[dict[int, Tensors]], edge_tensors: list[Tensors]) -> None:
        if not (len(methods) == len(block_tensors) == len(edge_tensors)):
            raise AdapterError("adapter: methods and tensor lists differ in length")
        self.methods = list(methods)
        self.block_tensors = block_tensors
        self.edge_tensors = edge_tensors
        self.constants: list[Tensors] = [{} for _ in self.methods]  # per method: Method.constants, rebuilt anywhere
        self.state: list[Tensors] = [{} for _ in self.methods]  # per method: Method.init_state, edge-side training state
        self.training = False
        self.merged = False
        self.model_config = None  # the base model's ModelConfig (set by create(); save_adapter needs it)

    # -- creation --------------------------------------------------------------
    @classmethod
    def create(cls, model: CausalLM, methods: Sequence[Method], seed: int = 0,
               block_source: Callable[[], Iterable[Block]] | None = None) -> Adapter:
        """Fresh tensors for `model`'s blocks (and edge, when it has one), seeded.

        `block_source` yields the blocks to initialise instead of the model's own:
        the edge of a distributed run holds no blocks and passes stand-ins for all
        of them (see runtime/train/remote.py); the same seed gives the same tensors.
        """
        if not methods:
            raise AdapterError("an adapter needs at least one PEFT method")
        gen = torch.Generator().manual_seed(seed)
        block_source = model.blocks if block_source is None else block_source
        blocks, edges = [], []
        for method in methods:
            per_block = {}
            for block in block_source():
                t = method.init_block(model.config, block, gen)
                if t:
                    per_block[block.layer_idx] = t
            blocks.append(per_block)
            edges.append(method.init_edge(model.config, model, gen) if model.has_edge else {})
        adapter = cls(methods, blocks, edges)
        adapter.model_config = model.config
        adapter.constants = [m.constants(model.config) for m in methods]
        adapter.to(device=model.device, dtype=model.dtype)
        for p in adapter.parameters():
            p.requires_grad_(True)
        adapter.state = [m.init_state(b) for m, b in zip(adapter.methods, adapter.block_tensors)]
        whole = model.has_edge and (block_source is not model.blocks or (model.start == 0 and model.end == model.config.num_layers))
        if whole and not any(True for _ in adapter.parameters()):  # a node's part may hold none of them
            raise AdapterError("the adapter's methods target no module of this model; check target_modules / layers_to_transform")
        return adapter

    # -- tensors ----------------------------------------------------------------
    def named_tensors(self, frozen: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """('m{k}.edge.{name}' | 'm{k}.layers.{i}.{name}', tensor) over the whole stack; with
        frozen=False, only what trains (no tensor a method declares frozen)."""
        for k, (method, blocks, edge) in enumerate(zip(self.methods, self.block_tensors, self.edge_tensors)):
            for name, t in edge.items():
                yield f"m{k}.edge.{name}", t
            for layer in sorted(blocks):
                for name, t in blocks[layer].items():
                    if frozen or not method.is_frozen(name):
                        yield f"m{k}.layers.{layer}.{name}", t

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors the optimizer trains."""
        return self.named_tensors(frozen=False)

    def parameters(self) -> Iterator[torch.Tensor]:
        for _, t in self.named_parameters():
            yield t

    def frozen_keys(self) -> set[str]:
        """The '{method}.{layer}.{name}' keys of frozen block tensors (see block_tensor_views)."""
        return {f"{k}.{layer}.{name}" for k, (m, blocks) in enumerate(zip(self.methods, self.block_tensors))
                for layer, ts in blocks.items() for name in ts if m.is_frozen(name)}

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.named_tensors()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_tensors())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdapterError(f"adapter state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, t in own.items():
                if t.shape != state[name].shape:
                    raise AdapterError(f"adapter tensor {name}: shape {tuple(state[name].shape)} != {tuple(t.shape)}")
                t.copy_(state[name])

    def to(self, device=None, dtype=None) -> Adapter:
        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if t.is_floating_point() else None  # indices stay integers
            return t.detach().to(device=device, dtype=cast).requires_grad_(t.requires_grad)

        self.block_tensors = [{l: {n: move(t) for n, t in ts.items()} for l, ts in b.items()} for b in self.block_tensors]
        self.edge_tensors = [{n: move(t) for n, t in e.items()} for e in self.edge_tensors]
        self.constants = [{n: move(t) for n, t in c.items()} for c in self.constants]
        self.state = [{n: t.to(device=device) for n, t in st.items()} for st in self.state]  # its own dtypes
        return self

    def train(self, mode: bool = True) -> Adapter:
        self.training = mode
        return self

    def eval(self) -> Adapter:
        return self.train(False)

    # -- use in forward ---------------------------------------------------------
    def for_blocks(self, layers: Iterable[int], dropout_key: tuple | None) -> dict[int, BlockAdapter]:
        """Each block's BlockAdapter for one forward pass (derived tensors computed once)."""
        if self.merged:  # the weights already hold the adapter
            return {}
        layers = list(layers)
        key = dropout_key if self.training else None
        return block_adapters(self.methods, self.block_tensor_views(layers), layers, key, self.constants)

    def block_tensor_views(self, layers: Iterable[int]) -> dict[str, torch.Tensor]:
        """'{method}.{layer}.{name}' -> the tensor blocks use, for `layers`.

        Derived tensors (prefix projection) keep their autograd link to the edge
        tensors they come from. This is what a distributed run ships to the nodes;
        gradients coming back for these keys flow on into the master tensors.
        """
        layers = list(layers)
        derived = [m.derive_blocks(e, layers) for m, e in zip(self.methods, self.edge_tensors)]
        out = {}
        for k, (blocks, extra) in enumerate(zip(self.block_tensors, derived)):
            source = blocks if extra is None else extra
            for layer in layers:
                for name, t in source.get(layer, {}).items():
                    out[f"{k}.{layer}.{name}"] = t
        return out

    @property
    def num_prefix_tokens(self) -> int:
        return sum(m.num_prefix_tokens() for m in self.methods)

    @property
    def position_offset(self) -> int:
        return sum(m.position_offset() for m in self.methods)

    def prepend_prompt(self, h: torch.Tensor, mask: torch.Tensor | None, first: bool):
        for m, e in zip(self.methods, self.edge_tensors):
            h, mask = m.prepend_prompt(e, h, mask, first)
        return h, mask

    def edge_norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return weight
        for m, e in zip(self.methods, self.edge_tensors):
            weight = m.edge_norm_weight(e, weight)
        return weight

    def merge_views(self, k: int) -> dict[int, Tensors]:
        """Method k's tensors of each block joined by its constants, as a forward sees them
        (block_adapters): what Method.merge / unmerge take."""
        return {layer: {**self.constants[k], **t} for layer, t in self.block_tensors[k].items()}

    # -- the edge's side of a training step ---------------------------------------
    def regularizer(self) -> torch.Tensor | None:
        """The sum of the methods' regularizers (Method.regularizer), or None when none has one."""
        terms = [t for t in (m.regularizer(b) for m, b in zip(self.methods, self.block_tensors)) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """Every method's Method.after_optimizer_step; their metrics, merged."""
        metrics: dict[str, float] = {}
        for m, blocks, state in zip(self.methods, self.block_tensors, self.state):
            metrics.update(m.after_optimizer_step(blocks, state, step))
        return metrics

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The methods' training state as 'm{k}.{name}' tensors (what a checkpoint keeps)."""
        return {f"m{k}.{name}": t.detach().clone() for k, st in enumerate(self.state) for name, t in st.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {f"m{k}.{name}" for k, st in enumerate(self.state) for name in st}
        if own != set(tensors):
            raise AdapterError(f"method state does not match: expected {sorted(own)[:5]}, got {sorted(tensors)[:5]}")
        for k, st in enumerate(self.state):
            for name in st:
                st[name] = tensors[f"m{k}.{name}"].to(st[name].device)

    # -- merging ---------------------------------------------------------------
    def unmergeable_methods(self) -> list[str]:
        return [type(m).__name__ for m in self.methods if not m.mergeable]

    @torch.no_grad()
    def merge_into(self, model: CausalLM) -> None:
        """Fold every method into the model's weights; refuses if any method cannot merge exactly."""
        bad = self.unmergeable_methods()
        if bad:
            raise AdapterError(f"cannot merge {', '.join(bad)}: not expressible as a change of the base weights")
        if self.merged:
            raise AdapterError("adapter is already merged")
        self._undo = []
        for k, (method, edge) in enumerate(zip(self.methods, self.edge_tensors)):
            undo = {layer: method.merge(t, model.block(layer)) for layer, t in self.merge_views(k).items()}
            undo["edge"] = method.merge_edge(edge, model) if model.has_edge else {}
            self._undo.append(undo)
        self.merged = True

    @torch.no_grad()
    def unmerge_from(self, model: CausalLM) -> None:
        """Restore the base weights merge_into() changed."""
        if not self.merged:
            raise AdapterError("adapter is not merged")
        stack = list(enumerate(zip(self.methods, self.edge_tensors, self._undo)))
        for k, (method, edge, undo) in reversed(stack):
            for layer, t in self.merge_views(k).items():
                method.unmerge(t, model.block(layer), undo[layer])
            if model.has_edge:
                method.unmerge_edge(edge, model, undo["edge"])
        self.merged = False


def split_block_key(key: str) -> tuple[int, int, str]:
    """'{method}.{layer}.{name}' -> (method, layer, name); AdapterError when malformed."""
    parts = key.split(".", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2]:
        raise AdapterError(f"adapter tensor key {key!r} is not '<method>.<layer>.<name>'")
    return int(parts[0]), int(parts[1]), parts[2]


def block_adapters(methods: Sequence[Method], tensors: dict[str, torch.Tensor], layers: Iterable[int],
                   dropout_key: tuple | None, constants: Sequence[Tensors] | None = None) -> dict[int, BlockAdapter]:
    """BlockAdapters for `layers` from keyed tensors (see Adapter.block_tensor_views).

    One code path for a whole local model and for a node's blocks, so both apply
    the same methods in the same stack order with the same dropout keys. `constants`
    (per method, Method.constants) join the tensors of every block the method targets.
    """
    layers = list(layers)
    grouped: dict[int, list[Tensors]] = {layer: [{} for _ in methods] for layer in layers}
    for key, t in tensors.items():
        k, layer, name = split_block_key(key)
        if k >= len(methods):
            raise AdapterError(f"adapter tensor {key!r}: the adapter has only {len(methods)} method(s)")
        if layer in grouped:
            grouped[layer][k][name] = t
    shared = list(constants) if constants is not None else [{} for _ in methods]
    return {layer: BlockAdapter(layer, [(m, {**c, **t}) for m, t, c in zip(methods, grouped[layer], shared) if t],
                                dropout_key)
            for layer in layers}


def constants_digest(constants: Sequence[Tensors]) -> str:
    """sha256 over every method's constants (names, dtypes, shapes, fp32 values); '' when there are none.

    The edge sends it in Open; a node that rebuilds different constants refuses the session."""
    if not any(constants):
        return ""
    h = hashlib.sha256()
    for k, c in enumerate(constants):
        for name in sorted(c):
            t = c[name].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{k}.{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def methods_to_json(methods: Sequence[Method]) -> str:
    """The method configs as JSON, for a node to rebuild them (methods_from_json)."""
    return json.dumps([{"type": type(m).__name__, "fields": dataclasses.asdict(m)} for m in methods])


def methods_from_json(text: str) -> list[Method]:
    """Method configs from methods_to_json's output; AdapterError for anything else."""
    from edgetune.runtime.peft import METHODS

    classes = {cls.__name__: cls for cls in METHODS.values()}
    try:
        items = json.loads(text)
        if not isinstance(items, list) or not items:
            raise ValueError("expected a non-empty list")
        return [classes[item["type"]](**item["fields"]) for item in items]
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"malformed PEFT method configs ({type(e).__name__}: {e}); known types: {sorted(classes)}") from None


def attach_adapter(model: CausalLM, adapter: Adapter | Sequence[Method] | Method, seed: int = 0) -> Adapter:
    """Attach an adapter (or create one from method configs) to `model`; returns it.

        >>> adapter = attach_adapter(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    """
    if isinstance(adapter, Method):
        adapter = [adapter]
    if not isinstance(adapter, Adapter):
        adapter = Adapter.create(model, list(adapter), seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.adapter = adapter
    return adapter
