"""The block partitioner against an independent brute force and hand-checked cases.

The reference cost model below is written from the spec (stage = blocks * block
time + 2 hops * 2 tensors * activation bytes / bandwidth; memory = fixed +
blocks * (block + block_activation * micro_batches)), not from the module.
"""
from __future__ import annotations

import itertools
import math
import random
import re

import pytest

from edgetune.runtime.errors import EdgetuneError, PartitionError
from edgetune.runtime.plan.partition import (
    ModelCost,
    Partition,
    Stage,
    StageNode,
    partition,
    partition_route,
)

MiB = 1 << 20
GiB = 1 << 30
RTOL = 1e-9


# -- independent reference --------------------------------------------------------
def ref_time(node: StageNode, model: ModelCost, n: int) -> float:
    return n * node.block_time_s + 4 * model.activation_bytes / node.bandwidth_bytes_per_s


def ref_memory(node: StageNode, model: ModelCost, n: int, micro: int) -> int:
    return node.fixed_bytes + n * (model.block_bytes + model.block_activation_bytes * micro)


def ref_capacity(node: StageNode, model: ModelCost, micro: int) -> int:
    """Largest n <= L whose memory fits, by counting up (0 if none)."""
    n = 0
    while n < model.num_layers and ref_memory(node, model, n + 1, micro) <= node.memory_bytes:
        n += 1
    return n


def compositions(total: int, parts: int):
    """Every tuple of `parts` ints >= 0 summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first,) + rest


def brute_force(nodes, model, micro):
    """(bottleneck, total, used nodes) lexicographic optimum over all orders and splits, or None."""
    candidates = []
    for order in itertools.permutations(nodes):
        for counts in compositions(model.num_layers, len(order)):
            used = [(node, n) for node, n in zip(order, counts) if n]
            if any(ref_memory(node, model, n, micro) > node.memory_bytes for node, n in used):
                continue
            times = [ref_time(node, model, n) for node, n in used]
            candidates.append((max(times), sum(times), len(used)))
    if not candidates:
        return None
    best_b = min(c[0] for c in candidates)
    candidates = [c for c in candidates if c[0] <= best_b * (1 + RTOL)]
    best_t = min(c[1] for c in candidates)
    candidates = [c for c in candidates if c[1] <= best_t * (1 + RTOL)]
    return best_b, best_t, min(c[2] for c in candidates)


def check_valid(p: Partition, nodes, model, micro):
    """Covers [0, L) contiguously, memory fits, times and bytes match the reference."""
    by_name = {node.name: node for node in nodes}
    assert p.stages[0].start == 0 and p.stages[-1].end == model.num_layers
    for prev, nxt in zip(p.stages, p.stages[1:]):
        assert prev.end == nxt.start
    assert len({s.name for s in p.stages}) == len(p.stages)
    for s in p.stages:
        node, n = by_name[s.name], s.end - s.start
        assert n >= 1
        assert s.memory_bytes == ref_memory(node, model, n, micro) <= node.memory_bytes
        assert math.isclose(s.time_s, ref_time(node, model, n), rel_tol=1e-12)
    assert math.isclose(p.bottleneck_s, max(s.time_s for s in p.stages), rel_tol=1e-12)
    assert math.isclose(p.total_s, sum(s.time_s for s in p.stages), rel_tol=1e-12)


def random_case(rng: random.Random):
    """Small heterogeneous cluster; some nodes memory-limited, some unable to hold a block."""
    num_layers = rng.randint(1, 8)
    micro = rng.choice([1, 1, 2, 4])
    model = ModelCost(num_layers=num_layers, block_bytes=rng.choice([10, 100]) * MiB,
                      activation_bytes=rng.choice([0, 0, 1 * MiB, 8 * MiB, 64 * MiB]),
                      block_activation_bytes=rng.choice([0, 5 * MiB]))
    per_block = model.block_bytes + model.block_activation_bytes * micro
    nodes = []
    for i in range(rng.randint(1, 3)):
        cap = rng.choice([0, 1, 2, num_layers, num_layers, rng.randint(0, num_layers)])
        fixed = rng.choice([0, 50 * MiB])
        slack = rng.randrange(per_block)  # never enough for one more block
        nodes.append(StageNode(
            name=f"node-{'abc'[i]}",
            memory_bytes=fixed + cap * per_block + slack,
            # integers make exact ties common; floats make them rare
            block_time_s=rng.choice([0.5, 1.0, 2.0, rng.uniform(0.05, 3.0)]),
            bandwidth_bytes_per_s=rng.choice([100 * MiB, 1 * GiB, math.inf]),
            fixed_bytes=fixed))
    rng.shuffle(nodes)
    return nodes, model, micro


# -- optimality ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(400))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    nodes, model, micro = random_case(rng)
    expected = brute_force(nodes, model, micro)
    if expected is None:
        with pytest.raises(PartitionError, match="missing"):
            partition(nodes, model, micro)
        return
    p = partition(nodes, model, micro)
    check_valid(p, nodes, model, micro)
    assert math.isclose(p.bottleneck_s, expected[0], rel_tol=1e-9)
    assert math.isclose(p.total_s, expected[1], rel_tol=1e-9)
    assert len(p.stages) == expected[2]
    assert {name for name, _ in p.skipped} == {
        node.name for node in nodes if ref_capacity(node, model, micro) == 0}
    # a fixed route order reaches the same optimum (the cost ignores positions)
    q = partition_route(nodes, model, micro)
    check_valid(q, nodes, model, micro)
    assert [s.name for s in q.stages] == [n.name for n in nodes if n.name in
                                          {s.name for s in q.stages}]
    assert math.isclose(q.bottleneck_s, expected[0], rel_tol=1e-9)
    assert math.isclose(q.total_s, expected[1], rel_tol=1e-9)


def test_brute_force_cases_cover_the_interesting_kinds():
    """The random cases include infeasible ones, unused nodes and skipped nodes."""
    kinds = set()
    for seed in range(400):
        nodes, model, micro = random_case(random.Random(seed))
        if brute_force(nodes, model, micro) is None:
            kinds.add("infeasible")
            continue
        p = partition(nodes, model, micro)
        if p.skipped:
            kinds.add("skipped")
        if len(p.stages) + len(p.skipped) < len(nodes):
            kinds.add("unused")
        caps = {n.name: ref_capacity(n, model, micro) for n in nodes}
        if any(s.end - s.start == caps[s.name] < model.num_layers for s in p.stages):
            kinds.add("memory-bound")  # a node filled to its memory limit
    assert kinds == {"infeasible", "skipped", "unused", "memory-bound"}


def _threshold_optimum(nodes, model, micro):
    """Smallest bottleneck by a different algorithm: the least stage time B at which
    every node's largest block count with time <= B (and memory) sums to >= L."""
    caps = {n.name: ref_capacity(n, model, micro) for n in nodes}
    values = sorted(ref_time(n, model, k) for n in nodes for k in range(1, caps[n.name] + 1))
    for bound in values:
        held = sum(max((k for k in range(1, caps[n.name] + 1)
                        if ref_time(n, model, k) <= bound), default=0) for n in nodes)
        if held >= model.num_layers:
            return bound
    return None


