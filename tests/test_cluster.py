"""Integration: the coordinator (in this process, a Ray driver) over the session's Ray cluster,
its gRPC service on loopback, and the edge training through the routes it hands out."""
from __future__ import annotations

import json

import pytest
import torch

from edgetune.runtime.security.access import Trust
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.runtime.wire import rpc
from edgetune.runtime.wire.coordinator_client import CoordinatorClient, CoordinatorError
from edgetune.tests.conftest import CLUSTER_MODEL
from edgetune.tests.tiny import make_tiny_folder

pytestmark = pytest.mark.slow

TEXTS = ["the quick brown fox jumps over the lazy dog.", "hello world, how are you today?",
         "adapters live on the edge; the backbone lives on the nodes.", "the fox is quick and brown."]
OPTIONS = dict(method="ia3", lr=5e-2, steps=3, batch_size=4, micro_batches=2, max_seq_len=32, eval_fraction=0.0,
               save_every=0, seed=1, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    make_tiny_folder("llama", root / "tiny", **CLUSTER_MODEL)
    make_tiny_folder("llama", root / "tiny8", hidden_size=64, intermediate_size=128, num_hidden_layers=8)
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root


@pytest.fixture(scope="module")
def coordinator(ray_cluster, tmp_path_factory):
    from edgetune.coordinator.core import Coordinator
    from edgetune.coordinator.service import serve

    token_file = tmp_path_factory.mktemp("token") / "token"
    token = rpc.write_token(token_file)
    core = Coordinator(Trust.insecure(token), ray_cluster.address, ray_cluster.auth.token or "", ray_cluster.auth.mode)
    server, port, _ = serve(core, "127.0.0.1", 0)
    try:
        yield core, f"127.0.0.1:{port}", token_file
    finally:
        try:
            core.shutdown()
        finally:
            server.stop(grace=None)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_route_spans_both_nodes_and_training_equals_local(coordinator, files, tmp_path):
    core, address, token_file = coordinator
    model = str(files / "tiny")
    remote = finetune(TrainConfig(model=model, data=str(files / "data.jsonl"), out=str(tmp_path / "r"),
                                  coordinator=address, token_file=str(token_file), insecure=True, **OPTIONS))
    local = finetune(TrainConfig(model=model, data=str(files / "data.jsonl"), out=str(tmp_path / "l"), **OPTIONS))
    a, b = _adapter(local.out), _adapter(remote.out)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)
    route = core.route(model)
    # each node may hold 2 of the 4 blocks, so the route must use both, contiguously
    assert [(h.start, h.end) for h in route.hops] == [(0, 2), (2, 4)]
    assert sorted(h.name for h in route.hops) == ["node-0", "node-1"]


def test_status_shows_hardware_layers_and_load(coordinator, files):
    core, address, token_file = coordinator
    core.route(str(files / "tiny"))
    with_client = CoordinatorClient(address, Trust.insecure(rpc.load_token(token_file)))
    status = with_client.status()
    with_client.close()
    nodes = {n.name: n for n in status.nodes}
    assert set(nodes) == {"node-0", "node-1"}
    for n in nodes.values():
        assert n.alive and n.cpus >= 1 and n.threads == 1 and n.block_time_s > 0 and n.memory_bytes > 0
        assert len(n.stages) == 1 and n.info is not None and n.info.end - n.info.start == 2
    # node-1 has no model file of its own: its shard got its blocks through the object store,
    # and they are exactly the blocks' bytes (and verified against the manifest on arrival)
    assert nodes["node-1"].info.loaded_bytes == nodes["node-0"].info.loaded_bytes


def test_edge_without_the_model_fetches_only_its_part(coordinator, files, tmp_path, monkeypatch):
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.train import remote

    core, address, token_file = coordinator
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "local_model_folder", lambda model: None)  # "not on this machine"
    cfg = TrainConfig(model=str(files / "tiny"), data=str(files / "data.jsonl"), out=str(tmp_path / "r"),
                      coordinator=address, token_file=str(token_file), insecure=True, **OPTIONS)
    trainer = remote.RemoteTrainer.connect(cfg)
    assert not trainer.has_local_model and str(tmp_path / "cache") in str(trainer.folder)
    fetched = load_model(trainer.folder, start=0, end=0, edge=True)
    local = load_model(files / "tiny", start=0, end=0, edge=True)
    for (n, p), (m, q) in zip(fetched.named_parameters(), local.named_parameters()):
        assert n == m and torch.equal(p, q)
    assert not any(p.name.startswith("model.layers") for p in trainer.folder.iterdir())
    result = finetune(cfg)  # trains from the fetched part
    assert result.steps == OPTIONS["steps"]


def test_a_model_too_big_for_the_cluster_is_refused_with_the_missing_memory(coordinator, files):
    _, address, token_file = coordinator
    client = CoordinatorClient(address, Trust.insecure(rpc.load_token(token_file)))
    with pytest.raises(CoordinatorError) as err:
        client.get_route(str(files / "tiny8"))
    client.close()
    assert err.value.code == "FAILED_PRECONDITION"
    assert "can hold 4 of 8 blocks" in str(err.value) and "missing" in str(err.value)


def test_verify_is_refused_where_no_other_node_has_room_for_a_replica(coordinator, files, tmp_path):
    """Each node holds 2 of the 4 blocks and has room for half a block more: no replica of a stage fits
    on the other node, so `finetune --verify` stops before training, with the numbers."""
    _, address, token_file = coordinator
    with pytest.raises(CoordinatorError) as err:
        finetune(TrainConfig(model=str(files / "tiny"), data=str(files / "data.jsonl"), out=str(tmp_path / "v"),
                             coordinator=address, token_file=str(token_file), insecure=True, verify=0.5, **OPTIONS))
    assert err.value.code == "FAILED_PRECONDITION"
    assert "--verify: no node other than node-0 has room for a replica of its blocks [0, 2)" in str(err.value)
    assert "node-1 has" in str(err.value) and "free, needs" in str(err.value)
