"""The real CLI: `edgetune coordinator`, two `edgetune node` processes and `edgetune finetune`
in subprocesses, on their own Ray head (free ports, a temporary folder); then a node is
killed in the middle of a step and training finishes with the same adapter."""
from __future__ import annotations

import json
import re
import time

import pytest

from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.runtime.wire.ports import free_ports
from edgetune.tests.cli_cluster import CliCluster
from edgetune.tests.tiny import make_tiny_folder

pytestmark = pytest.mark.slow

TEXTS = ["the quick brown fox jumps over the lazy dog.", "hello world, how are you today?",
         "adapters live on the edge; the backbone lives on the nodes.", "the fox is quick and brown.",
         "nodes stream activations over grpc.", "a step either completes or is replayed whole."]
OPTIONS = dict(method="lora", rank=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj"), lr=5e-2, steps=4,
               batch_size=4, micro_batches=2, warmup_steps=1, max_seq_len=32, eval_fraction=0.0, save_every=0,
               seed=5, progress=False)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_folder("llama", root / "tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root / "tiny", data


SHARD_PORTS = {f"node-{i}": port for i, port in enumerate(free_ports(2))}  # fixed (--shard-port), as behind a firewall


@pytest.fixture(scope="module")
def cluster():
    with CliCluster.start([["--threads", "1", "--shard-port", str(SHARD_PORTS[f"node-{i}"])] for i in range(2)]) as c:
        yield c


def _local(model, data, out):
    return finetune(TrainConfig(model=str(model), data=str(data), out=str(out), **OPTIONS))


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k


def test_cli_finetune_on_a_cluster_equals_local(cluster, model_and_data, tmp_path):
    model, data = model_and_data
    flags = []
    for k, v in OPTIONS.items():
        if k == "progress":
            continue
        flags += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, tuple) else str(v)]
    run = cluster.edgetune("finetune", *cluster.edge_args("alice"), "--model", str(model), "--data", str(data), "--out", str(tmp_path / "remote"),
                           "--no-progress", *flags)
    assert run.returncode == 0, run.stderr + cluster.log_text()
    assert "adapter saved to" in run.stdout
    _assert_same(_adapter(_local(model, data, tmp_path / "local").out), _adapter(tmp_path / "remote"))
    records = [json.loads(line) for line in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_sent"] > 0 and r["stages"] for r in records if "loss" in r)

    client = cluster.client(edge="alice")
    hops = client.get_route(str(model)).hops
    client.close()
    assert hops and all(h.address.endswith(f":{SHARD_PORTS[h.name]}") for h in hops)

    shown = cluster.edgetune("status", "--state", str(cluster.state))  # the operator, on the coordinator's host
    assert shown.returncode == 0, shown.stderr
    assert "node-0" in shown.stdout and "node-1" in shown.stdout and "[0, " in shown.stdout
    # --dtype auto, resolved on each node for its device: fp32 on a CPU
    assert re.search(r"^node-0\s+alive\s+\S+\s+cpu\s+fp32\s+none\s+eager\s", shown.stdout, re.M), shown.stdout


def test_a_bf16_node_and_an_nf4_node_serve_their_blocks_so(model_and_data, tmp_path):
    """`edgetune node --dtype bf16` and `edgetune node --quantize nf4 --kernels compiled`: status shows
    them, and training through them follows fp32 training without equalling it (the blocks really ran
    that way)."""
    model, data = model_and_data
    options = {**OPTIONS, "steps": 2, "dropout": 0.0}
    with CliCluster.start([["--threads", "1", "--dtype", "bf16"], ["--threads", "1", "--quantize", "nf4", "--kernels", "compiled"]]) as c:
        result = finetune(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "remote"),
                                      **c.edge_options("edge"), **options))
        shown = c.edgetune("status", "--state", str(c.state))
    assert result.steps == 2
    assert re.search(r"^node-0\s+alive\s+\S+\s+cpu\s+bf16\s+none\s+eager\s+1\s.*\[\d, \d\)", shown.stdout, re.M), shown.stdout
    assert re.search(r"^node-1\s+alive\s+\S+\s+cpu\s+fp32\s+nf4\s+compiled\s+1\s.*\[\d, \d\)", shown.stdout, re.M), shown.stdout
    local = finetune(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "local"), **options))
    ours, ref = _adapter(result.out), _adapter(local.out)
    learnt = [k for k in ref if "lora_B" in k]
    assert learnt and any((ours[k] - ref[k]).abs().max() > 1e-6 for k in learnt)  # not fp32's result
    assert all((ours[k] - ref[k]).norm() <= 0.5 * ref[k].norm() for k in learnt)


