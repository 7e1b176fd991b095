"""Faults on a real 3-node cluster (`edgetune coordinator` + 3 `edgetune node` processes, mutual TLS):
a hung node, then a killed one, each ending with the adapter of an undisturbed run (1e-5, fp32
activations, raw adapter traffic). The other faults: a killed edge resumed against a cluster
(tests/test_example_laptop_finetune.py), a cut network link (tests/test_wan.py), hostile frames
(tests/test_fuzz.py, tests/test_node_service.py)."""
from __future__ import annotations

import json
import time

import pytest

from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.tests.cli_cluster import CliCluster
from edgetune.tests.conftest import CLUSTER_MODEL
from edgetune.tests.tiny import SAMPLE_TEXTS, make_tiny_folder

pytestmark = pytest.mark.slow

MODEL = {**CLUSTER_MODEL, "num_hidden_layers": 6}
STEPS = 12
BAN_S = 15.0  # the coordinator's --ban-s here: short, so the hung node is back within the module
OPTIONS = dict(method="lora", rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), lr=5e-2,
               steps=STEPS, batch_size=4, micro_batches=2, warmup_steps=1, max_seq_len=32, eval_fraction=0.0,
               save_every=0, seed=11, progress=False, codec="fp32", adapter_codec="raw")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_tiny_folder("llama", root / "tiny", **MODEL)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    return root / "tiny", data


def _memory_limit() -> str:
    """Room for 3 of the model's 6 blocks on a node: every route crosses at least two nodes, and any
    two nodes can still hold the model when the third is hung or dead."""
    from edgetune.nodes.profile import FIXED_BYTES
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.plan.cost import model_cost
    from edgetune.tests.tiny import tiny_hf_config

    cost = model_cost(ModelConfig.from_hf_dict(tiny_hf_config("llama", **MODEL).to_dict()))
    return str(FIXED_BYTES + int(3.5 * cost.bytes_per_block(1)))


@pytest.fixture(scope="module")
def cluster():
    node = ["--threads", "1", "--memory-limit", _memory_limit()]
    with CliCluster.start([node] * 3, extra=["--ban-s", str(BAN_S)]) as c:
        yield c


@pytest.fixture(scope="module")
def undisturbed(model_and_data, tmp_path_factory):
    model, data = model_and_data
    return _adapter(finetune(TrainConfig(model=str(model), data=str(data), out=str(tmp_path_factory.mktemp("local")),
                                         **OPTIONS)).out)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k


def _node_index(cluster, name: str) -> int:
    return cluster.node_names.index(name)


def _faulty_run(cluster, model_and_data, out, monkeypatch, at_step: int, fault):
    """Train with `fault(route)` injected as the edge ends step `at_step`; returns (result, times) where
    times has when the fault landed and when the edge got its next route."""
    from edgetune.runtime.train import remote

    model, data = model_and_data
    times: dict[str, float] = {}
    end_step, new_route = remote.RemoteEngine._end_step, remote.RemoteTrainer.new_route

    def end_step_with_a_fault(self, step):
        if step == at_step and "fault" not in times:
            times["victim"] = fault(self.trainer.route)
            times["fault"] = time.monotonic()
        return end_step(self, step)

    def timed_new_route(self, failed):
        route = new_route(self, failed)
        if "fault" in times:  # the first route after the fault
            times.setdefault("rerouted", time.monotonic())
            times.setdefault("route", [h.name for h in route.hops])
        return route

    monkeypatch.setattr(remote.RemoteEngine, "_end_step", end_step_with_a_fault)
    monkeypatch.setattr(remote.RemoteTrainer, "new_route", timed_new_route)
    result = finetune(TrainConfig(model=str(model), data=str(data), out=str(out), **cluster.edge_options("edge"),
                                  **OPTIONS))
    return result, times


def _steps_once(run_dir):
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))  # each optimizer step exactly once, none lost


