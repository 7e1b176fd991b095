"""The newer PEFT methods through edgetune's own training paths: resume, pushes, node checks.

Numerics against peft / independent references live in tests/test_peft_<method>.py; distributed ==
local for every method is in tests/test_distributed.py. Here: what a run keeps in its checkpoint
(sparse masks, AdaLoRA's allocator, VeRA's seed, UniPELT's gates), what crosses the wire each step,
and what a node refuses.
"""
from __future__ import annotations

import json

import pytest
import torch

from edgetune.runtime.errors import SessionError
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.runtime.wire import messages as wire
from edgetune.tests.node_harness import adapter_tensors, assert_adapters_close, patch_connect, start_route


def _cfg(folder, data, out, **kw):
    base = dict(model=str(folder), data=str(data), out=str(out), method="lora", rank=4, alpha=8.0, dropout=0.0,
                target_modules=("q_proj", "v_proj", "down_proj"), lr=5e-2, steps=6, batch_size=2, grad_accum=1,
                micro_batches=1, warmup_steps=1, max_seq_len=32, eval_fraction=0.0, save_every=0, progress=False,
                seed=5)
    base.update(kw)
    return TrainConfig(**base)


RESUMED = {
    "sparse_fisher": {"method": "sparse", "density": 0.05, "mask": "fisher", "calibration_examples": 3},
    "adalora": {"method": "adalora", "rank": 2, "init_rank": 4, "tinit": 1, "tfinal": 1},
    "vera": {"method": "vera", "rank": 16, "projection_seed": 7},
    "unipelt": {"method": "unipelt", "rank": 4, "num_virtual_tokens": 3, "bottleneck_size": 8,
                "target_modules": ("q_proj", "v_proj")},
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_continues_with_the_methods_state(name, tiny64, data_file, tmp_path):
    """Interrupted after step 3 and resumed: the same losses and adapter as one uninterrupted run, so
    the checkpoint held everything the method carries between steps (masks, the rank allocator's
    averages and masks, the seed of VeRA's projections, the gates)."""
    opts = RESUMED[name]
    whole = finetune(_cfg(tiny64, data_file, tmp_path / "whole", **opts))
    finetune(_cfg(tiny64, data_file, tmp_path / "cut", save_every=1, **opts), stop_after=3)
    resumed = finetune(_cfg(tiny64, data_file, tmp_path / "cut", save_every=1, resume=True, **opts))
    assert resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    assert_adapters_close(adapter_tensors(whole.out), adapter_tensors(resumed.out), 1e-6)


def test_adalora_ranks_shrink_and_are_logged(tiny64, data_file, tmp_path):
    result = finetune(_cfg(tiny64, data_file, tmp_path / "run", method="adalora", rank=2, init_rank=4, tinit=1,
                           tfinal=1, steps=6))
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all("regularizer" in r and r["regularizer"] > 0 for r in steps)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"]


def test_unipelt_gates_reach_metrics_locally_and_from_nodes(tiny64, data_file, tmp_path, monkeypatch):
    opts = RESUMED["unipelt"]
    local = finetune(_cfg(tiny64, data_file, tmp_path / "local", steps=2, **opts))
    route = start_route(tiny64, [1], tmp_path / "route")
    try:
        patch_connect(monkeypatch, route)
        remote = finetune(_cfg(tiny64, data_file, tmp_path / "remote", steps=2, coordinator="fake:1",
                               token_file=str(route.token_file), **opts))
    finally:
        route.stop()

    def gates(run):
        lines = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
        return [r["recorded"] for r in lines if "loss" in r]

    from edgetune.commands.report import write_report

    got_local, got_remote = gates(local), gates(remote)
    assert write_report(remote.out).gates_png.is_file()  # and `edgetune report` plots them
    assert len(got_local) == 2 and set(got_local[0]) == {f"gate.{kind}.{layer}" for kind in ("lora", "prefix", "adapter")
                                                         for layer in (0, 1)}
    for a, b in zip(got_local, got_remote):  # the nodes' gates, summed over both stages, equal the local ones
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 and 0 < a[key] < 1


def _pushes(monkeypatch):
    """Every AdapterPush the edge sends, in order."""
    from edgetune.runtime.train import remote

    sent = []
    original = remote.RouteStream.send

    def send(self, msg):
        if isinstance(msg, wire.AdapterPush):
            sent.append(msg)
        return original(self, msg)

    monkeypatch.setattr(remote.RouteStream, "send", send)
    return sent


def test_sparse_indices_cross_once_a_session_and_no_dense_delta_ever(tiny64, data_file, tmp_path, monkeypatch):
    route = start_route(tiny64, [1], tmp_path / "route")
    try:
        patch_connect(monkeypatch, route)
        pushes = _pushes(monkeypatch)
        finetune(_cfg(tiny64, data_file, tmp_path / "run", method="sparse", density=0.05, mask="magnitude", steps=3,
                      coordinator="fake:1", token_file=str(route.token_file)))
    finally:
        route.stop()
    by_version: dict[int, list] = {}
    for push in pushes:
        by_version.setdefault(push.version, []).append(push)
    first, *later = [by_version[v] for v in sorted(by_version)]
    indices = [k for p in first for k in p.tensors if k.endswith(".sparse_indices")]
    assert indices and all(p.tensors[k].dtype == torch.int64 for p in first for k in p.tensors if k in indices)
    for version in later:
        names = [k for p in version for k in p.tensors]
        assert names and all(k.endswith(".sparse_values") for k in names)
    for push in pushes:  # values only: k entries a weight, never an (out, in) matrix
        assert all(t.dim() == 1 for t in push.tensors.values())


def test_vera_pushes_only_its_scaling_vectors(tiny64, data_file, tmp_path, monkeypatch):
    route = start_route(tiny64, [1], tmp_path / "route")
    try:
        patch_connect(monkeypatch, route)
        pushes = _pushes(monkeypatch)
        finetune(_cfg(tiny64, data_file, tmp_path / "run", method="vera", rank=16, steps=2, coordinator="fake:1",
                      token_file=str(route.token_file)))
    finally:
        route.stop()
    assert all(k.rsplit(".", 1)[-1] in ("vera_lambda_d", "vera_lambda_b") for p in pushes for k in p.tensors)
    per_block = {}  # (version, block) -> values pushed
    for p in pushes:
        for key, t in p.tensors.items():
            block = (p.version, int(key.split(".")[1]))
            per_block[block] = per_block.get(block, 0) + t.numel()
    # per targeted module: lambda_d (r,) + lambda_b (out,); q (64), v (32 = 2 kv heads x 16), down (64)
    assert per_block and set(per_block.values()) == {3 * 16 + 64 + 32 + 64}


def test_a_node_refuses_other_constants(tiny64, tmp_path):
    """VeRA's projections are rebuilt on the node; an Open whose digest differs is refused before any push."""
    from edgetune.runtime.peft import VeraConfig
    from edgetune.runtime.peft.adapter import methods_to_json

    route = start_route(tiny64, [1], tmp_path / "route")
    try:
        shard = route.shards[0]
        methods = methods_to_json([VeraConfig(r=8, target_modules=("q_proj",))])
        hop = wire.Hop(shard.name, "", shard.start, shard.end)
        with pytest.raises(SessionError, match="other constants") as err:
            shard.open_session(wire.Open("s", shard.model, shard.fingerprint, [hop], methods_json=methods,
                                         constants_digest="0" * 64))
        assert err.value.code == "FAILED_PRECONDITION"
    finally:
        route.stop()


def test_masks_from_nodes_are_checked_before_any_is_written(tiny64):
    """What nodes send back as a mask must be k sorted, unique int64 positions inside its weight, for
    every targeted module; otherwise the edge refuses and keeps its adapter as it was."""
    from edgetune.runtime.errors import AdapterError
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import SparseConfig, attach_adapter
    from edgetune.runtime.peft.sparse import set_masks

    model = load_model(tiny64)
    adapter = attach_adapter(model, SparseConfig(density=0.01, target_modules=("q_proj",)))
    held = {layer: ts["self_attn.q_proj.sparse_indices"].clone() for layer, ts in adapter.block_tensors[0].items()}
    k = held[0].numel()
    good = {(layer, "self_attn.q_proj"): torch.arange(k, dtype=torch.int64) * 3 for layer in held}
    bad_cases = {
        "unsorted": torch.arange(k, dtype=torch.int64).flip(0),
        "repeated": torch.zeros(k, dtype=torch.int64),
        "outside the weight": torch.arange(k, dtype=torch.int64) + 64 * 64 - k + 1,
        "negative": torch.arange(k, dtype=torch.int64) - 1,
        "wrong count": torch.arange(k + 1, dtype=torch.int64),
        "float": torch.arange(k, dtype=torch.float32),
    }
    for why, indices in bad_cases.items():
        with pytest.raises(AdapterError, match="sorted, unique"):
            set_masks(adapter, 0, {**good, (1, "self_attn.q_proj"): indices})
        assert all(torch.equal(held[l], ts["self_attn.q_proj.sparse_indices"]) for l, ts in
                   adapter.block_tensors[0].items()), why
    with pytest.raises(AdapterError, match="no mask was chosen for layer 1"):
        set_masks(adapter, 0, {(0, "self_attn.q_proj"): good[(0, "self_attn.q_proj")]})
    set_masks(adapter, 0, good)
    assert torch.equal(adapter.block_tensors[0][1]["self_attn.q_proj.sparse_indices"], good[(1, "self_attn.q_proj")])


def test_a_node_refuses_hostile_sparse_pushes(tiny64, tmp_path):
    """Indices outside the weight, unsorted or repeated, floats where indices belong, integers where
    values belong, values without their indices, and indices sent as a delta are refused before the
    replica changes; the session goes on."""
    from edgetune.runtime.peft import SparseConfig
    from edgetune.runtime.peft.adapter import methods_to_json

    route = start_route(tiny64, [1], tmp_path / "route")
    try:
        shard = route.shards[0]
        hop = wire.Hop(shard.name, "", shard.start, shard.end)
        methods = methods_to_json([SparseConfig(density=0.01, mask="random", target_modules=("q_proj",))])
        session = shard.open_session(wire.Open("s", shard.model, shard.fingerprint, [hop], methods_json=methods))
        k = round(0.01 * 64 * 64)
        idx, val = "0.0.self_attn.q_proj.sparse_indices", "0.0.self_attn.q_proj.sparse_values"
        good = {idx: torch.arange(k, dtype=torch.int64), val: torch.zeros(k)}
        hostile = [
            ({**good, idx: torch.arange(k, dtype=torch.int64) + 4096}, "outside"),
            ({**good, idx: torch.arange(k, dtype=torch.float32)}, "integer indices"),
            ({**good, val: torch.zeros(k, dtype=torch.int64)}, "floating point"),
            ({**good, idx: torch.arange(k, dtype=torch.int64).flip(0)}, "sorted and unique"),
            ({**good, idx: torch.zeros(k, dtype=torch.int64)}, "sorted and unique"),
            ({val: torch.zeros(k)}, "first push carries its frozen tensors"),  # values that would go nowhere
        ]
        for tensors, message in hostile:
            with pytest.raises(SessionError, match=message) as err:
                session.push_adapter(wire.AdapterPush(1, tensors))
            assert err.value.code == "INVALID_ARGUMENT" and session.version is None
        session.push_adapter(wire.AdapterPush(1, good))
        with pytest.raises(SessionError, match="integer indices, pushed whole"):
            session.push_adapter(wire.AdapterPush(2, {idx: torch.zeros(k, dtype=torch.int64)}, delta=True))
        # a later whole push leaves the indices out: the node keeps the ones it has
        session.push_adapter(wire.AdapterPush(2, {val: torch.ones(k)}))
        assert torch.equal(session.tensors[idx], good[idx]) and session.version == 2
    finally:
        route.stop()


def test_a_calibration_session_is_admitted_by_its_probes_memory(tiny64, tmp_path):
    """A Fisher probe holds an fp32 probe, its gradient, the Fisher sum and temporaries per targeted weight entry on
    the node: a node whose free memory cannot hold them refuses the session instead of running out."""
    from edgetune.runtime.peft import FisherProbeConfig
    from edgetune.runtime.peft.adapter import methods_to_json

    probe = FisherProbeConfig(target_modules="all-linear", score="fisher", density=0.01)
    methods = methods_to_json([probe])
    for memory, admitted in ((300_000, False), (64 * 2**20, True)):  # the block alone is ~150 kB, its probes ~440 kB
        route = start_route(tiny64, [1], tmp_path / f"route{memory}", memory_bytes=memory)
        try:
            shard = route.shards[0]
            hop = wire.Hop(shard.name, "", shard.start, shard.end)
            weights = sum(lin.weight.numel() for block in shard.part.layers for lin in block.linears().values())
            biggest = max(lin.weight.numel() for block in shard.part.layers for lin in block.linears().values())
            assert shard.probe_bytes([probe]) == 20 * weights + 12 * biggest
            msg = wire.Open("s", shard.model, shard.fingerprint, [hop], methods_json=methods, micro_batch_size=1,
                            seq_len=8, micro_batches=1)
            if admitted:
                assert shard.open_session(msg).reserved_bytes >= 20 * weights
            else:
                with pytest.raises(SessionError, match="cannot admit") as err:
                    shard.open_session(msg)
                assert err.value.code == "RESOURCE_EXHAUSTED"
        finally:
            route.stop()


@pytest.mark.parametrize("options, message", [
    ({"method": "adalora", "rank": 16, "init_rank": 12}, "--rank (the average rank it ends at, 16) must be in [1, --init-rank = 12]"),
    ({"method": "adalora", "steps": 5, "tinit": 3, "tfinal": 2}, "--steps (5) must exceed --tinit + --tfinal"),
    ({"method": "unipelt", "target_modules": ("q_proj", "down_proj")}, "must be among q_proj, k_proj, v_proj"),
    ({"method": "mam", "layers_to_transform": (0,)}, "mam: --layers-to-transform"),
    ({"method": "sparse", "density": 0.0}, "--density must be in (0, 1]"),
    ({"method": "sparse", "mask": "largest"}, "mask 'largest' not in fisher, magnitude, random"),
])
def test_method_options_are_checked_in_the_flags_terms(options, message):
    from edgetune.runtime.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        TrainConfig(data="d.jsonl", **options)
    assert message in str(err.value)


def test_method_presets_and_defaults():
    from edgetune.runtime import peft

    assert TrainConfig(data="d.jsonl", method="adalora").methods()[0].init_r == 12  # peft's 12 for --rank 8
    assert TrainConfig(data="d.jsonl", method="adalora", rank=16).methods()[0].init_r == 24
    prefix, parallel = TrainConfig(data="d.jsonl", method="mam", num_virtual_tokens=5, adapter_scaling=2.0).methods()
    assert isinstance(prefix, peft.PrefixTuningConfig) and prefix.num_virtual_tokens == 5
    assert isinstance(parallel, peft.ParallelAdapterConfig) and parallel.scaling == 2.0
    [shira] = TrainConfig(data="d.jsonl", method="sparse", shira_rank=4, mask="random").methods()
    assert isinstance(shira, peft.ShiraConfig) and shira.r == 4 and shira.mask == "random"
    [sparse] = TrainConfig(data="d.jsonl", method="sparse").methods()
    assert isinstance(sparse, peft.SparseConfig) and sparse.density == 0.01 and sparse.mask == "fisher"
