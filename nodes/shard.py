"""A node's blocks of one model and the training sessions that use them.

Plain Python and torch, no gRPC: `nodes/service.py` decodes frames, calls these
methods and encodes the results. One `Shard` per served model part; one
`ShardSession` per edge stream.

A session keeps, per micro-batch of the current step, the block inputs and
outputs autograd needs for backward (the activation cache, bounded by
`max_cached`). Adapter gradients are computed with `torch.autograd.grad` and
summed per step once per micro-batch: a micro-batch the edge replays (because
this node or a later one lost its activations) gives the same gradient again,
and counting it twice would be wrong.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from edgetune.runtime.compute.executor import BlockExecutor
from edgetune.runtime.compute.quantize import check_methods, plain_weight, tensor_bytes
from edgetune.runtime.errors import ConfigError, SessionError
from edgetune.runtime.model.transformer import CausalLM
from edgetune.runtime.peft.adapter import block_adapters, constants_digest, methods_from_json, split_block_key
from edgetune.runtime.peft.sparse import INDICES, SCORES
from edgetune.runtime.peft.stats import STAT_PREFIX, Recorder, recording
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire.serde import roundtrip as wire_roundtrip

log = logging.getLogger("edgetune.node")


def _constant_bytes(constants: list) -> int:
    """Bytes of the methods' shared constants (VeRA's projections) a session holds."""
    return sum(t.numel() * t.element_size() for c in constants for t in c.values())


@dataclass
class _Saved:
    """What backward needs for one micro-batch: the leaf input and the output."""

    h_in: torch.Tensor   # (B, T, D), requires grad
    h_out: torch.Tensor  # (B, T, D)


@dataclass
class _StepGrads:
    step: int
    done: set[int] = field(default_factory=set)  # micro-batches whose adapter grads are summed
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


class Shard:
    """Blocks [part.start, part.end) of `model`, verified against `fingerprint`."""

    def __init__(self, name: str, model: str, part: CausalLM, fingerprint: str, max_cached: int = 64,
                 quantize: str = "none", kernels: str = "eager", memory_bytes: int = 0) -> None:
        if max_cached < 1:
            raise ValueError("max_cached must be at least 1")
        self.name = name
        self.model = model
        self.part = part
        self.fingerprint = fingerprint
        self.max_cached = max_cached
        self.quantize = quantize  # how part's linear weights are held (compute.quantize.quantize_blocks)
        self.executor = BlockExecutor(kernels)  # the ops its blocks run (compute.kernels)
        self.memory_bytes = memory_bytes  # what this node may use in all (0: no admission limit)
        self.sessions: dict[str, ShardSession] = {}
        self._lock = threading.Lock()
        self._busy_s = 0.0
        self._since = time.monotonic()

    @property
    def start(self) -> int:
        return self.part.start

    @property
    def end(self) -> int:
        return self.part.end

    def precision(self) -> tuple[str, str]:
        """(dtype, quantization) of the blocks as served: ("bf16", "int8"), ("fp32", "none"), ..."""
        from edgetune.runtime.compute.precision import dtype_name

        return dtype_name(self.part.dtype), self.quantize

    def loaded_bytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.part.parameters())

    def open_session(self, msg: wire.Open) -> ShardSession:
        """Check that the edge's route and model match what this node serves."""
        if not msg.route:
            raise SessionError("Open carries an empty route", code="INVALID_ARGUMENT")
        me = msg.route[0]
        if (me.start, me.end) != (self.start, self.end):
            raise SessionError(f"node {self.name} serves blocks [{self.start}, {self.end}) but the route asks it for "
                               f"[{me.start}, {me.end}); ask the coordinator for a new route", code="FAILED_PRECONDITION")
        if msg.fingerprint != self.fingerprint:
            raise SessionError(f"model fingerprint mismatch on node {self.name}: the edge has "
                               f"{msg.fingerprint[:16]}..., this node serves {self.fingerprint[:16]}... of {self.model}; "
                               "both sides must load the same weights", code="FAILED_PRECONDITION")
        try:
            methods = methods_from_json(msg.methods_json)
        except Exception as e:  # AdapterError: a malformed method list from the wire
            raise SessionError(str(e), code="INVALID_ARGUMENT") from None
        try:
            check_methods(methods, self.quantize, self.name)
        except ConfigError as e:
            raise SessionError(str(e), code="FAILED_PRECONDITION") from None
        try:
            shapes = adapter_shapes(methods, self.part)
        except Exception as e:  # a config from the wire that parses but makes no tensors (e.g. a bad regex)
            raise SessionError(f"PEFT methods that make no adapter tensors for blocks [{self.start}, {self.end}) of "
                               f"{self.model}: {type(e).__name__}: {e}", code="INVALID_ARGUMENT") from None
        constants = [m.constants(self.part.config) for m in methods]
        if constants_digest(constants) != msg.constants_digest:
            raise SessionError(f"node {self.name} rebuilds other constants for these PEFT methods than the edge "
                               f"(digest {constants_digest(constants)[:16] or 'none'}... against the edge's "
                               f"{msg.constants_digest[:16] or 'none'}...): the two run different edgetune or torch "
                               "versions, or the Open was altered", code="FAILED_PRECONDITION")
        activations, extra = self.session_bytes(msg), self.probe_bytes(methods) + _constant_bytes(constants)
        with self._lock:  # admitted by what it will hold before any of it is made
            held = self.sessions.get(msg.session_id)
            if held is not None and held.owner != msg.owner:
                raise SessionError(f"session {msg.session_id!r} on node {self.name} belongs to another edge",
                                   code="PERMISSION_DENIED")
            others = sum(s.reserved_bytes for sid, s in self.sessions.items() if sid != msg.session_id)
            free = self.memory_bytes - self.loaded_bytes() - others
            if self.memory_bytes and activations + extra > free:
                raise SessionError(
                    f"node {self.name} cannot admit session {msg.session_id!r}: its activations need "
                    f"{activations / 2**20:.1f} MiB ({msg.micro_batches} micro-batches of "
                    f"{msg.micro_batch_size} x {msg.seq_len} tokens over blocks [{self.start}, {self.end}))"
                    + (f" and its methods' probes and constants {extra / 2**20:.1f} MiB" if extra else "") + ", "
                    f"{max(0, free) / 2**20:.1f} MiB are free ({self.memory_bytes / 2**20:.1f} MiB usable, "
                    f"{self.loaded_bytes() / 2**20:.1f} MiB of weights, {others / 2**20:.1f} MiB held by "
                    f"{len(self.sessions) - (held is not None)} other session(s)); use smaller micro-batches or "
                    "shorter sequences, or wait", code="RESOURCE_EXHAUSTED")
            session = ShardSession(self, msg.session_id, methods, msg.methods_json, msg.adapter_codec, owner=msg.owner,
                                   reserved_bytes=activations + extra, shapes=shapes, constants=constants)
            self.sessions[msg.session_id] = session
        return session

    def session_bytes(self, msg: wire.Open) -> int:
        """What the cost model says a session of `msg`'s shape holds on this shard."""
        from edgetune.runtime.plan.cost import session_bytes

        return session_bytes(self.part.config, self.end - self.start, msg.micro_batch_size, msg.seq_len,
                             msg.micro_batches, self.part.dtype.itemsize)

    def probe_bytes(self, methods) -> int:
        """What a calibration session's probes hold here beyond activations: per targeted weight entry an
        fp32 probe, its gradient, the Fisher sum, the probe's copy in the blocks' dtype and the square
        being added (20 bytes); at EndStep the ranking of the largest weight's scores (a sort: 12 bytes
        an entry) comes on top. 0 for a training session."""
        probes = [m for m in methods if hasattr(m, "probe_tensors")]
        sizes = [linear.weight.numel() for m in probes for block in self.part.layers for _, linear in m.targeted(block)]
        return 20 * sum(sizes) + 12 * max(sizes, default=0)

    def close_session(self, session_id: str, session: ShardSession | None = None) -> None:
        """Forget `session_id` (only if it is still `session`, when given: a reopened one stays)."""
        with self._lock:
            if session is None or self.sessions.get(session_id) is session:
                self.sessions.pop(session_id, None)

    def account(self, seconds: float) -> None:
        with self._lock:
            self._busy_s += seconds

    def info(self, device: str = "") -> wire.NodeInfo:
        with self._lock:
            elapsed = max(1e-9, time.monotonic() - self._since)
            busy = min(1.0, self._busy_s / elapsed)
            self._busy_s, self._since = 0.0, time.monotonic()
            cached = sum(len(s.cache) for s in self.sessions.values())
            sessions = len(self.sessions)
            open_sessions = [wire.SessionInfo(s.session_id, s.owner, s.reserved_bytes) for s in self.sessions.values()]
            reserved = sum(s.reserved_bytes for s in self.sessions.values())
        return wire.NodeInfo(name=self.name, model=self.model, fingerprint=self.fingerprint, start=self.start,
                             end=self.end, device=device or str(self.part.device), sessions=sessions,
                             cached_activations=cached, loaded_bytes=self.loaded_bytes(), busy_fraction=busy,
                             open_sessions=open_sessions,
                             free_bytes=max(0, self.memory_bytes - self.loaded_bytes() - reserved) if self.memory_bytes else 0)


