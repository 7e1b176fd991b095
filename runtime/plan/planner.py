"""`edgetune plan`: memory, work, traffic and time of one training step, before anything runs.

No weights, no torch: the model's shapes (a config), what the adapter pushes per block (counted
by the caller with the runtime's own method code), the batch, the nodes and their links.

The route is the pipeline of `partition.py`: edge -> node 1 -> ... -> node S, results relayed
back up the same hops. Per step, with m micro-batches of b = B/m sequences of T tokens:

- **Bytes, per hop and direction.** Down: the adapter tensors of the blocks at or after the
  hop's node, m hidden states (Forward) and m gradients (Backward goes to the last node).
  Up: m hidden states (ForwardResult, relayed), m gradients (BackwardResult: between nodes;
  to the edge only for prompt tuning, whose virtual tokens need them) and the same adapter
  gradients (Gradients). Adapter values take 4 bytes with `--adapter-codec raw`; with
  bf16/int8 the steady state's deltas and gradients take the codec's bytes on every hop (nodes
  relay later stages' traffic unopened). A hidden state is b x T x D values in the wire codec
  (int8: one byte a value plus an fp32 scale per 64).
- **Compute.** A frozen block's training step costs about twice its forward (the backward to
  the inputs; no weight gradients): 2 x block_flops / the node's sustained FLOP/s per block and
  micro-batch. GPipe's step takes (m + S - 1) slots of the slowest stage; the edge adds its LM
  head (edge_head_flops) for the batch.
- **Bandwidth.** The adapter push and the adapter gradients do not overlap with the pipeline:
  a node needs its push before its first forward, and the gradients leave after the last
  backward. Both cross the route cut-through (one push per stage, the farthest first, relayed
  frame by frame as it arrives; gradients likewise), so each costs its slowest hop: the most
  of a hop's bytes over the hop's rate. The activations flow within the pipeline: each stage's
  slot is at least its hop's activation transfer.
- **Latency.** Three sequential trips down the route and back per step (forward of the first
  micro-batch, backward of the last, end of step): 3 x the sum of the hops' round trips.
- **Step time** = push + pipeline (compute and activations) + gradients + latency; the **bound**
  is whichever of compute, bandwidth (push, gradients and activations) or latency is largest.

Memory on a node: its blocks' weights in its dtype/quantization, the activations of m
micro-batches kept for backward, its adapter replica and gradients (fp32), and a fixed
runtime overhead. On the edge: embeddings and head (fp32, plus a bf16 copy of the head when
the loss runs in bf16), the adapter, its gradients and AdamW's two moments (fp32), the hidden
states of the batch and one chunk of logits.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.plan.cost import BlockShapes, block_flops, block_params, edge_head_flops, model_cost
from edgetune.runtime.plan.partition import ModelCost, StageNode, partition

FP32 = 4
CODEC_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4 / 64}
ADAPTER_CODEC_BYTES = {"raw": 4.0, "bf16": 2.0, "int8": 1.0 + 4 / 64}  # a value of an adapter delta or gradient
TENSOR_HEADER_BYTES = 60  # a tensor's header on the wire: its name, dtype, shape and sizes (measured)
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 1 / 64}
FIXED_NODE_BYTES = 512 << 20  # a node's runtime overhead (torch, gRPC, buffers)
LOSS_CHUNK_TOKENS = 1024  # train.loss.head_loss_sum's chunk
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class Link:
    """A network link: its rate in bits/s and its round-trip time in seconds."""

    rate_bits: float
    rtt_s: float

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bits / 8

    def __str__(self) -> str:
        return f"{_human_rate(self.rate_bits)}, {self.rtt_s * 1e3:g} ms RTT"


def parse_link(text: str) -> Link:
    """'100mbit,50ms' (rate, round-trip time) -> Link; ConfigError naming the problem otherwise."""
    parts = [p.strip().lower() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ConfigError(f"link {text!r}: expected RATE,RTT such as 100mbit,50ms")
    rate = re.fullmatch(r"([0-9.]+)\s*([a-z]+)", parts[0])
    rtt = re.fullmatch(r"([0-9.]+)\s*([a-z]+)", parts[1])
    if not rate or rate.group(2) not in _RATE_UNITS:
        raise ConfigError(f"link {text!r}: rate {parts[0]!r} is not a number with one of {', '.join(_RATE_UNITS)}")
    if not rtt or rtt.group(2) not in _TIME_UNITS:
        raise ConfigError(f"link {text!r}: round-trip time {parts[1]!r} is not a number with one of s, ms, us")
    bits = float(rate.group(1)) * _RATE_UNITS[rate.group(2)]
    if not math.isfinite(bits) or bits <= 0:
        raise ConfigError(f"link {text!r}: the rate must be positive")
    return Link(bits, float(rtt.group(1)) * _TIME_UNITS[rtt.group(2)])


@dataclass(frozen=True)
class PlanNode:
    """A worker as the planner sees it: usable memory, sustained FLOP/s, how it holds blocks, its link."""

    name: str
    memory_bytes: int
    flops: float  # sustained FLOP/s of its blocks' matmuls (e.g. 400e12 for an H100 in bf16)
    dtype: str = "bf16"
    quantize: str = "none"
    link: Link | None = None  # the link it is reached over (None: the plan's default)

    def __post_init__(self) -> None:
        problems = []
        if self.memory_bytes <= 0:
            problems.append("memory must be positive")
        if not (math.isfinite(self.flops) and self.flops > 0):
            problems.append("flops must be a positive number")
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype {self.dtype!r} not in {', '.join(DTYPE_BYTES)}")
        if self.quantize not in ("none", *QUANT_BYTES):
            problems.append(f"quantize {self.quantize!r} not in none, {', '.join(QUANT_BYTES)}")
        if problems:
            raise ConfigError(f"node {self.name!r}: " + "; ".join(problems))

    def weight_bytes_per_value(self) -> float:
        return QUANT_BYTES.get(self.quantize, DTYPE_BYTES[self.dtype])


@dataclass(frozen=True)
class EdgeSpec:
    flops: float  # sustained FLOP/s of the edge's LM head
    link: Link | None = None  # the link to the first node (None: the plan's default)
    head_dtype: str = "fp32"  # the loss's LM-head matmuls (fp32 or bf16)


@dataclass(frozen=True)
class Workload:
    batch_size: int
    seq_len: int
    micro_batches: int = 1
    codec: str = "fp32"
    adapter_codec: str = "raw"  # steady state: deltas down and gradients up, in this codec on every hop
    adapter_values: tuple[int, ...] = ()  # per block: values the edge pushes (fp32) and gets back as gradients
    trainable_params: int = 0  # the adapter's master copy on the edge (what AdamW updates)
    adapter_tensors: tuple[int, ...] = ()  # per block: how many tensors carry its values (a header each)
    input_grads: bool = False  # the edge gets dL/d(input) back (prompt tuning)

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size <= 0 or self.seq_len <= 0 or self.micro_batches <= 0:
            problems.append("batch size, sequence length and micro-batches must be positive")
        elif self.batch_size % self.micro_batches:
            problems.append(f"batch size {self.batch_size} does not split into {self.micro_batches} micro-batches")
        if self.codec not in CODEC_BYTES:
            problems.append(f"codec {self.codec!r} not in {', '.join(CODEC_BYTES)}")
        if self.adapter_codec not in ADAPTER_CODEC_BYTES:
            problems.append(f"adapter codec {self.adapter_codec!r} not in {', '.join(ADAPTER_CODEC_BYTES)}")
        if problems:
            raise ConfigError("plan: " + "; ".join(problems))


@dataclass
class HopReport:
    src: str
    dst: str
    link: str
    down_bytes: int
    up_bytes: int
    seconds: float  # the larger direction over the rate


@dataclass
class StageReport:
    name: str
    start: int
    end: int
    weight_bytes: int
    activation_bytes: int
    adapter_bytes: int
    fixed_bytes: int
    memory_limit_bytes: int
    seconds_per_micro_batch: float

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.adapter_bytes + self.fixed_bytes


@dataclass
class PlanReport:
    model: str
    params: int
    batch_size: int
    seq_len: int
    micro_batches: int
    codec: str
    trainable_params: int
    flops_per_token_forward: float
    flops_per_token_train: float
    stages: list[StageReport]
    hops: list[HopReport]
    edge_memory: dict[str, int]
    compute_s: float
    bandwidth_s: float
    latency_s: float
    step_s: float
    bound: str
    tokens_per_s: float
    notes: list[str] = field(default_factory=list)
    route_rtt_s: float = 0.0  # the round trips of every hop, summed

    def to_dict(self) -> dict:
        out = asdict(self)
        for s, d in zip(self.stages, out["stages"]):
            d["memory_bytes"] = s.memory_bytes
        out["edge_memory"]["total"] = sum(self.edge_memory.values())
        return out


def plan(config: BlockShapes, model_name: str, nodes: list[PlanNode], edge: EdgeSpec, work: Workload,
         default_link: Link) -> PlanReport:
    """The partition, memory, traffic and predicted step time of one training step (see the module doc)."""
    if not nodes:
        raise ConfigError("plan: no nodes; list at least one in the nodes file")
    L = config.num_layers
    values = list(work.adapter_values) or [0] * L
    if len(values) != L:
        raise ConfigError(f"plan: adapter values for {len(values)} blocks, the model has {L}")
    b = work.batch_size // work.micro_batches
    tokens = b * work.seq_len  # per micro-batch
    hidden_bytes = tokens * config.hidden_size * CODEC_BYTES[work.codec]
    per_block_flops = block_flops(config, b, work.seq_len)  # forward, one micro-batch
    cost = model_cost(config, tokens=tokens)  # fp32 bytes
    links = {n.name: n.link or default_link for n in nodes}
    stage_nodes = [StageNode(n.name, n.memory_bytes, 2 * per_block_flops / n.flops,
                             links[n.name].bytes_per_s, FIXED_NODE_BYTES,
                             weight_scale=n.weight_bytes_per_value() / FP32,
                             activation_scale=DTYPE_BYTES[n.dtype] / FP32) for n in nodes]
    # the partitioner's hop term: 4 hidden states per micro-batch over the node's link, in the codec
    wire_cost = ModelCost(L, cost.block_bytes, int(hidden_bytes), cost.block_activation_bytes)
    part = partition(stage_nodes, wire_cost, work.micro_batches)
    by_name = {n.name: n for n in nodes}

    stages = []
    for s in part.stages:
        n = by_name[s.name]
        blocks = s.end - s.start
        stages.append(StageReport(
            s.name, s.start, s.end,
            weight_bytes=int(blocks * block_params(config) * n.weight_bytes_per_value()),
            activation_bytes=int(blocks * cost.block_activation_bytes * DTYPE_BYTES[n.dtype] / FP32 * work.micro_batches),
            adapter_bytes=2 * FP32 * sum(values[s.start:s.end]),  # replica + its gradients
            fixed_bytes=FIXED_NODE_BYTES, memory_limit_bytes=n.memory_bytes,
            seconds_per_micro_batch=blocks * 2 * per_block_flops / n.flops))

    m = work.micro_batches
    hops = []
    names = ["edge"] + [s.name for s in stages]
    per_value = ADAPTER_CODEC_BYTES[work.adapter_codec]
    headers = list(work.adapter_tensors) or [0] * L
    for i, s in enumerate(stages):
        downstream = sum(values[s.start:])
        framing = TENSOR_HEADER_BYTES * sum(headers[s.start:])
        down = int(downstream * per_value + framing + 2 * m * hidden_bytes)
        returned = 2 if i > 0 or work.input_grads else 1  # hidden states, and their gradients where wanted
        up = int(downstream * per_value + framing + returned * m * hidden_bytes)
        link = (edge.link or default_link) if i == 0 else links[s.name]
        hops.append(HopReport(names[i], names[i + 1], str(link), down, up, max(down, up) / link.bytes_per_s))

    head_flops = edge_head_flops(config, work.batch_size, work.seq_len)
    edge_s = head_flops / edge.flops
    rates = [(edge.link or default_link).bytes_per_s] + [links[s.name].bytes_per_s for s in stages[1:]]
    adapter_s = max(per_value * sum(values[s.start:]) / rate for s, rate in zip(stages, rates))  # one way, cut-through
    activation_slot = max(2 * hidden_bytes / rate for rate in rates)  # a micro-batch's tensors over the slowest hop
    compute_slot = max(s.seconds_per_micro_batch for s in stages)
    slots = m + len(stages) - 1
    compute = slots * compute_slot + edge_s
    pipeline = slots * max(compute_slot, activation_slot) + edge_s
    bandwidth = 2 * adapter_s + max(0.0, pipeline - compute)
    rtts = [(edge.link or default_link).rtt_s] + [links[s.name].rtt_s for s in stages[1:]]
    latency = 3 * sum(rtts)
    step = 2 * adapter_s + pipeline + latency
    bound = max((("compute", compute), ("bandwidth", bandwidth), ("latency", latency)), key=lambda kv: kv[1])[0]

    D, V = config.hidden_size, config.vocab_size
    table = V * D
    edge_memory = {
        "embeddings_and_head": FP32 * (table * (1 if config.tie_word_embeddings else 2) + D),
        "head_bf16_copy": 2 * table if edge.head_dtype == "bf16" else 0,
        "adapter_grads_adamw": 4 * FP32 * work.trainable_params,  # master, gradient, two moments
        "hidden_states": int(FP32 * 2 * work.batch_size * work.seq_len * D),  # outputs and their gradients
        "logits_chunk": FP32 * 2 * min(LOSS_CHUNK_TOKENS, tokens) * V,
    }
    fwd_per_token = L * block_flops(config, 1, work.seq_len) / work.seq_len + 2 * V * D
    notes = []
    if any(n.quantize != "none" for n in nodes):
        notes.append("quantized nodes: weights in their quantized size; activations in the node's dtype")
    return PlanReport(
        model=model_name, params=L * block_params(config) + table * (1 if config.tie_word_embeddings else 2) + D,
        batch_size=work.batch_size, seq_len=work.seq_len, micro_batches=m, codec=work.codec,
        trainable_params=work.trainable_params, flops_per_token_forward=fwd_per_token,
        flops_per_token_train=2 * fwd_per_token, stages=stages, hops=hops, edge_memory=edge_memory,
        compute_s=compute, bandwidth_s=bandwidth, latency_s=latency, step_s=step, bound=bound,
        tokens_per_s=work.batch_size * work.seq_len / step, notes=notes, route_rtt_s=sum(rtts))


def _human_rate(bits: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_plan(r: PlanReport) -> str:
    """The report as text tables."""
    out = [f"plan: {r.model} ({r.params / 1e9:.2f}B parameters), batch {r.batch_size} x {r.seq_len} tokens in "
           f"{r.micro_batches} micro-batch(es), codec {r.codec}; adapter {r.trainable_params:,} trainable values",
           f"work: {r.flops_per_token_forward / 1e9:.2f} GFLOP per token forward, "
           f"{r.flops_per_token_train / 1e9:.2f} GFLOP per token training (frozen blocks: forward + backward to the inputs)",
           "", "stage     blocks      weights    activations  adapter     total       of limit   s/micro-batch"]
    for s in r.stages:
        out.append(f"{s.name:9} [{s.start:>3}, {s.end:>3})  {_size(s.weight_bytes):>10}  {_size(s.activation_bytes):>10}  "
                   f"{_size(s.adapter_bytes):>10}  {_size(s.memory_bytes):>10}  {s.memory_bytes / s.memory_limit_bytes:8.0%}  "
                   f"{s.seconds_per_micro_batch:10.4f}")
    out += ["", "edge memory: " + ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in r.edge_memory.items() if v)
            + f"; total {_size(sum(r.edge_memory.values()))}",
            "", "hop              link                     down/step    up/step     transfer s"]
    for h in r.hops:
        out.append(f"{h.src + ' -> ' + h.dst:16} {h.link:24} {_size(h.down_bytes):>10}  {_size(h.up_bytes):>10}  {h.seconds:10.3f}")
    out += ["", f"step: compute {r.compute_s:.3f} s, transfers not hidden by compute {r.bandwidth_s:.3f} s, "
                f"latency {r.latency_s:.3f} s -> predicted {r.step_s:.3f} s a step ({r.tokens_per_s:,.0f} tokens/s), "
                f"bound by {r.bound}"]
    out += [f"note: {n}" for n in r.notes]
    return "\n".join(out)


def auto_micro_batches(config: BlockShapes, model_name: str, nodes: list[PlanNode], edge: EdgeSpec, work: Workload,
                       default_link: Link) -> int:
    """What finetune's `--micro-batches 0` would choose on these nodes: `choose_micro_batches` with the
    plan's partition, its stages' speeds for the profiles and its links' round trips for the measured one."""
    whole = plan(config, model_name, nodes, edge, replace(work, micro_batches=1), default_link)
    stage_forward_s = max(s.seconds_per_micro_batch for s in whole.stages) / 2  # forward + backward to the inputs
    return choose_micro_batches(work.batch_size, len(whole.stages), whole.route_rtt_s, stage_forward_s)


def choose_micro_batches(batch_size: int, stages: int, route_rtt_s: float, stage_forward_s: float | None) -> int:
    """Micro-batches for a step when the user gave none: enough to hide the route's round trip.

    The edge sends a step's forwards at once; the backward of micro-batch 0 reaches the last
    stage one route round trip (plus the edge's loss) after that stage finished its forward.
    Meanwhile it has the other m - 1 forwards to run, (m - 1) / m of the batch's forward time,
    so the smallest m with (m - 1) / m x stage_forward_s >= route_rtt_s leaves it no idle wait;
    at least one per stage (fewer leaves a stage idle all step), at most one row each, and a
    divisor of the batch (micro-batches of equal size). Without the stages' speed
    (`stage_forward_s` None: no profile) only the per-stage floor is known.
    """
    if batch_size <= 0 or stages <= 0:
        raise ConfigError(f"micro-batches: batch size {batch_size} and stages {stages} must be positive")
    counts = [m for m in range(min(batch_size, stages), batch_size + 1) if batch_size % m == 0]
    if not stage_forward_s or stage_forward_s <= 0:
        return counts[0]
    return next((m for m in counts if (m - 1) / m * stage_forward_s >= route_rtt_s), batch_size)
