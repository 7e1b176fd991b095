"""finetune --verify: stages recomputed on verifier replicas (runtime/train/verify.py).

In-process nodes on loopback gRPC (tests/node_harness.py): a clean route verifies and trains
exactly as without --verify; a node that perturbs its outputs is caught, banned and routed
around, and the run's adapter equals a clean run's; the coordinator refuses --verify where the
cluster cannot hold a replica of every stage on another node.
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.runtime.train.verify import relative_error, tolerance, verified_micro_batches
from edgetune.runtime.wire import messages as wire
from edgetune.tests.node_harness import (
    adapter_tensors,
    add_node,
    assert_adapters_close,
    patch_connect,
    perturb_outputs,
    start_route,
)


def _cfg(folder, data, out, **kw):
    base = dict(model=str(folder), data=str(data), out=str(out), method="lora", rank=4, alpha=8.0, dropout=0.1,
                target_modules=("q_proj", "v_proj", "down_proj"), lr=5e-2, steps=6, batch_size=4, grad_accum=1,
                micro_batches=2, warmup_steps=1, max_seq_len=32, eval_fraction=0.0, save_every=0, progress=False,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


_adapter = adapter_tensors
_assert_same = assert_adapters_close


def _records(run):
    return [r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- the rules ---------------------------------------------------------------------------------
def test_tolerance_follows_the_coarser_precision_and_differing_quantization():
    assert tolerance("fp32", "none", "fp32", "none") == pytest.approx(1e-4)
    assert tolerance("fp32", "none", "bf16", "none") == tolerance("bf16", "none", "bf16", "none") == pytest.approx(0.15)
    assert tolerance("fp16", "none", "fp32", "none") == pytest.approx(3e-2)
    # the same scheme dequantizes to the same weights: only the dtype counts
    assert tolerance("fp32", "int8", "fp32", "int8") == pytest.approx(1e-4)
    assert tolerance("fp32", "int8", "fp32", "none") == pytest.approx(1e-4 + 0.15)
    assert tolerance("bf16", "nf4", "fp32", "int8") == pytest.approx(0.15 + 1.2)
    assert tolerance("bf16", "int8", "fp32", "none") == tolerance("fp32", "none", "bf16", "int8")  # symmetric
    with pytest.raises(ValueError, match="does not say its precision"):
        tolerance("", "none", "fp32", "none")


def test_relative_error_is_the_worst_tokens_and_catches_a_small_perturbation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 8, 16, generator=g)
    ref[0, 0] *= 1000  # an attention sink's huge hidden state sets no scale for the other tokens
    assert relative_error(ref.clone(), ref) == 0.0
    one_token = ref.clone()
    one_token[1, 5] += 1e-2 * ref[1, 5].norm() / 4  # one position off by 1e-2 of its norm
    assert relative_error(one_token, ref) == pytest.approx(1e-2 / 4 * 4, rel=0.5)
    noisy = ref + 1e-3 * ref.std() * torch.randn(ref.shape, generator=g)
    assert relative_error(noisy, ref) > tolerance("fp32", "none", "fp32", "none")
    assert relative_error(ref[:, :4], ref) == float("inf")  # another shape never agrees
    broken = ref.clone()
    broken[1, 2, 3] = float("nan")
    assert relative_error(broken, ref) == relative_error(ref, broken) == float("inf")  # NaN never passes
    assert relative_error(broken, broken) == 0.0  # ... unless both made it (an fp16 overflow, say)


def test_the_verified_micro_batches_are_a_seeded_fraction():
    picks = [verified_micro_batches(0.5, 3, step, 2) for step in range(200)]
    assert all(len(p) == 1 for p in picks)  # 0.5 x 2: exactly one a step
    assert picks == [verified_micro_batches(0.5, 3, step, 2) for step in range(200)]  # a replay checks the same
    assert picks != [verified_micro_batches(0.5, 4, step, 2) for step in range(200)]  # another seed, others
    tenth = [len(verified_micro_batches(0.1, 0, step, 2)) for step in range(2000)]
    assert set(tenth) == {0, 1} and 0.08 <= sum(tenth) / (2 * len(tenth)) <= 0.12
    assert verified_micro_batches(0.0, 0, 0, 8) == set() and verified_micro_batches(1.0, 0, 0, 3) == {0, 1, 2}


def test_the_wire_carries_echoes_exactly_and_what_each_hop_runs():
    from edgetune.proto.v1 import coordinator_pb2, node_pb2
    from edgetune.runtime.errors import WireError
    from edgetune.runtime.wire import serde

    hidden = torch.randn(2, 5, 8)
    forward = wire.Forward(3, 1, 7, True, (0, 3, 1), hidden, echo=True, recompute=True)
    got = list(serde.read_down(serde.down_frames(forward, codec="int8")))[0]
    assert (got.echo, got.recompute) == (True, True)
    # a stage output travels fp32 whatever the session's codec: a verifier compares it exactly
    echo = list(serde.read_up(serde.up_frames(wire.StageOutput(3, 1, "node-1", hidden), codec="int8")))[0]
    assert echo == wire.StageOutput(3, 1, "node-1", echo.hidden) and torch.equal(echo.hidden, hidden)
    hop = wire.Hop("node-1", "", 0, 2, "bf16", "nf4")
    assert serde.hop_from_pb(node_pb2.Hop.FromString(serde.hop_to_pb(hop).SerializeToString())) == hop
    with pytest.raises(WireError, match="expected a dtype in"):
        serde.hop_from_pb(node_pb2.Hop(name="n", start=0, end=1, dtype="fp8"))
    route = wire.Route("m", "f" * 64, [wire.Hop("a", "x:1", 0, 2)], 2, verifiers=[wire.Hop("b", "y:2", 0, 2)])
    pb = coordinator_pb2.Route.FromString(serde.route_to_pb(route).SerializeToString())
    assert serde.route_from_pb(pb) == route


def test_verify_is_a_fraction_and_needs_a_cluster(tmp_path):
    with pytest.raises(ValueError, match="verify must be a fraction"):
        TrainConfig(data="d.jsonl", coordinator="h:1", verify=1.5)
    with pytest.raises(ValueError, match="needs --coordinator"):
        TrainConfig(data="d.jsonl", verify=0.1)


# -- in-process routes ---------------------------------------------------------------------------
@pytest.fixture()
def checked(tiny64, tmp_path):
    local = start_route(tiny64, [1], tmp_path / "tok", verifiers=True)
    yield local
    local.stop()


def test_a_clean_route_verifies_and_trains_as_without_verify(tiny64, data_file, checked, tmp_path, monkeypatch, caplog):
    """--verify 0.5 on honest nodes: every step recomputes one micro-batch on the replicas, nothing is
    banned or replayed, and the adapter equals the run without --verify (the echoes and recomputations
    change nothing the route computes)."""
    client = patch_connect(monkeypatch, checked)
    kw = dict(coordinator="fake:1", token_file=str(checked.token_file))
    plain = finetune(_cfg(tiny64, data_file, tmp_path / "plain", **kw))
    with caplog.at_level(logging.INFO, logger="edgetune"):
        verified = finetune(_cfg(tiny64, data_file, tmp_path / "verified", verify=0.5, **kw))
    assert not [r for r in caplog.records if "disagrees" in r.getMessage() or "replaying" in r.getMessage()]
    assert client.calls == 0  # never asked for another route
    _assert_same(_adapter(plain.out), _adapter(verified.out), 1e-5)
    records = _records(verified)
    assert [r["verified"] for r in records] == [1] * 6
    assert all(0 < r["verify_error_ratio"] < 1e-2 or r["verify_error_ratio"] == 0 for r in records)
    # the replicas' traffic counts in the edge's link bytes: more than without --verify
    assert records[-1]["bytes_sent"] > _records(plain)[-1]["bytes_sent"]


@pytest.mark.parametrize("options", [dict(codec="int8", adapter_codec="int8"),
                                     dict(method="prefix", num_virtual_tokens=3)], ids=["lossy-codecs", "prefix"])
def test_verifiers_get_exactly_what_the_stages_got(options, tiny64, data_file, checked, tmp_path, monkeypatch, caplog):
    """int8 activations and adapter deltas: a verifier gets the stage's input through the codec and the
    replica the deltas built, so honest nodes agree to the bit; prefix tuning's virtual tokens too."""
    patch_connect(monkeypatch, checked)
    with caplog.at_level(logging.WARNING, logger="edgetune"):
        run = finetune(_cfg(tiny64, data_file, tmp_path / "r", coordinator="fake:1", token_file=str(checked.token_file),
                            verify=1.0, steps=3, **options))
    assert not [r for r in caplog.records if "disagrees" in r.getMessage()]
    assert [(r["verified"], r["verify_error_ratio"]) for r in _records(run)] == [(2, 0.0)] * 3