def test_a_hung_node_is_rerouted_within_30_s_banned_and_used_again_after_sigcont(cluster, model_and_data, undisturbed,
                                                                                  tmp_path, monkeypatch):
    """SIGSTOP of the shard process of the route's last node as the edge ends step 4: keepalive (or
    the edge's silence limit) notices within seconds, the coordinator finds the shard not answering,
    bans the node and places its blocks on the others; the step replays. After SIGCONT and the ban's
    end the node is a candidate again."""
    def hang(route):
        victim = route.hops[-1].name
        assert cluster.hang_node(_node_index(cluster, victim)), f"no shard process found on {victim}"
        return victim

    result, times = _faulty_run(cluster, model_and_data, tmp_path / "hung", monkeypatch, 4, hang)
    victim = times["victim"]
    print(f"hung {victim}: a new route {times.get('rerouted', float('nan')) - times['fault']:.1f} s after the SIGSTOP")
    try:
        assert result.steps == STEPS and "rerouted" in times, "the hang was never noticed"
        assert times["rerouted"] - times["fault"] < 30.0, times
        assert victim not in times["route"]
        _assert_same(undisturbed, _adapter(result.out))
        _steps_once(result.out)
        status = cluster.status()
        assert [n.banned_s > 0 for n in status.nodes if n.name == victim] == [True]
        shown = cluster.edgetune("status", "--state", str(cluster.state))
        assert f"{victim}" in shown.stdout and "banned" in shown.stdout, shown.stdout + shown.stderr
    finally:
        cluster.hang_node(_node_index(cluster, victim), resume=True)
    cluster.wait_for(lambda s: all(n.alive and n.banned_s == 0 for n in s.nodes), "the ban to end",
                     timeout_s=BAN_S + 30)


def test_a_killed_node_is_replaced_and_the_banned_one_is_back_in_service(cluster, model_and_data, undisturbed,
                                                                          tmp_path, monkeypatch):
    """SIGKILL of the route's first node (and everything it started) as the edge ends step 6: the
    step replays on a new placement over the other two nodes -- the one hung in the test before,
    its ban over, among them -- and the adapter equals an undisturbed run's."""
    route_before = []

    def kill(route):
        route_before.extend(h.name for h in route.hops)
        victim = route.hops[0].name
        cluster.kill_node(_node_index(cluster, victim))
        return victim

    result, times = _faulty_run(cluster, model_and_data, tmp_path / "killed", monkeypatch, 6, kill)
    print(f"killed {times['victim']}: a new route {times['rerouted'] - times['fault']:.1f} s after the SIGKILL")
    assert result.steps == STEPS and times["victim"] not in times["route"]
    _assert_same(undisturbed, _adapter(result.out))
    _steps_once(result.out)
    survivors = set(cluster.node_names) - {times["victim"]}
    assert set(times["route"]) == survivors, (route_before, times["route"])  # every live node serves again


def test_the_route_service_is_killed_and_restarted_and_training_goes_on(model_and_data, undisturbed, tmp_path,
                                                                        monkeypatch):
    """The coordinator process runs against a Ray head of its own (`--ray-address`), as an operator
    who wants the route service restartable does. SIGKILL it as the edge ends step 4: its shard
    actors go with it, the edge's stream breaks, and the edge keeps asking for a route; the
    coordinator started again (same port, state folder and Ray cluster) places the blocks on the
    same nodes, and the step replays. Losing the Ray head itself is out of scope (README)."""
    import tempfile
    import threading
    from pathlib import Path

    from edgetune.coordinator.ray_head import RayHead, RayHeadConfig

    head = RayHead(RayHeadConfig(temp_dir=Path(tempfile.mkdtemp(prefix="et-h-", dir="/tmp"))))
    address = head.start()
    try:
        node = ["--threads", "1", "--memory-limit", _memory_limit()]
        with CliCluster.start([node] * 2, extra=["--ray-address", address], env=head.auth.env()) as c:
            restarted = threading.Event()

            def restart_soon():
                time.sleep(2.0)  # the edge finds nobody at the address meanwhile
                c.restart_coordinator()
                restarted.set()

            def kill_route_service(route):
                c.kill_coordinator()
                threading.Thread(target=restart_soon, daemon=True).start()
                return route.hops[0].name

            result, times = _faulty_run(c, model_and_data, tmp_path / "restarted", monkeypatch, 4, kill_route_service)
            print(f"route service killed: a new route {times['rerouted'] - times['fault']:.1f} s after the SIGKILL")
            assert restarted.is_set() and result.steps == STEPS
            assert set(times["route"]) == set(c.node_names)  # the same nodes serve on
            _assert_same(undisturbed, _adapter(result.out))
            _steps_once(result.out)
    finally:
        head.stop()