def test_strangers_are_refused_with_a_clear_message(cluster, tmp_path):
    """Plaintext with a token, a certificate from another CA, and a spent join string: each refused,
    saying why."""
    bad = tmp_path / "token"
    bad.write_text("a-token-of-some-other-cluster\n")
    shown = cluster.edgetune("status", "--coordinator", cluster.address, "--insecure", "--token-file", str(bad))
    assert shown.returncode == 1 and "UNAVAILABLE" in shown.stderr, shown.stderr
    from edgetune.runtime.security.ca import Authority
    from edgetune.runtime.security.credentials import Credentials

    other = Authority.create("another cluster")
    cert, key = other.issue_keypair("alice", "edge", valid_s=600)
    Credentials(tmp_path / "stranger", cluster.address, other.cert_pem, cert, key).save()
    shown = cluster.edgetune("status", "--credentials", str(tmp_path / "stranger"))
    assert shown.returncode == 1 and "UNAVAILABLE" in shown.stderr, shown.stderr
    join = cluster.join_string("edge")
    empty = cluster.edgetune("status", "--credentials", str(tmp_path / "none"))  # no credentials there at all
    assert empty.returncode == 1 and "holds neither" in empty.stderr, empty.stderr
    from edgetune.runtime.wire.coordinator_client import CoordinatorError, join_cluster

    join_cluster(join, tmp_path / "once", "dave", "edge")
    with pytest.raises(CoordinatorError, match="UNAUTHENTICATED.*already used"):
        join_cluster(join, tmp_path / "twice", "erin", "edge")


def test_node_killed_mid_step_is_replaced_and_the_adapter_is_unchanged(cluster, model_and_data, tmp_path,
                                                                       monkeypatch, caplog):
    """Kill the first node of the route as the edge ends a step (its backwards sent): the edge gets
    an error, asks for a new route (the coordinator moves the blocks to the other node), replays
    the step, and the adapter equals an uninterrupted run's."""
    from edgetune.runtime.train import remote

    model, data = model_and_data
    killed = []
    original = remote.RemoteEngine._end_step

    def end_step_with_a_death(self, step):
        if step == 2 and not killed:
            victim = self.trainer.route.hops[0].name
            cluster.kill_node(int(victim.rsplit("-", 1)[1]))
            killed.append(victim)
        return original(self, step)

    monkeypatch.setattr(remote.RemoteEngine, "_end_step", end_step_with_a_death)
    caplog.set_level("WARNING", logger="edgetune.remote")
    result = finetune(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "remote"),
                                  **cluster.edge_options("alice"), **OPTIONS))
    assert killed and result.steps == OPTIONS["steps"]
    assert "replaying on a new route" in caplog.text
    _assert_same(_adapter(_local(model, data, tmp_path / "local").out), _adapter(result.out))
    # Ray itself declares the killed node dead within its health-check window (4 x 1 s here)
    cluster.wait_for(lambda s: [n.name for n in s.nodes if n.alive] == [h for h in ("node-0", "node-1")
                                                                        if h != killed[0]],
                     "Ray to declare the killed node dead", timeout_s=30)


def test_revoking_an_edge_ends_its_training_within_seconds(cluster, model_and_data, tmp_path):
    """`edgetune revoke` of an edge that is training: the coordinator hands the nodes the list, the
    first node ends the edge's stream, and the run stops with PERMISSION_DENIED within 5 s."""
    import threading

    model, data = model_and_data
    metrics = tmp_path / "remote" / "metrics.jsonl"
    outcome: dict = {}

    def train():
        try:
            finetune(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "remote"),
                                 **cluster.edge_options("mallory"), **{**OPTIONS, "steps": 100_000}))
        except Exception as e:  # what the run ends with
            outcome["error"], outcome["at"] = e, time.monotonic()

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    deadline = time.monotonic() + 180
    while not (metrics.exists() and '"loss"' in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert '"loss"' in metrics.read_text(), "training never got going"
    done = cluster.edgetune("revoke", "mallory", "--state", str(cluster.state))
    revoked_at = time.monotonic()
    assert done.returncode == 0, done.stderr
    runner.join(60)
    assert "error" in outcome, "the revoked edge kept training"
    assert "PERMISSION_DENIED" in str(outcome["error"]) and "revoked" in str(outcome["error"]), outcome["error"]
    assert outcome["at"] - revoked_at < 5.0


def test_a_revoked_node_loses_its_shard_and_its_calls(cluster, model_and_data):
    """`edgetune revoke NAME` on the coordinator's host: within seconds the node's shard is gone from
    every placement and its certificate is refused (last in this module: it leaves no usable node)."""
    model, _ = model_and_data
    client = cluster.client(edge="alice")
    try:
        route = client.get_route(str(model))
    finally:
        client.close()
    victim = route.hops[0].name
    started = time.monotonic()
    done = cluster.edgetune("revoke", victim, "--state", str(cluster.state))
    assert done.returncode == 0 and f"revoked {victim!r}" in done.stdout, done.stderr
    cluster.wait_for(lambda s: all(not n.stages for n in s.nodes if n.name == victim), "the shard's eviction",
                     timeout_s=10)
    assert time.monotonic() - started < 10
    from edgetune.runtime.security.credentials import Credentials
    from edgetune.runtime.wire.coordinator_client import CoordinatorClient, CoordinatorError

    node = Credentials.load(cluster.root / "nodes" / victim, "node")
    refused = CoordinatorClient(cluster.address, node.trust())
    try:
        with pytest.raises(CoordinatorError, match="PERMISSION_DENIED.*revoked"):
            refused.status()
    finally:
        refused.close()
