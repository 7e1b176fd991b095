"""Distributed training without Ray: the edge + two in-process nodes on loopback gRPC.

The equivalence the issue asks for: a tiny model (2 layers, width 64), lossless
codec, 5 steps, dropout 0.1, the same micro-batches -> the same adapter as
--local training within 1e-5. Every PEFT method runs this way.
"""
from __future__ import annotations

import json

import pytest
import torch

from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.tests.node_harness import adapter_tensors, assert_adapters_close, patch_connect, start_route


@pytest.fixture()
def route(tiny64, tmp_path):
    local = start_route(tiny64, [1], tmp_path)
    yield local
    local.stop()


def _cfg(folder, data, out, **kw):
    base = dict(model=str(folder), data=str(data), out=str(out), method="lora", rank=4, alpha=8.0, dropout=0.1,
                target_modules=("q_proj", "v_proj", "down_proj"), lr=5e-2, steps=5, batch_size=4, grad_accum=1,
                micro_batches=2, warmup_steps=1, max_seq_len=32, eval_fraction=0.25, save_every=0, progress=False,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


_adapter = adapter_tensors
_assert_same = assert_adapters_close


METHOD_OPTIONS = {
    "lora": {},
    "dora": {"method": "dora"},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3},
    "prefix_projection": {"method": "prefix", "num_virtual_tokens": 3, "prefix_projection": True},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3},
    "ln_tuning": {"method": "ln_tuning"},
    "serial_adapter": {"method": "serial_adapter", "bottleneck_size": 8},
    "parallel_adapter": {"method": "parallel_adapter", "bottleneck_size": 8},
    "bitfit": {"method": "bitfit"},
    "sparse_fisher": {"method": "sparse", "density": 0.05, "mask": "fisher", "calibration_examples": 3},
    "shira_magnitude": {"method": "sparse", "shira_rank": 2, "mask": "magnitude"},
    "sparse_random": {"method": "sparse", "density": 0.02, "mask": "random"},
    "adalora": {"method": "adalora", "rank": 2, "init_rank": 4, "tinit": 1, "tfinal": 1},
    "vera": {"method": "vera", "rank": 16},
    "lokr": {"method": "lokr", "rank": 4},
    "mam": {"method": "mam", "num_virtual_tokens": 3, "bottleneck_size": 8},
    "unipelt": {"method": "unipelt", "rank": 4, "num_virtual_tokens": 3, "bottleneck_size": 8,
                "target_modules": ("q_proj", "v_proj")},
}


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
def test_distributed_equals_local(name, tiny64, data_file, route, tmp_path, monkeypatch):
    """Same seed, data and micro-batches: the distributed adapter equals --local's within 1e-5."""
    opts = METHOD_OPTIONS[name]
    local = finetune(_cfg(tiny64, data_file, tmp_path / "local", **opts))
    patch_connect(monkeypatch, route)
    remote = finetune(_cfg(tiny64, data_file, tmp_path / "remote", coordinator="fake:1",
                           token_file=str(route.token_file), **opts))
    assert len(remote.losses) == 5
    for a, b in zip(local.losses, remote.losses):
        assert abs(a - b) <= 1e-5, (local.losses, remote.losses)
    assert abs(local.eval_loss - remote.eval_loss) <= 1e-5
    _assert_same(_adapter(local.out), _adapter(remote.out), 1e-5)
    # the adapter really changed, so equality is not two untouched initialisations
    assert local.losses[-1] < local.losses[0]