@pytest.mark.parametrize("seed", range(5))
def test_large_cluster_matches_threshold_search(seed):
    rng = random.Random(1000 + seed)
    model = ModelCost(num_layers=rng.randint(100, 200), block_bytes=30 * MiB,
                      activation_bytes=2 * MiB, block_activation_bytes=MiB)
    nodes = [StageNode(f"n{i:02d}", rng.randint(1, 40) * 34 * MiB + 256 * MiB,
                       rng.uniform(0.01, 0.1), rng.choice([1e8, 1e9, 1e10]), 256 * MiB)
             for i in range(16)]
    p = partition(nodes, model, micro_batches=4)
    check_valid(p, nodes, model, 4)
    assert math.isclose(p.bottleneck_s, _threshold_optimum(nodes, model, 4), rel_tol=1e-9)


# -- shares and tie-breaks ----------------------------------------------------------
def test_twice_as_fast_node_gets_twice_the_blocks():
    model = ModelCost(num_layers=30, block_bytes=50 * MiB, activation_bytes=0)
    nodes = [StageNode("slow", 8 * GiB, 0.2, 1e9), StageNode("fast", 8 * GiB, 0.1, 1e9)]
    p = partition(nodes, model)
    assert {s.name: s.end - s.start for s in p.stages} == {"fast": 20, "slow": 10}
    assert math.isclose(p.bottleneck_s, 2.0)


def test_three_speeds_get_proportional_shares_with_small_transfers():
    model = ModelCost(num_layers=28, block_bytes=50 * MiB, activation_bytes=MiB)
    nodes = [StageNode("a", 8 * GiB, 0.1, 10 * GiB), StageNode("b", 8 * GiB, 0.2, 10 * GiB),
             StageNode("c", 8 * GiB, 0.4, 10 * GiB)]
    shares = {s.name: s.end - s.start for s in partition(nodes, model).stages}
    assert shares == {"a": 16, "b": 8, "c": 4}  # hop time 0.4 ms << one block


def test_slow_node_gets_zero_blocks_when_it_would_be_the_bottleneck():
    model = ModelCost(num_layers=4, block_bytes=MiB, activation_bytes=0)
    nodes = [StageNode("a", GiB, 1.0, 1e9), StageNode("b", GiB, 1.0, 1e9),
             StageNode("turtle", GiB, 10.0, 1e9)]
    p = partition(nodes, model)
    assert [(s.name, s.start, s.end) for s in p.stages] == [("a", 0, 2), ("b", 2, 4)]
    assert p.skipped == ()