@pytest.mark.parametrize("faulty", [1, 0])
def test_a_perturbing_node_is_caught_banned_and_routed_around(faulty, tiny64, data_file, checked, tmp_path, monkeypatch,
                                                              caplog):
    """node-`faulty` adds noise of 1e-3 x its output's std from step 2 on: the check of step 2 catches
    it (a warning names it), it is banned, the step replays on a route through a spare node serving the
    same blocks, and the run's adapter equals a clean run's -- which it would not, unverified."""
    route = checked.route
    start, end = route.hops[faulty].start, route.hops[faulty].end
    other = 1 - faulty  # the spare also hosts the other stage's replica (its node may not verify itself)
    spare = add_node(checked, tiny64, "node-2", start, end, previous="node-0" if faulty else "")
    spare_verifier = add_node(checked, tiny64, "node-2", route.hops[other].start, route.hops[other].end)
    hops, verifiers = list(route.hops), list(route.verifiers)
    hops[faulty], verifiers[other] = spare, spare_verifier
    client = patch_connect(monkeypatch, checked)
    client.alternatives = [wire.Route(route.model, route.fingerprint, hops, route.num_layers, route.manifest,
                                      verifiers=verifiers)]
    kw = dict(coordinator="fake:1", token_file=str(checked.token_file), steps=7)
    clean = finetune(_cfg(tiny64, data_file, tmp_path / "clean", verify=0.5, **kw))
    perturb_outputs(checked.shards[faulty], 1e-3, from_step=2)
    unverified = finetune(_cfg(tiny64, data_file, tmp_path / "unverified", **kw))
    with caplog.at_level(logging.WARNING, logger="edgetune"):
        caught = finetune(_cfg(tiny64, data_file, tmp_path / "caught", verify=0.5, **kw))
    disagreements = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
    assert len(disagreements) == 1, disagreements
    assert "step 2 micro-batch" in disagreements[0] and f"node node-{faulty} " in disagreements[0]
    assert f"banning node-{faulty} " in disagreements[0]
    assert client.requests[-1] == {"failed": [], "verify": True, "exclude": [f"node-{faulty}"]}
    assert caught.steps == 7
    _assert_same(_adapter(clean.out), _adapter(caught.out), 1e-5)
    with pytest.raises(AssertionError):  # the noise matters: unverified, it changes the adapter
        _assert_same(_adapter(clean.out), _adapter(unverified.out), 1e-5)
    assert [r["stages"][faulty]["node"] for r in _records(caught)] == [f"node-{faulty}"] * 2 + ["node-2"] * 5