def test_a_route_of_three_nodes_trains_as_local_without_a_replay(data_file, tmp_path, monkeypatch, caplog):
    """Each middle node relays every later node's Gradients before its own: with three stages the
    first node must wait for two of them (once a node sent its own after the first, the edge saw a
    stray Gradients and replayed every step)."""
    from edgetune.tests.tiny import make_tiny_folder

    folder = tmp_path / "tiny3"
    make_tiny_folder("llama", folder, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    three = start_route(folder, [1, 2], tmp_path / "tok")
    try:
        local = finetune(_cfg(folder, data_file, tmp_path / "local"))
        patch_connect(monkeypatch, three)
        caplog.set_level("WARNING", logger="edgetune.remote")
        remote = finetune(_cfg(folder, data_file, tmp_path / "remote", coordinator="fake:1"))
    finally:
        three.stop()
    assert "replaying" not in caplog.text, caplog.text
    _assert_same(_adapter(local.out), _adapter(remote.out), 1e-5)


def test_evicted_activations_are_recomputed_and_the_adapter_is_unchanged(tiny64, data_file, tmp_path, monkeypatch):
    """Each node keeps one micro-batch's activations: backward finds the other evicted, the node
    answers FAILED_PRECONDITION, the edge re-sends that forward -- and the result is still exact."""
    small = start_route(tiny64, [1], tmp_path / "tok", max_cached=1)
    try:
        local = finetune(_cfg(tiny64, data_file, tmp_path / "local", micro_batches=4))
        patch_connect(monkeypatch, small)
        remote = finetune(_cfg(tiny64, data_file, tmp_path / "remote", micro_batches=4, coordinator="fake:1",
                               token_file=str(small.token_file)))
    finally:
        small.stop()
    _assert_same(_adapter(local.out), _adapter(remote.out), 1e-5)


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_lossy_codecs_train_close_to_fp32(codec, tiny64, data_file, route, tmp_path, monkeypatch):
    patch_connect(monkeypatch, route)
    runs = {c: finetune(_cfg(tiny64, data_file, tmp_path / c, coordinator="fake:1", codec=c, dropout=0.0,
                             token_file=str(route.token_file))) for c in ("fp32", codec)}
    sent = {c: [rec for rec in map(json.loads, (r.out / "metrics.jsonl").read_text().splitlines()) if "loss" in rec]
            for c, r in runs.items()}
    assert abs(runs[codec].losses[-1] - runs["fp32"].losses[-1]) <= 0.02 * runs["fp32"].losses[-1]
    # fewer activation bytes on the wire (adapter pushes stay exact, so not the full 2x / 4x)
    assert sent[codec][0]["bytes_sent"] < sent["fp32"][0]["bytes_sent"]


def test_later_stages_adapter_traffic_crosses_earlier_nodes_unopened(tiny64, data_file, route, tmp_path, monkeypatch):
    """node-1's pushes and gradients pass node-0 as frames: every adapter tensor is decoded once per
    push (by its node) and once per gradient (by the edge), whichever stage it belongs to, and
    metrics.jsonl counts each link's bytes both ways."""
    from edgetune.runtime.wire import serde

    decoded: dict[str, int] = {}
    real = serde._decode_tensor

    def counting(header, payload):
        decoded[header.name] = decoded.get(header.name, 0) + 1
        return real(header, payload)

    monkeypatch.setattr(serde, "_decode_tensor", counting)
    patch_connect(monkeypatch, route)
    run = finetune(_cfg(tiny64, data_file, tmp_path / "r", coordinator="fake:1", token_file=str(route.token_file),
                        steps=2, eval_fraction=0.0, adapter_codec="int8"))
    by_layer = {layer: {n: c for n, c in decoded.items() if n.split(".")[1:2] == [str(layer)]} for layer in (0, 1)}
    assert by_layer[0] and by_layer[1]
    # node-0's blocks: 3 pushes (step 1's, then the next version's after each optimizer step) + 2 steps'
    # gradients; node-1's push goes out with the next forward, and none follows the last step
    assert set(by_layer[0].values()) == {3 + 2} and set(by_layer[1].values()) == {2 + 2}
    records = [r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    stages = records[-1]["stages"]
    assert [st["node"] for st in stages] == ["node-0", "node-1"]
    assert all(st["bytes_in"] > 0 and st["bytes_out"] > 0 for st in stages)
    # node-0's link from the edge carries node-1's push on top of the same activations and its own push
    assert stages[0]["bytes_in"] > stages[1]["bytes_in"]
    assert records[-1]["bytes_sent"] >= stages[0]["bytes_in"]


def test_micro_batches_left_to_the_run_follow_the_round_trip_and_resume_as_recorded(tiny64, data_file, route, tmp_path,
                                                                                   monkeypatch):
    """--micro-batches 0: chosen once at the start from the measured round trip and the nodes'
    profiles, written to config.json, and taken from there by --resume, so the resumed run
    (whatever the link does meanwhile) equals one run with that count given."""
    from edgetune.runtime.train import remote

    measured = remote.round_trip_s(route.route.hops[0].address, route.trust)
    assert 0 < measured < 1.0  # loopback, through real health checks
    client = patch_connect(monkeypatch, route)
    client.block_time_s = {"node-0": 0.5, "node-1": 0.5}  # a block: 0.5 s fwd+bwd at 128 tokens
    kw = dict(coordinator="fake:1", token_file=str(route.token_file), micro_batches=0, eval_fraction=0.0, steps=4)
    # B=4 x T=32 tokens: a stage's forward of the batch is about 0.5 x 1 block x 128/128 / 3 = 0.17 s
    rtts = iter([0.0])
    monkeypatch.setattr(remote, "round_trip_s", lambda address, trust, peer=None: next(rtts))
    fast = finetune(_cfg(tiny64, data_file, tmp_path / "fast", **kw))
    assert json.loads((fast.out / "config.json").read_text())["micro_batches"] == 2  # one per stage
    rtts = iter([0.05])  # route round trip 0.1 s: half the forward (m = 2) does not cover it, 3/4 (m = 4) do
    mid = finetune(_cfg(tiny64, data_file, tmp_path / "mid", **kw))
    assert json.loads((mid.out / "config.json").read_text())["micro_batches"] == 4
    rtts = iter([0.2])  # more than any split can hide: one row per micro-batch
    finetune(_cfg(tiny64, data_file, tmp_path / "slow", **kw), stop_after=2)
    assert json.loads((tmp_path / "slow" / "config.json").read_text())["micro_batches"] == 4
    rtts = iter([])  # --resume measures nothing: config.json says 4
    resumed = finetune(_cfg(tiny64, data_file, tmp_path / "slow", resume=True, **kw))
    given = finetune(_cfg(tiny64, data_file, tmp_path / "given", **{**kw, "micro_batches": 4}))
    _assert_same(_adapter(resumed.out), _adapter(given.out), 0.0)
    local = finetune(_cfg(tiny64, data_file, tmp_path / "local", micro_batches=0, eval_fraction=0.0, steps=1))
    assert json.loads((local.out / "config.json").read_text())["micro_batches"] == 1


def test_each_version_is_pushed_once_right_after_the_optimizer_step(tiny64, data_file, route, tmp_path, monkeypatch):
    """A version leaves as soon as the optimizer made it and evaluations reuse it: one push per step
    (plus the first), however many eval batches run; the traffic is still counted per step."""
    from edgetune.runtime.train.remote import RemoteEngine

    events = []
    push = RemoteEngine._push_adapter

    def counted(self):
        events.append("push")
        return push(self)

    monkeypatch.setattr(RemoteEngine, "_push_adapter", counted)
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: events.append("optimizer") or real_step(self, *a, **k))
    patch_connect(monkeypatch, route)
    run = finetune(_cfg(tiny64, data_file, tmp_path / "r", coordinator="fake:1", token_file=str(route.token_file),
                        steps=3, eval_every=1, eval_fraction=0.5, batch_size=2))
    assert run.steps == 3
    # the first eval pushes version 1; each optimizer step is followed by its push, which the next
    # step (and the evaluations around it, several batches each) use
    assert events == ["push", "optimizer", "push", "optimizer", "push", "optimizer", "push"]
    records = [r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in records)


def test_the_edge_loads_exactly_embeddings_final_norm_and_head(tiny64, route, tmp_path, data_file, monkeypatch):
    from safetensors import safe_open

    from edgetune.runtime.train.remote import RemoteTrainer

    patch_connect(monkeypatch, route)
    cfg = _cfg(tiny64, data_file, tmp_path / "r", coordinator="fake:1", token_file=str(route.token_file))
    engine = RemoteTrainer.connect(cfg).start(cfg.methods(), torch.device("cpu"))
    loaded = {n: p for n, p in engine.model.named_parameters()}
    with safe_open(str(tiny64 / "model.safetensors"), framework="pt") as f:
        edge = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("model.layers.")}
    assert sorted(edge) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert sum(p.numel() * p.element_size() for p in loaded.values()) == sum(t.numel() * 4 for t in edge.values())
    assert len(list(engine.model.blocks())) == 0
    # ... and yet it holds the adapter of every block, initialised as a local run would
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import attach_adapter

    whole = attach_adapter(load_model(tiny64), cfg.methods(), seed=cfg.seed)
    ref = whole.state_dict()
    got = engine.adapter.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    engine.close()