def test_slow_link_keeps_a_node_out_of_the_route():
    # node "far" computes fast but each of its 4 tensor transfers takes 1 s
    model = ModelCost(num_layers=4, block_bytes=MiB, activation_bytes=100 * MiB)
    nodes = [StageNode("near", GiB, 0.1, math.inf), StageNode("far", GiB, 0.01, 100 * MiB)]
    p = partition(nodes, model)
    assert [s.name for s in p.stages] == ["near"]
    assert math.isclose(p.bottleneck_s, 0.4)


def test_ties_prefer_fewer_nodes_then_earlier_names():
    # every split with max 2 blocks per node ties on bottleneck and sum of times
    model = ModelCost(num_layers=4, block_bytes=100 * MiB, activation_bytes=0)
    nodes = [StageNode(name, 250 * MiB, 1.0, 1e9) for name in ("c", "a", "b")]
    p = partition(nodes, model)
    assert [(s.name, s.start, s.end) for s in p.stages] == [("a", 0, 2), ("b", 2, 4)]


def test_result_does_not_depend_on_input_order():
    nodes, model, micro = random_case(random.Random(7))
    nodes = nodes + [StageNode("node-d", 4 * GiB, 0.5, 1e9), StageNode("node-e", 4 * GiB, 0.5, 1e9)]
    first = partition(nodes, model, micro)
    for order in itertools.permutations(nodes):
        assert partition(list(order), model, micro) == first


# -- memory -------------------------------------------------------------------------
def test_memory_limits_bound_the_fast_node():
    # fast would take 20 of 30 by speed, but holds only 12 blocks (+ fixed overhead)
    model = ModelCost(num_layers=30, block_bytes=40 * MiB, activation_bytes=0,
                      block_activation_bytes=5 * MiB)
    per_block = 40 * MiB + 5 * MiB * 2
    nodes = [StageNode("fast", 300 * MiB + 12 * per_block + per_block - 1, 0.1, 1e9, 300 * MiB),
             StageNode("slow", 64 * GiB, 0.2, 1e9)]
    p = partition(nodes, model, micro_batches=2)
    check_valid(p, nodes, model, 2)
    assert {s.name: s.end - s.start for s in p.stages} == {"fast": 12, "slow": 18}
    fast = next(s for s in p.stages if s.name == "fast")
    assert fast.memory_bytes == 300 * MiB + 12 * per_block


def test_more_micro_batches_in_flight_need_more_memory():
    model = ModelCost(num_layers=10, block_bytes=10 * MiB, activation_bytes=0,
                      block_activation_bytes=10 * MiB)
    nodes = [StageNode("a", 200 * MiB, 0.1, 1e9)]
    assert partition(nodes, model, micro_batches=1).stages[0].end == 10  # 10 x 20 MiB
    with pytest.raises(PartitionError, match="can hold 6 of 10 blocks"):
        partition(nodes, model, micro_batches=2)  # 30 MiB per block: 6 fit


# -- errors ---------------------------------------------------------------------------
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": GiB}


def _amount(text: str, before: str) -> tuple[float, str]:
    match = re.search(r"([\d.]+) (B|KiB|MiB|GiB) " + before, text)
    assert match, f"no '<size> {before}' in {text!r}"
    return float(match.group(1)), match.group(2)


def _assert_size(shown: tuple[float, str], expected_bytes: int):
    value, unit = shown
    exact = expected_bytes / UNITS[unit]
    assert 1 <= exact < 1024 or unit == "B"  # the largest unit that keeps the number >= 1
    assert abs(value - exact) <= (0.05 if exact < 10 else 0.5), (shown, expected_bytes)


def test_not_enough_memory_says_how_much_is_missing():
    model = ModelCost(num_layers=30, block_bytes=100 * MiB, activation_bytes=MiB)
    nodes = [StageNode("a", 1000 * MiB, 0.1, 1e9), StageNode("b", 850 * MiB, 0.1, 1e9, 50 * MiB)]
    held = 1000 * MiB // (100 * MiB) + (850 - 50) * MiB // (100 * MiB)  # 10 + 8
    with pytest.raises(PartitionError) as err:
        partition(nodes, model)
    message = str(err.value)
    assert f"can hold {held} of 30 blocks" in message
    _assert_size(_amount(message, "missing"), (30 - held) * 100 * MiB)  # 1.2 GiB
    assert "add a node" in message
    assert isinstance(err.value, EdgetuneError)