def test_a_route_through_a_banned_node_is_refused(tiny64, checked):
    from edgetune.runtime.train.remote import check_bans

    check_bans(checked.route, {"node-7"})
    with pytest.raises(Exception, match="still uses node.s. node-1") as e:
        check_bans(checked.route, {"node-1"})
    assert e.value.code == "UNAVAILABLE"  # new_route asks again


def test_a_verifier_on_the_stages_own_node_is_refused(tiny64, data_file, checked, tmp_path, monkeypatch):
    checked.route.verifiers = list(reversed(checked.route.verifiers))  # each stage "verified" by itself
    patch_connect(monkeypatch, checked)
    with pytest.raises(Exception, match="no verifier replica of every stage on another node"):
        finetune(_cfg(tiny64, data_file, tmp_path / "r", coordinator="fake:1", token_file=str(checked.token_file),
                      verify=0.5, steps=1))


# -- the coordinator -----------------------------------------------------------------------------
def _placed(memory_blocks: dict[str, float], stages: list[tuple[str, int, int]], dtypes: dict[str, str] | None = None):
    """A Coordinator (no Ray) whose 4-block model is placed on `stages` [(node, start, end)]; each node
    profiled with room for `memory_blocks[node]` blocks (one micro-batch in flight) in fp32, or
    `dtypes[node]`. Shard actors are stand-ins. Returns (coordinator, live actors, bytes of a block)."""
    from edgetune.coordinator import core
    from edgetune.runtime.cluster.node_labels import NodeOptions
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.plan.cost import model_cost
    from edgetune.runtime.plan.partition import Stage
    from edgetune.runtime.security.access import Trust
    from edgetune.tests.tiny import tiny_hf_config

    config = ModelConfig.from_hf_dict(tiny_hf_config("llama", hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=4).to_dict())
    block = model_cost(config).bytes_per_block(1)
    info = core.ModelInfo("m", None, config, {}, [], "f" * 64)
    ray_nodes = {name: core.RayNode(f"id-{name}", "127.0.0.1", True, NodeOptions(name=name)) for name in memory_blocks}
    profiles = {f"id-{name}": SimpleNamespace(memory_bytes=int(blocks * block), fixed_bytes=0, dtype=(dtypes or {}).get(name, "fp32"),
                                              quantize="none", block_time_s=0.01, bandwidth_bytes_per_s=1e9)
                for name, blocks in memory_blocks.items()}
    coordinator = core.Coordinator(Trust.insecure("t"), "")
    coordinator.nodes = lambda: list(ray_nodes.values())
    coordinator._candidates = lambda: [n for n in ray_nodes.values() if not coordinator.banned_s(n.node_id)]
    coordinator._profile = lambda node, model_info: profiles[node.node_id]
    live = []

    class Actor:
        def __init__(self, node, stage):
            self.node, self.stage = node, stage
            live.append(self)

        def address(self):
            return f"{self.node.options.name}:{self.stage.start}"

        def ping(self):
            return True

        def shutdown(self):
            live.remove(self)

    coordinator._start_shard = lambda node, stage, model_info, previous, port=None: Actor(node, stage)
    placed = [(ray_nodes[n], Stage(n, s, e, 0.01, 0)) for n, s, e in stages]
    coordinator.state.placements["m"] = core.Placement(info, [(n, st, Actor(n, st)) for n, st in placed])
    return coordinator, live, block