@pytest.mark.parametrize("adapter_codec", ["bf16", "int8"])
def test_adapter_deltas_keep_every_replica_equal_to_the_edges_mirror(adapter_codec, tiny64, data_file, route, tmp_path,
                                                                     monkeypatch):
    """--adapter-codec bf16|int8: after the first whole push the edge sends encoded deltas; each node's
    replica equals the edge's mirror bit for bit at every version, the mirror tracks the adapter without
    drifting, the adapter traffic shrinks, and training stays close to exact traffic."""
    from edgetune.nodes.shard import ShardSession
    from edgetune.runtime.train.remote import RemoteEngine

    mirrors, replicas, exact = {}, {}, {}
    push, node_push = RemoteEngine._push_adapter, ShardSession.push_adapter

    def edge_push(self):
        views = push(self)
        exact[self.version] = {k: v.detach().clone() for k, v in views.items()}
        if self._mirror is not None:
            mirrors[self.version] = {k: v.clone() for k, v in self._mirror.items()}
        return views

    def kept(self, msg):
        rest = node_push(self, msg)
        if self.adapter_codec != "raw":
            replicas.setdefault(msg.version, {}).update({k: v.detach().clone() for k, v in self.tensors.items()})
        return rest

    monkeypatch.setattr(RemoteEngine, "_push_adapter", edge_push)
    monkeypatch.setattr(ShardSession, "push_adapter", kept)
    patch_connect(monkeypatch, route)
    kw = dict(coordinator="fake:1", token_file=str(route.token_file), dropout=0.0, rank=16, target_modules="all-linear",
              steps=6, eval_fraction=0.0)
    runs = {c: finetune(_cfg(tiny64, data_file, tmp_path / c, adapter_codec=c, **kw)) for c in ("raw", adapter_codec)}
    assert mirrors and set(mirrors) <= set(replicas)
    for version, mirror in mirrors.items():
        # the version made by the last optimizer step reaches node-1 only with a next forward: none came
        assert replicas[version].keys() == mirror.keys() or version == max(mirrors)
        assert replicas[version].keys() <= mirror.keys() and any(k.startswith("0.0.") for k in replicas[version])
        for k, t in replicas[version].items():
            assert torch.equal(t, mirror[k]), (version, k)  # bit for bit
    last = max(mirrors)
    drift = max(float((mirrors[last][k] - exact[last][k]).abs().max() / exact[last][k].abs().max().clamp_min(1e-12))
                for k in mirrors[last])
    assert drift <= (2e-2 if adapter_codec == "int8" else 4e-3), drift
    assert abs(runs[adapter_codec].losses[-1] - runs["raw"].losses[-1]) <= 0.03 * runs["raw"].losses[-1]
    sent = {c: [rec for rec in map(json.loads, (r.out / "metrics.jsonl").read_text().splitlines()) if "loss" in rec]
            for c, r in runs.items()}
    values = sum(t.numel() for t in exact[last].values())
    saved = {d: sent["raw"][-1][d] - sent[adapter_codec][-1][d] for d in ("bytes_sent", "bytes_received")}
    fraction = 0.27 if adapter_codec == "int8" else 0.5  # of the raw adapter's 4 bytes a value, each way
    print(f"{adapter_codec}: adapter {4 * values} raw bytes a way; saved {saved}; losses raw {runs['raw'].losses} "
          f"{adapter_codec} {runs[adapter_codec].losses}; drift {drift:.2e}")
    for d, bytes_saved in saved.items():
        assert bytes_saved >= (1 - fraction - 0.03) * 4 * values, (d, bytes_saved, 4 * values)
