"""Split a model's blocks into contiguous ranges across heterogeneous nodes.

The route is a pipeline: the edge sends hidden states to the first node, which
runs blocks [0, k1), the next runs [k1, k2), ... and the last node's output
returns to the edge; gradients travel the same hops backwards.

Cost model (per micro-batch, the unit of work that flows through the pipe):

    stage time = blocks * block_time_s + 4 * activation_bytes / bandwidth

Every used node has one input hop and one output hop, and each hop carries the
hidden state forward and its gradient back (2 tensors per hop, 4 per node),
all over that node's own link. The pipeline's throughput is set by its slowest
stage, so the partition minimises the bottleneck (max stage time), then the
sum of stage times, then the number of nodes used (an extra node with equal
times only adds a hop and a failure point), and finally gives more blocks to
nodes earlier in the route (which is sorted by name: deterministic).

Memory: a node holding n blocks needs
    fixed_bytes + n * (block_bytes * weight_scale + block_activation_bytes * activation_scale * micro_batches)
because GPipe keeps every in-flight micro-batch's activations until backward. ModelCost is in
fp32 bytes; a node's scales say what fraction of them its blocks take (0.5 and 0.5 for a bf16
node), so a node that holds its blocks in fewer bytes gets proportionally more of them.

Example:
    >>> nodes = [StageNode("fast", 8 << 30, 0.01, 1e9), StageNode("slow", 8 << 30, 0.02, 1e9)]
    >>> p = partition(nodes, ModelCost(num_layers=30, block_bytes=1 << 20, activation_bytes=0))
    >>> [(s.name, s.start, s.end) for s in p.stages]
    [('fast', 0, 20), ('slow', 20, 30)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.runtime.errors import PartitionError

HOPS_PER_STAGE = 2  # input hop + output hop
TENSORS_PER_HOP = 2  # hidden state forward + its gradient backward
TIE_RTOL = 1e-9  # stage times this close (relative) count as equal


def format_bytes(n: float) -> str:
    """Human-readable size in binary units: 512 B, 3.5 KiB, 180 MiB, 1.2 GiB."""
    value, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, next_unit
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class StageNode:
    """One worker as the partitioner sees it.

    memory_bytes: usable memory for weights + activations (GPU or RAM).
    block_time_s: measured forward + backward seconds of ONE block of this
        model's shape on this node, per micro-batch.
    bandwidth_bytes_per_s: this node's link estimate (inf: co-located).
    fixed_bytes: runtime overhead held regardless of blocks.
    weight_scale, activation_scale: the fraction of ModelCost's (fp32) weight and
        saved-activation bytes this node's blocks take (0.5 for bf16).
    """

    name: str
    memory_bytes: int
    block_time_s: float
    bandwidth_bytes_per_s: float
    fixed_bytes: int = 0
    weight_scale: float = 1.0
    activation_scale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append(f"name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.memory_bytes) or self.memory_bytes < 0:
            problems.append(f"memory_bytes must be an int >= 0, got {self.memory_bytes!r}")
        if not _is_int(self.fixed_bytes) or self.fixed_bytes < 0:
            problems.append(f"fixed_bytes must be an int >= 0, got {self.fixed_bytes!r}")
        if not _is_number(self.block_time_s) or not 0 < self.block_time_s < math.inf:
            problems.append(f"block_time_s must be a finite number > 0, got {self.block_time_s!r}")
        if not _is_number(self.bandwidth_bytes_per_s) or self.bandwidth_bytes_per_s <= 0:
            problems.append(f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s!r}")
        for key in ("weight_scale", "activation_scale"):
            value = getattr(self, key)
            if not _is_number(value) or not 0 < value < math.inf:
                problems.append(f"{key} must be a finite number > 0, got {value!r}")
        if problems:
            raise PartitionError(f"node {self.name!r}: " + "; ".join(problems)
                                 + " (re-profile the node)")


@dataclass(frozen=True)
class ModelCost:
    """The model's sizes as the partitioner sees them.

    block_bytes: one block's weights.
    activation_bytes: one hidden-state tensor crossing a hop (B, T, D) * dtype size.
    block_activation_bytes: what one block keeps for backward per micro-batch.
    """

    num_layers: int
    block_bytes: int
    activation_bytes: int
    block_activation_bytes: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.num_layers) or self.num_layers < 1:
            problems.append(f"num_layers must be an int >= 1, got {self.num_layers!r}")
        for key in ("block_bytes", "activation_bytes", "block_activation_bytes"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                problems.append(f"{key} must be an int >= 0, got {value!r}")
        if problems:
            raise PartitionError("model cost: " + "; ".join(problems))

    def bytes_per_block(self, micro_batches: int) -> int:
        """Memory one held block needs with `micro_batches` in flight."""
        return self.block_bytes + self.block_activation_bytes * micro_batches


@dataclass(frozen=True)
class Stage:
    """Node `name` runs blocks [start, end): `time_s` per micro-batch, `memory_bytes` held."""

    name: str
    start: int
    end: int
    time_s: float
    memory_bytes: int

    @property
    def blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Partition:
    """Stages in route order covering [0, num_layers) exactly; only nodes with >= 1 block.

    skipped: (name, reason) for nodes that cannot hold a single block.
    """

    stages: tuple[Stage, ...]
    bottleneck_s: float
    total_s: float
    skipped: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.stages:
            raise PartitionError("a partition needs at least one stage")
        expected = 0
        for stage in self.stages:
            if stage.start != expected or stage.end <= stage.start:
                raise PartitionError(f"stages must be contiguous and non-empty from block 0; "
                                     f"{stage.name} has [{stage.start}, {stage.end}) "
                                     f"where block {expected} was expected next")
            expected = stage.end

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    def describe(self) -> str:
        """One line per stage, then the bottleneck and any skipped nodes."""
        width = max(len(s.name) for s in self.stages)
        lines = [f"{s.name:<{width}}  blocks [{s.start}, {s.end})  {s.blocks} blocks  "
                 f"{s.time_s:.3g} s/micro-batch  {format_bytes(s.memory_bytes)}"
                 for s in self.stages]
        lines.append(f"bottleneck {self.bottleneck_s:.3g} s/micro-batch, "
                     f"sum of stages {self.total_s:.3g} s, {len(self.stages)} nodes")
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def stage_time(node: StageNode, model: ModelCost, blocks: int) -> float:
    """Seconds per micro-batch for `node` running `blocks` blocks (>= 1), hops included."""
    hop_bytes = HOPS_PER_STAGE * TENSORS_PER_HOP * model.activation_bytes
    return blocks * node.block_time_s + hop_bytes / node.bandwidth_bytes_per_s


def node_bytes_per_block(node: StageNode, model: ModelCost, micro_batches: int) -> int:
    """Memory one block held by `node` needs with `micro_batches` in flight, in its own precision."""
    return (math.ceil(model.block_bytes * node.weight_scale)
            + math.ceil(model.block_activation_bytes * node.activation_scale) * micro_batches)


def _capacity(node: StageNode, model: ModelCost, micro_batches: int) -> int:
    """How many blocks (at most num_layers) fit in the node's memory."""
    usable = node.memory_bytes - node.fixed_bytes
    per_block = node_bytes_per_block(node, model, micro_batches)
    if usable < 0:
        return 0
    if per_block == 0:
        return model.num_layers
    return min(model.num_layers, usable // per_block)


def _skip_reason(node: StageNode, model: ModelCost, micro_batches: int) -> str:
    usable = max(0, node.memory_bytes - node.fixed_bytes)
    reason = (f"{format_bytes(usable)} usable < "
              f"{format_bytes(node_bytes_per_block(node, model, micro_batches))} for one block")
    if node.fixed_bytes:
        reason += (f" ({format_bytes(node.memory_bytes)} memory - "
                   f"{format_bytes(node.fixed_bytes)} fixed)")
    return reason


def _check_inputs(route: list[StageNode], micro_batches: int) -> None:
    if not route:
        raise PartitionError("no nodes to partition the model over; start at least one "
                             "`edgetune node` and let it join the cluster")
    if not _is_int(micro_batches) or micro_batches < 1:
        raise PartitionError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    names = [node.name for node in route]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PartitionError(f"node names must be unique; repeated: {', '.join(duplicates)}")


def _check_capacity(route: list[StageNode], model: ModelCost, micro_batches: int,
                    caps: list[int], skipped: list[tuple[str, str]]) -> None:
    """Raise when the usable nodes together cannot hold every block."""
    held = sum(caps)
    if held >= model.num_layers:
        return
    per_block = min(node_bytes_per_block(node, model, micro_batches) for node in route)
    missing = (model.num_layers - held) * per_block
    message = (f"the cluster can hold {held} of {model.num_layers} blocks "
               f"({format_bytes(per_block)} each at the least, with {micro_batches} micro-batch(es) in "
               f"flight): {format_bytes(missing)} missing; add a node or raise a node's "
               f"memory limit")
    if skipped:
        message += "; too small for one block: " + "; ".join(
            f"{name}: {reason}" for name, reason in skipped)
    raise PartitionError(message)


def _min_bottleneck(times: list[list[float]], num_layers: int) -> float:
    """Smallest achievable max stage time (suffix DP over the route).

    times[i][b]: stage time of route node i holding b blocks, b = 1..capacity
    (index 0 unused). after[j]: best bottleneck for blocks [j, L) on the nodes
    after the current one; after[L] = 0 (nothing left, no stage).
    """
    after = [math.inf] * (num_layers + 1)
    after[num_layers] = 0.0
    for node_times in reversed(times):
        here = after[:]  # b = 0: this node is unused
        for j in range(num_layers):
            for b in range(1, min(len(node_times) - 1, num_layers - j) + 1):
                value = max(node_times[b], after[j + b])
                if value < here[j]:
                    here[j] = value
        after = here
    return after[0]


def _better(total: float, count: int, best_total: float, best_count: int) -> bool:
    """(total, count) lexicographically smaller, totals within TIE_RTOL tied."""
    if total == math.inf:
        return False
    if not math.isclose(total, best_total, rel_tol=TIE_RTOL):
        return total < best_total
    return count < best_count


def _choose_blocks(times: list[list[float]], num_layers: int, limit: float) -> list[int]:
    """Blocks per route node with every stage <= limit, minimising (sum, nodes used).

    Suffix DP; per start block j it tries b from large to small and keeps only
    strict improvements, so ties give more blocks to earlier nodes.
    """
    after_total = [math.inf] * (num_layers + 1)
    after_total[num_layers] = 0.0
    after_count = [0] * (num_layers + 1)
    choices: list[list[int]] = []
    for node_times in reversed(times):
        top = max((b for b in range(1, len(node_times)) if node_times[b] <= limit), default=0)
        total, count = [math.inf] * (num_layers + 1), [0] * (num_layers + 1)
        choice = [0] * (num_layers + 1)
        for j in range(num_layers + 1):
            for b in range(min(top, num_layers - j), -1, -1):
                cand_total = after_total[j + b] + (node_times[b] if b else 0.0)
                cand_count = after_count[j + b] + (1 if b else 0)
                if _better(cand_total, cand_count, total[j], count[j]):
                    total[j], count[j], choice[j] = cand_total, cand_count, b
        after_total, after_count = total, count
        choices.append(choice)
    choices.reverse()
    blocks, j = [], 0
    for choice in choices:
        blocks.append(choice[j])
        j += choice[j]
    if j != num_layers:  # unreachable: limit is an achievable bottleneck
        raise PartitionError(f"internal error: partition covers {j} of {num_layers} blocks")
    return blocks


def partition_route(route: list[StageNode] | tuple[StageNode, ...], model: ModelCost,
                    micro_batches: int = 1) -> Partition:
    """Best partition with the nodes visited in the given route order.

    A node may get zero blocks (it is then left out of the stages); nodes that
    cannot hold one block are listed in `Partition.skipped`. Raises
    PartitionError when there are no nodes or the cluster lacks memory.
    Cost: O(N * L^2).
    """
    route = list(route)
    _check_inputs(route, micro_batches)
    caps = [_capacity(node, model, micro_batches) for node in route]
    skipped = [(node.name, _skip_reason(node, model, micro_batches))
               for node, cap in zip(route, caps) if cap < 1]
    _check_capacity(route, model, micro_batches, caps, skipped)

    times = [[0.0] + [stage_time(node, model, b) for b in range(1, cap + 1)]
             for node, cap in zip(route, caps)]
    bottleneck = _min_bottleneck(times, model.num_layers)
    blocks = _choose_blocks(times, model.num_layers, bottleneck * (1 + TIE_RTOL))

    stages, start = [], 0
    for node, node_times, n in zip(route, times, blocks):
        if n:
            stages.append(Stage(node.name, start, start + n, node_times[n],
                                node.fixed_bytes + n * node_bytes_per_block(node, model, micro_batches)))
            start += n
    return Partition(stages=tuple(stages), bottleneck_s=max(s.time_s for s in stages),
                     total_s=sum(s.time_s for s in stages), skipped=tuple(skipped))


def partition(nodes: list[StageNode] | tuple[StageNode, ...], model: ModelCost,
              micro_batches: int = 1) -> Partition:
    """Best partition of `model` over `nodes`, routed in name order.

    Under this cost model the route order does not change any stage time
    (each used node pays its own two hops whatever its position), and any
    block counts can be laid out contiguously in any order, so one DP over
    one order is optimal over all orders; sorting by name makes the result
    independent of the order the cluster listed its nodes in.
    """
    return partition_route(sorted(nodes, key=lambda node: node.name), model, micro_batches)