def test_the_coordinator_places_a_replica_of_each_stage_on_another_node_with_room():
    # a and b hold their 2 blocks and have room for 2 more; c holds nothing: stage a's replica goes
    # to the node with the most room (c), stage b's to the roomiest left (a and b tie: a, by name)
    coordinator, live, _ = _placed({"a": 4, "b": 4, "c": 4}, [("a", 0, 2), ("b", 2, 4)])
    hops = coordinator._verifier_hops("m", [])
    assert [(h.name, h.start, h.end) for h in hops] == [("c", 0, 2), ("a", 2, 4)]
    assert len(live) == 4 and coordinator._verifier_hops("m", []) == hops  # placed once, then kept
    coordinator._drop("m")
    assert live == []  # dropped with their placement
    # a node running blocks as the stage's node does is preferred: its tolerance is the tightest
    coordinator, _, _ = _placed({"a": 4, "b": 4, "c": 4}, [("a", 0, 2), ("b", 2, 4)], dtypes={"c": "bf16"})
    assert [(h.name, h.start) for h in coordinator._verifier_hops("m", [])] == [("b", 0), ("a", 2)]


def test_an_excluded_node_is_banned_and_the_route_rebuilt_without_it():
    coordinator, live, _ = _placed({"a": 4, "b": 4, "c": 4}, [("a", 0, 2), ("b", 2, 4)])
    route = coordinator.serve_route("m", [], verify=True)  # GetRoute: the stages, and a replica of each
    assert [(h.name, h.start) for h in route.hops] == [("a", 0), ("b", 2)]
    assert [(h.name, h.start) for h in route.verifiers] == [("c", 0), ("a", 2)]
    assert not coordinator.serve_route("m", []).verifiers  # not asked for: none
    # c hosts a replica only: it is banned and the replicas are placed again without it
    route = coordinator.serve_route("m", [], verify=True, exclude=("c",))
    assert coordinator.banned_s("id-c") > 0 and "m" in coordinator.state.placements
    assert [(h.name, h.start) for h in route.verifiers] == [("b", 0), ("a", 2)]
    coordinator._exclude("m", {"b"})  # b runs a stage: the placement goes (the next route re-partitions)
    assert coordinator.banned_s("id-b") > 0 and "m" not in coordinator.state.placements and live == []


def test_the_coordinator_refuses_verify_when_no_other_node_can_hold_a_replica():
    from edgetune.runtime.errors import SessionError

    coordinator, live, _ = _placed({"a": 8}, [("a", 0, 4)])
    with pytest.raises(SessionError, match="only node a .serving blocks .0, 4..; add a node") as e:
        coordinator._verifier_hops("m", [])
    assert e.value.code == "FAILED_PRECONDITION" and len(live) == 1
    # room for one replica of 2 blocks besides their own: stage a's goes to c, stage b's fits nowhere
    coordinator, live, block = _placed({"a": 3, "b": 3, "c": 3}, [("a", 0, 2), ("b", 2, 4)])
    with pytest.raises(SessionError, match=r"no node other than b has room for a replica of its blocks \[2, 4\) "
                                           r"\(a has .* free, needs .*; c has .* free, needs") as e:
        coordinator._verifier_hops("m", [])
    assert e.value.code == "FAILED_PRECONDITION" and len(live) == 2  # nothing placed