def test_missing_memory_counts_in_flight_activations():
    model = ModelCost(num_layers=8, block_bytes=30 * MiB, activation_bytes=0,
                      block_activation_bytes=10 * MiB)
    nodes = [StageNode("a", 500 * MiB, 0.1, 1e9)]
    per_block = 30 * MiB + 4 * 10 * MiB
    with pytest.raises(PartitionError) as err:
        partition(nodes, model, micro_batches=4)
    held = 500 * MiB // per_block
    assert f"can hold {held} of 8 blocks" in str(err.value)
    _assert_size(_amount(str(err.value), "missing"), (8 - held) * per_block)


def test_node_too_small_for_one_block_is_skipped_and_named():
    model = ModelCost(num_layers=6, block_bytes=150 * MiB, activation_bytes=0,
                      block_activation_bytes=30 * MiB)
    nodes = [StageNode("node-a", 8 * GiB, 0.1, 1e9),
             StageNode("node-b", 164 * MiB, 0.01, 1e9, 64 * MiB)]
    p = partition(nodes, model)
    assert [s.name for s in p.stages] == ["node-a"]
    ((name, reason),) = p.skipped
    assert name == "node-b"
    _assert_size(_amount(reason, "usable"), 100 * MiB)
    _assert_size(_amount(reason, "for one block"), 180 * MiB)
    assert "skipped node-b" in p.describe()


def test_only_node_too_small_is_an_error_naming_it():
    model = ModelCost(num_layers=6, block_bytes=180 * MiB, activation_bytes=0)
    with pytest.raises(PartitionError, match=r"can hold 0 of 6 blocks.*node-b: 100 MiB usable"):
        partition([StageNode("node-b", 100 * MiB, 0.1, 1e9)], model)


def test_no_nodes():
    with pytest.raises(PartitionError, match="no nodes"):
        partition([], ModelCost(num_layers=2, block_bytes=1, activation_bytes=1))


def test_invalid_node_reports_every_problem_at_once():
    with pytest.raises(PartitionError) as err:
        StageNode("x", -1, 0.0, -5.0, fixed_bytes=2.5)
    message = str(err.value)
    for key in ("memory_bytes", "block_time_s", "bandwidth_bytes_per_s", "fixed_bytes", "'x'"):
        assert key in message


@pytest.mark.parametrize("kwargs", [
    dict(block_time_s=float("nan")), dict(block_time_s=math.inf), dict(block_time_s=-1.0),
    dict(bandwidth_bytes_per_s=0), dict(bandwidth_bytes_per_s=float("nan")),
    dict(memory_bytes=True), dict(name=""),
])
def test_invalid_node_fields(kwargs):
    fields = dict(name="n", memory_bytes=GiB, block_time_s=0.1, bandwidth_bytes_per_s=1e9)
    with pytest.raises(PartitionError):
        StageNode(**{**fields, **kwargs})


def test_invalid_model_and_call_arguments():
    with pytest.raises(PartitionError) as err:
        ModelCost(num_layers=0, block_bytes=-1, activation_bytes=1.5)
    for key in ("num_layers", "block_bytes", "activation_bytes"):
        assert key in str(err.value)
    model = ModelCost(num_layers=2, block_bytes=1, activation_bytes=1)
    node = StageNode("n", GiB, 0.1, 1e9)
    with pytest.raises(PartitionError, match="micro_batches"):
        partition([node], model, micro_batches=0)
    with pytest.raises(PartitionError, match="unique.*n"):
        partition([node, StageNode("n", GiB, 0.2, 1e9)], model)


def test_partition_rejects_gaps_and_empty_stages():
    with pytest.raises(PartitionError, match="contiguous"):
        Partition(stages=(Stage("a", 0, 2, 1.0, 1), Stage("b", 3, 4, 1.0, 1)),
                  bottleneck_s=1.0, total_s=2.0)
    with pytest.raises(PartitionError):
        Partition(stages=(), bottleneck_s=0.0, total_s=0.0)


# -- describe ------------------------------------------------------------------------
def test_describe_lists_each_stage():
    model = ModelCost(num_layers=30, block_bytes=16 * MiB, activation_bytes=0)
    nodes = [StageNode("node-a", 8 * GiB, 0.05, 1e9, 192 * MiB),
             StageNode("node-bb", 8 * GiB, 0.1, 1e9)]
    lines = partition(nodes, model).describe().splitlines()
    assert re.fullmatch(r"node-a +blocks \[0, 20\) +20 blocks +1 s/micro-batch +512 MiB", lines[0])
    assert re.fullmatch(r"node-bb +blocks \[20, 30\) +10 blocks +1 s/micro-batch +160 MiB",
                        lines[1])
    assert lines[0].index("blocks") == lines[1].index("blocks")  # names padded to align
    assert "bottleneck 1 s" in lines[2]