def adapter_shapes(methods, part: CausalLM) -> dict[tuple[int, int], dict[str, tuple[int, ...]]]:
    """(method index, layer) -> name -> shape of every adapter tensor the methods make for `part`'s
    blocks: what the edge's Adapter.create made (init_block, or derive_blocks for a projected prefix).
    Shapes only: tensors that need no base weight are made on the meta device."""
    gen = torch.Generator().manual_seed(0)
    layers = [block.layer_idx for block in part.layers]
    out = {}
    with torch.device("meta"):
        for k, method in enumerate(methods):
            derived = None
            if type(method).overrides("derive_blocks"):
                derived = method.derive_blocks(method.init_edge(part.config, part, gen), layers)
            for block in part.layers:
                made = method.init_block(part.config, block, gen) if derived is None else derived.get(block.layer_idx, {})
                if made:
                    out[(k, block.layer_idx)] = {name: tuple(t.shape) for name, t in made.items()}
    return out


class ShardSession:
    """One edge's use of a shard: the current adapter version, cached activations, step grads."""

    def __init__(self, shard: Shard, session_id: str, methods, methods_key: str = "", adapter_codec: str = "raw",
                 owner: str = "", reserved_bytes: int = 0, shapes: dict | None = None,
                 constants: list | None = None) -> None:
        self.shard = shard
        self.session_id = session_id
        self.owner = owner  # the edge identity that opened it
        self.reserved_bytes = reserved_bytes  # set aside at admission
        self.methods = methods
        self.shapes = adapter_shapes(methods, shard.part) if shapes is None else shapes  # what a whole push holds
        self.methods_key = methods_key  # what a compiled block function is keyed by (with shapes, dtype)
        self.adapter_codec = adapter_codec  # how deltas arrive and gradients leave (wire.ADAPTER_CODECS)
        self.residuals: dict[str, torch.Tensor] = {}  # gradient error feedback: what encoding lost so far
        # Virtual tokens of prefix tuning shift the keys; prompt tuning shifts positions.
        self.prefix = sum(m.num_prefix_tokens() for m in methods)
        self.position_offset = sum(m.position_offset() for m in methods)
        self.version: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.cache: OrderedDict[tuple[int, int], _Saved] = OrderedDict()
        self.step_grads: _StepGrads | None = None
        self.timing = wire.StageTiming(name=shard.name)
        part = shard.part
        made = [m.constants(part.config) for m in methods] if constants is None else constants
        self.constants = [{n: t.to(part.device, part.dtype) for n, t in c.items()} for c in made]
        self.stats: dict[tuple[int, int], Recorder] = {}  # (step, micro) -> what methods recorded (gates)
        # A calibration session (sparse fine-tuning's mask): a probe method's dense zero deltas live here
        # only, never on the wire; their per-micro-batch gradients (= dL/dW) are squared and summed into
        # the Fisher, and only each weight's top entries go back (see end_step).
        self.probe: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        for k, m in enumerate(methods):
            if hasattr(m, "probe_tensors"):
                for block in part.layers:
                    for name, t in m.probe_tensors(block).items():
                        self.probe[f"{k}.{block.layer_idx}.{name}"] = t.to(part.device, torch.float32).requires_grad_(True)

    # -- adapter ------------------------------------------------------------------
    def push_adapter(self, msg: wire.AdapterPush) -> None:
        """Take version `msg.version` of this shard's adapter tensors (a push holds one stage's).

        A delta push adds to the replica this session holds (what the edge's mirror of it says);
        a whole push replaces it. Every tensor is checked before the replica changes."""
        part = self.shard.part
        for key, t in msg.tensors.items():
            k, layer, _ = split_block_key(key)
            if k >= len(self.methods) or not 0 <= layer < part.config.num_layers:
                raise SessionError(f"adapter tensor {key!r} names no method/block of this model", code="INVALID_ARGUMENT")
            if not part.start <= layer < part.end:
                raise SessionError(f"adapter tensor {key!r} is for block {layer}, but node {self.shard.name} serves "
                                   f"[{part.start}, {part.end}): a push for a later node says how many hops ahead "
                                   "it is going", code="INVALID_ARGUMENT")
            frozen = self.methods[k].is_frozen(split_block_key(key)[2])
            if t.is_floating_point() == frozen or (frozen and msg.delta):
                want = "integer indices, pushed whole" if frozen else "floating point"
                raise SessionError(f"adapter tensor {key!r} has dtype {t.dtype}; expected {want}", code="INVALID_ARGUMENT")
            if frozen and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self._index_limit(key)):
                raise SessionError(f"adapter tensor {key!r} holds indices outside [0, {self._index_limit(key)})",
                                   code="INVALID_ARGUMENT")
            if frozen and t.numel() > 1 and not bool((t.reshape(-1)[1:] > t.reshape(-1)[:-1]).all()):
                raise SessionError(f"adapter tensor {key!r}: indices must be sorted and unique", code="INVALID_ARGUMENT")
            if msg.delta:
                old = self.tensors.get(key)
                if old is None or old.shape != t.shape:
                    raise SessionError(f"adapter delta for {key!r} but node {self.shard.name} holds no replica of "
                                       "that shape; send the whole adapter", code="FAILED_PRECONDITION")
        if not msg.delta:
            self._check_whole(msg.tensors)
            self._check_frozen_held(msg.tensors)
        # frozen tensors (a sparse mask's indices) come once a session: later pushes leave them out
        mine = dict(self.tensors) if msg.delta else {k: t for k, t in self.tensors.items() if not t.is_floating_point()}
        for key, t in msg.tensors.items():
            # the leaf stays fp32 (the edge's master precision): each forward casts it to the
            # blocks' dtype, so autograd returns its gradient in fp32 and sums stay fp32
            if msg.delta:
                with torch.no_grad():
                    mine[key].add_(t.to(device=mine[key].device, dtype=torch.float32))
            else:
                mine[key] = self._into_buffer(key, t)
        self.version = msg.version
        self.tensors = mine
        self.cache.clear()  # activations of an older version are useless for its gradients

    def _check_whole(self, tensors: dict[str, torch.Tensor]) -> None:
        """A whole push holds tensors the session's methods make for this shard's blocks, in the shapes
        they make them; a method that adds virtual tokens needs all of its tensors (every block's
        attention expects its keys). A method that needs a tensor left out says so in forward."""
        wrong = []
        for key, t in tensors.items():
            k, layer, name = split_block_key(key)
            want = self.shapes.get((k, layer), {}).get(name)
            if key != f"{k}.{layer}.{name}" or want != tuple(t.shape):
                wrong.append(f"{key!r} of shape {tuple(t.shape)}" + (f" (expected {want})" if want else ""))
        pushed = {split_block_key(key) for key in tensors}
        for (k, layer), names in self.shapes.items():
            if self.methods[k].num_prefix_tokens():
                wrong += [f"'{k}.{layer}.{n}' missing" for n in names if (k, layer, n) not in pushed]
        if wrong:
            raise SessionError(f"adapter push for node {self.shard.name} does not fit the session's PEFT methods "
                               f"on blocks [{self.shard.start}, {self.shard.end}): " + ", ".join(wrong[:4])
                               + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""), code="INVALID_ARGUMENT")

    def _check_frozen_held(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every frozen tensor of the session's methods (a sparse mask's indices) is in this push or held
        from an earlier one: without them, trained values would silently go nowhere."""
        missing = [f"'{k}.{layer}.{name}'" for (k, layer), names in self.shapes.items() for name in names
                   if self.methods[k].is_frozen(name) and f"{k}.{layer}.{name}" not in tensors
                   and f"{k}.{layer}.{name}" not in self.tensors]
        if missing:
            raise SessionError(f"adapter push for node {self.shard.name} lacks {', '.join(missing[:4])}"
                               + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                               + ": a session's first push carries its frozen tensors", code="INVALID_ARGUMENT")

    def _into_buffer(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The session's persistent leaf for `key`, holding `t`: a new version is copied into the
        same storage (compiled code sees the same input), a new shape gets a new leaf."""
        part = self.shard.part
        if not t.is_floating_point():  # frozen indices: no gradient, their own dtype
            return t.to(device=part.device).clone()
        old = self.tensors.get(key)
        if old is not None and old.shape == t.shape:
            with torch.no_grad():
                old.copy_(t)
            return old
        return t.to(device=part.device, dtype=torch.float32).clone().requires_grad_(True)

    def with_feedback(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients about to leave with the session's adapter codec, plus what encoding lost from
        earlier steps (error feedback); keeps what this encoding will lose. Raw: unchanged."""
        if self.adapter_codec == "raw":
            return grads
        out = {}
        for name, g in grads.items():
            if name.startswith(STAT_PREFIX) or not g.is_floating_point():
                out[name] = g
                continue
            g = g.float()
            r = self.residuals.get(name)
            if r is not None and r.shape == g.shape:
                g = g + r.to(g.device)
            self.residuals[name] = g - wire_roundtrip(g, self.adapter_codec)
            out[name] = g
        return out

    # -- forward / backward -----------------------------------------------------
    def forward(self, msg: wire.Forward) -> torch.Tensor:
        """Run the blocks; keeps what backward needs when msg.train (unless msg.recompute: a verifier
        replica's recomputation runs the training path, dropout masks included, and keeps nothing,
        so a verifier session holds no more than one forward's memory). Returns (B, T, D)."""
        if self.version is None or msg.version != self.version:
            raise SessionError(f"stale adapter version {msg.version} on node {self.shard.name} "
                               f"(it holds version {self.version}); push the adapter before its forwards", code="FAILED_PRECONDITION")
        part = self.shard.part
        h = msg.hidden
        if h.dim() != 3 or h.shape[-1] != part.config.hidden_size or not h.is_floating_point():
            raise SessionError(f"hidden states must be (B, T, {part.config.hidden_size}) floats, "
                               f"got {tuple(h.shape)} {h.dtype}", code="INVALID_ARGUMENT")
        mask = msg.attention_mask
        if mask is not None and tuple(mask.shape) != tuple(h.shape[:2]):
            raise SessionError(f"attention_mask {tuple(mask.shape)} does not match hidden {tuple(h.shape[:2])}", code="INVALID_ARGUMENT")
        started = time.perf_counter()
        h_in = h.to(device=part.device, dtype=part.dtype)
        B, T, _ = h_in.shape
        key = tuple(msg.dropout_key) if (msg.train and msg.dropout_key) else None
        mask = None if mask is None else mask.to(part.device)
        ctx = part.make_context(B, T, part.device, mask, 0, self.prefix, self.position_offset, key)
        if msg.train:
            h_in.requires_grad_(True)
            seen = Recorder()
            with torch.enable_grad(), recording(seen):
                h_out = self._run_blocks(h_in, ctx, key)
            if not msg.recompute:  # a replayed micro-batch replaces what its first forward recorded
                self.stats[(msg.step, msg.micro)] = seen
                self._remember(msg.step, msg.micro, _Saved(h_in, h_out))
        else:
            with torch.no_grad():
                h_out = self._run_blocks(h_in, ctx, key)
        self._spent("forward_s", started)
        return h_out.detach().float()  # the wire's codec, not the blocks' dtype, decides what travels

    def _run_blocks(self, h_in: torch.Tensor, ctx, dropout_key) -> torch.Tensor:
        try:
            return self.shard.executor.forward_blocks(self.shard.part, h_in, ctx, self._views(dropout_key), self.methods_key)
        except KeyError as e:  # a method's rule looked up a tensor of its block that the push left out
            names = {name for block in self.shapes.values() for name in block}
            if e.args and e.args[0] in names:
                raise SessionError(f"adapter version {self.version} on node {self.shard.name} lacks {e.args[0]!r}, "
                                   "which its method needs beside the tensors pushed with it: push the whole "
                                   "adapter", code="INVALID_ARGUMENT") from None
            raise

    def _views(self, dropout_key):
        """Per-block adapter views over this version's tensors, cast to the blocks' dtype."""
        part = self.shard.part
        tensors = {n: t.to(part.dtype) if t.is_floating_point() else t for n, t in {**self.tensors, **self.probe}.items()}
        return block_adapters(self.methods, tensors, range(part.start, part.end), dropout_key, self.constants)

    def has_activation(self, step: int, micro: int) -> bool:
        return (step, micro) in self.cache

    def missing(self, step: int, micro: int) -> SessionError:
        return SessionError(f"node {self.shard.name} holds no activations for step {step} "
                            f"micro-batch {micro} (evicted or restarted); re-send its forward", code="FAILED_PRECONDITION")

    def backward(self, step: int, micro: int, grad: torch.Tensor) -> torch.Tensor:
        """dL/d(input) for one micro-batch; adds its adapter grads to the step's sums once."""
        saved = self.cache.pop((step, micro), None)
        if saved is None:
            raise self.missing(step, micro)
        if tuple(grad.shape) != tuple(saved.h_out.shape):
            raise SessionError(f"gradient {tuple(grad.shape)} does not match the output "
                               f"{tuple(saved.h_out.shape)} of micro-batch {micro}", code="INVALID_ARGUMENT")
        started = time.perf_counter()
        held = {**self.tensors, **self.probe}
        names = [n for n, t in held.items() if t.requires_grad]  # not frozen indices
        inputs = [saved.h_in] + [held[n] for n in names]
        grads = torch.autograd.grad(saved.h_out, inputs, grad.to(saved.h_out.device, saved.h_out.dtype), allow_unused=True)
        sums = self._grads_for(step)
        if micro not in sums.done:
            sums.done.add(micro)
            for name, g in zip(names, grads[1:]):
                if g is None:
                    continue
                if name in self.probe:  # empirical Fisher: this micro-batch's squared gradient
                    g = g.float().square()
                    self.fisher[name] = g if name not in self.fisher else self.fisher[name] + g
                else:
                    sums.grads[name] = g if name not in sums.grads else sums.grads[name] + g
        self._spent("backward_s", started)
        return grads[0].float()

    def end_step(self, msg: wire.EndStep) -> tuple[dict[str, torch.Tensor], wire.StageTiming]:
        """The step's summed adapter grads and this stage's timing; resets both."""
        if msg.version != self.version:
            # ABORTED, not FAILED_PRECONDITION: the edge reads that as lost activations of a micro-batch
            raise SessionError(f"EndStep for adapter version {msg.version} but node "
                               f"{self.shard.name} holds version {self.version}", code="ABORTED")
        sums = self.step_grads if self.step_grads is not None and self.step_grads.step == msg.step else _StepGrads(msg.step)
        timing, self.timing = self.timing, wire.StageTiming(name=self.shard.name)
        self.step_grads = None
        self.cache = OrderedDict((k, v) for k, v in self.cache.items() if k[0] > msg.step)
        seen = Recorder()
        for key in [k for k in self.stats if k[0] <= msg.step]:
            seen.merge(self.stats.pop(key))
        stats = {STAT_PREFIX + name: pair for name, pair in seen.as_tensors().items()}
        return {**{n: g.detach() for n, g in sums.grads.items()}, **stats, **self._chosen_entries()}, timing

    def _chosen_entries(self) -> dict[str, torch.Tensor]:
        """A calibration session's result: per probed weight, the indices (int64) and scores (fp32) of
        the entries its probe method keeps, by the Fisher summed so far or by the weight's magnitude."""
        out = {}
        for key in self.probe:
            k, layer, name = split_block_key(key)
            module = name.rsplit(".", 1)[0]
            method = self.methods[k]
            weight = self.shard.part.block(layer).linears()[module].weight
            scores = self.fisher.get(key) if method.score == "fisher" else plain_weight(weight).detach().float().abs()
            if scores is None:
                raise SessionError(f"calibration on node {self.shard.name}: no gradient reached {key!r}; send "
                                   "the calibration sequences' forwards and backwards before EndStep",
                                   code="FAILED_PRECONDITION")
            indices, chosen = method.choose(scores)
            out[f"{k}.{layer}.{module}{INDICES}"] = indices.cpu()
            out[f"{k}.{layer}.{module}{SCORES}"] = chosen.float().cpu()
        self.fisher = {}
        return out

    def _index_limit(self, key: str) -> int:
        """How many entries a frozen index tensor may address: its linear layer's weight's."""
        k, layer, name = split_block_key(key)
        module = name.rsplit(".", 1)[0]
        linears = self.shard.part.block(layer).linears() if self.shard.start <= layer < self.shard.end else {}
        return linears[module].weight.numel() if module in linears else 0

    # -- internals ------------------------------------------------------------------
    def _remember(self, step: int, micro: int, saved: _Saved) -> None:
        self.cache.pop((step, micro), None)
        self.cache[(step, micro)] = saved
        while len(self.cache) > self.shard.max_cached:
            evicted, _ = self.cache.popitem(last=False)
            log.debug("session %s: evicted activations of step %d micro-batch %d", self.session_id, *evicted)

    def _grads_for(self, step: int) -> _StepGrads:
        if self.step_grads is None or self.step_grads.step != step:
            self.step_grads = _StepGrads(step)
        return self.step_grads

    def _spent(self, what: str, started: float) -> None:
        seconds = time.perf_counter() - started
        setattr(self.timing, what, getattr(self.timing, what) + seconds)
        self.shard.account(seconds)
