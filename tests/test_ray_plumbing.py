"""Ray plumbing: port picking, configs, `ray start` command lines, process supervision.

Unit tests start no Ray: command lines are checked by parsing them with Ray's
own `ray start` CLI parser, and supervision runs against a fake `ray start`.
One slow test starts a real head + 2 nodes on this host.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgetune.coordinator.ray_head import RayHeadConfig, build_head_command
from edgetune.nodes.ray_join import RayNodeConfig, build_command, node_resource
from edgetune.runtime.cluster.node_labels import LABEL_NAME, NodeOptions
from edgetune.runtime.cluster.ray_process import RayAuth, RayPorts, RayProcess, RayStartError, ray_env, session_pids
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.wire.ports import free_port, free_port_range, free_ports
from edgetune.tests.procs import ProcessTree, stop_process

TOKEN = "ab" * 32


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ray_start_params(argv: list[str]) -> dict:
    """Parse a `python -m ray.scripts.scripts start ...` argv with Ray's own click command (starts nothing)."""
    from ray.scripts.scripts import start

    assert argv[1:4] == ["-m", "ray.scripts.scripts", "start"]
    return start.make_context("start", argv[4:]).params


# -- ports -----------------------------------------------------------------------
def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(_bindable(p) for p in ports)
    assert _bindable(free_port("0.0.0.0"), "0.0.0.0")


def test_free_port_range_is_consecutive_and_skips_taken_ports():
    first, last = free_port_range(8)
    assert last - first + 1 == 8 and 20000 <= first and last <= 32767
    assert all(_bindable(p) for p in range(first, last + 1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))  # window first..first+3 has one pair left: first+2..first+3
        assert free_port_range(2, low=first, high=first + 3, attempts=200) == (first + 2, first + 3)
        with pytest.raises(ConfigError, match="no 1 consecutive free ports"):
            free_port_range(1, low=first + 1, high=first + 1, attempts=3)
    for size in (0, 100000):
        with pytest.raises(ConfigError, match="size must be"):
            free_port_range(size)


# -- configs ---------------------------------------------------------------------
def test_ray_auth_validates_and_hides_token():
    auth = RayAuth.generate()
    assert auth.mode == "token" and len(auth.token) == 64 and auth.token not in repr(auth)
    assert auth.env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth.token}
    assert RayAuth.disabled().env() == {"RAY_AUTH_MODE": "disabled"}
    for mode, token in (("token", None), ("token", "short"), ("disabled", TOKEN), ("tls", None)):
        with pytest.raises(ConfigError):
            RayAuth(mode, token)


def test_ray_env_replaces_inherited_auth_and_address():
    base = {"PATH": "/bin", "RAY_AUTH_TOKEN_PATH": "/home/x/.ray/auth_token", "RAY_AUTH_TOKEN": "old" * 8,
            "RAY_ADDRESS": "10.0.0.1:6379"}
    env = ray_env(RayAuth.disabled(), base)
    assert env == {"PATH": "/bin", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    assert ray_env(RayAuth("token", TOKEN), base)["RAY_AUTH_TOKEN"] == TOKEN


def test_ray_ports_validation():
    with pytest.raises(ConfigError, match="node_manager_port"):
        RayPorts(node_manager_port=80)
    with pytest.raises(ConfigError, match="worker ports"):
        RayPorts(min_worker_port=30000)
    with pytest.raises(ConfigError, match="worker ports"):
        RayPorts(min_worker_port=30010, max_worker_port=30000)
    RayPorts(min_worker_port=30000, max_worker_port=30010)


def _node(**overrides) -> RayNodeConfig:
    fields = {"ray_address": "192.0.2.2:6379", "name": "gpu-a", "auth": RayAuth("token", TOKEN)}
    return RayNodeConfig(**{**fields, **overrides})


def test_node_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        _node(ray_address="nohost", name="-bad name", device="cuda", num_gpus=0, threads=0,
              temp_dir=Path("/tmp/" + "x" * 60), memory_limit_bytes=0, num_cpus=-1)
    message = str(err.value)
    for key in ("ray_address", "name", "num_gpus", "threads", "temp_dir", "memory_limit_bytes", "num_cpus"):
        assert key in message, key
    with pytest.raises(ConfigError, match="device 'cpu' takes num_gpus 0"):
        _node(num_gpus=1)
    with pytest.raises(ConfigError, match="absolute"):
        _node(temp_dir=Path("rel/dir"))
    with pytest.raises(ConfigError, match="device must be"):
        _node(device="tpu")


def test_head_config_validation():
    with pytest.raises(ConfigError) as err:
        RayHeadConfig(host="0.0.0.0", port=22, auth_mode="tls", health_check_period_ms=0, num_cpus=-1,
                      object_store_memory_bytes=1 << 20)
    for key in ("host", "port", "auth_mode", "health_check_period_ms", "num_cpus", "object_store_memory_bytes"):
        assert key in str(err.value), key


# -- command lines, parsed by Ray's own CLI -----------------------------------------
def test_node_command_parses_with_ray_start():
    from ray._private.label_utils import parse_node_labels_string

    ports = RayPorts(node_manager_port=31001, object_manager_port=31002, dashboard_agent_listen_port=31003,
                     min_worker_port=31010, max_worker_port=31020)
    config = _node(device="cuda", num_gpus=2, num_cpus=8, threads=4, memory_limit_bytes=12 << 30,
                   temp_dir=Path("/tmp/et-a"), ports=ports, object_store_memory_bytes=1 << 30)
    params = _ray_start_params(build_command(config))
    assert params["address"] == "192.0.2.2:6379" and params["block"] and not params["head"]
    assert (params["num_cpus"], params["num_gpus"], params["temp_dir"]) == (8, 2, "/tmp/et-a")
    assert params["object_store_memory"] == 1 << 30
    assert json.loads(params["resources"]) == {"edgetune_node": 1, node_resource("gpu-a"): 1}
    labels = parse_node_labels_string(params["labels"])  # also checks Ray's label syntax
    assert NodeOptions.from_labels(labels) == NodeOptions(name="gpu-a", device="cuda", threads=4,
                                                          memory_limit_bytes=12 << 30)
    assert (params["node_manager_port"], params["object_manager_port"], params["dashboard_agent_listen_port"],
            params["min_worker_port"], params["max_worker_port"]) == (31001, 31002, 31003, 31010, 31020)
    # unset ports go to Ray as 0 (it binds OS-assigned ports), never Ray's fixed defaults
    assert params["runtime_env_agent_port"] == params["metrics_export_port"] == params["dashboard_agent_grpc_port"] == 0


def test_node_command_defaults_let_ray_pick_every_port():
    params = _ray_start_params(build_command(_node()))
    for flag in ("node_manager_port", "object_manager_port", "runtime_env_agent_port", "dashboard_agent_grpc_port",
                 "dashboard_agent_listen_port", "metrics_export_port", "min_worker_port", "max_worker_port"):
        assert params[flag] == 0, flag
    assert params["num_gpus"] == 0 and params["temp_dir"] is None and params["node_ip_address"] is None


def test_node_command_takes_given_labels_and_ip():
    from ray._private.label_utils import parse_node_labels_string

    params = _ray_start_params(build_command(_node(labels={"edgetune-name": "gpu-a", "zone": "eu-1"},
                                                   node_ip="192.0.2.9")))
    assert parse_node_labels_string(params["labels"]) == {"edgetune-name": "gpu-a", "zone": "eu-1"}
    assert params["node_ip_address"] == "192.0.2.9"
    for bad in ({"ray.io/node-id": "x"}, {"zone": "a,b"}, {"bad key": "x"}, {"k": "=x"}):
        with pytest.raises(ConfigError, match="is not a Ray label"):
            _node(labels=bad)


def test_head_command_parses_with_ray_start():
    config = RayHeadConfig(host="192.0.2.2", port=40001, num_cpus=2, temp_dir=Path("/tmp/et-head"),
                           health_check_period_ms=700, health_check_failure_threshold=3)
    params = _ray_start_params(build_head_command(config, temp_dir=Path("/tmp/et-head"), client_port=40002))
    assert params["head"] and params["block"] and params["include_dashboard"] is False
    assert (params["port"], params["ray_client_server_port"], params["node_ip_address"]) == (40001, 40002, "192.0.2.2")
    assert params["system_config"] == {  # Ray's CLI parses the JSON
        "health_check_period_ms": 700, "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}
    assert params["dashboard_agent_listen_port"] == 0 and params["num_cpus"] == 2


# -- supervision, against a fake `ray start` ----------------------------------------
FAKE_RAY_START = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    mode, temp_dir = sys.argv[1], sys.argv[2]
    if mode == "exit":
        print("boom: cannot reach the GCS", flush=True)
        sys.exit(3)
    if mode.startswith("abort"):  # abort-N: the first N starts die of SIGABRT, as Ray's gRPC sometimes does
        tries = os.path.join(os.path.dirname(temp_dir), "tries")
        n = int(open(tries).read()) + 1 if os.path.exists(tries) else 1
        open(tries, "w").write(str(n))
        if n <= int(mode.split("-")[1]):
            print(f"start {n}: Check failed: wakeup_fd_->ConsumeWakeup().ok()", flush=True)
            os.abort()
        mode = "ok"
    def on_term(*_):
        open(os.path.join(temp_dir, "got_sigterm"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    # like a Ray worker: its own process group, same session; this one also ignores SIGTERM
    subprocess.Popen([sys.executable, "-c",
                      "import os, signal, time; os.setpgid(0, 0); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    if mode == "ok":
        open(os.path.join(temp_dir, "ray_current_cluster"), "w").write("192.0.2.2:6379")
    while True:
        time.sleep(1)
""")


@pytest.fixture
def fake(tmp_path):
    """mode -> RayProcess running a fake `ray start`; whatever a failing test leaves is killed after it."""
    made: list[RayProcess] = []

    def make(mode: str) -> RayProcess:
        script = tmp_path / "fake_ray_start.py"
        script.write_text(FAKE_RAY_START)
        temp_dir = tmp_path / "ray"
        made.append(RayProcess([sys.executable, str(script), mode, str(temp_dir)], env=dict(os.environ),
                               temp_dir=temp_dir, log_path=tmp_path / "fake.log", label="fake"))
        return made[-1]

    yield make
    for proc in made:
        if proc.pid is None:
            continue
        sid = proc.pid
        try:
            proc.stop(grace_s=5)  # a no-op where the test stopped it
        finally:
            ProcessTree.of(sessions=[sid]).kill()


def test_process_stop_leaves_nothing_of_its_session(tmp_path, fake):
    proc = fake("ok")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("stale:1")  # a previous run's file is not "ready"
    assert proc.start(ready_timeout_s=20) == "192.0.2.2:6379"
    sid = proc.pid
    assert os.getsid(sid) == sid and len(session_pids(sid)) == 2
    stragglers = proc.stop(grace_s=5)
    assert (tmp_path / "ray" / "got_sigterm").exists()  # the leader was asked to leave first
    assert len(stragglers) == 1 and stragglers[0] != sid  # the SIGTERM-proof "worker" was swept by session
    assert session_pids(sid) == [] and not proc.alive
    assert proc.stop(grace_s=5) == []  # idempotent


def test_process_kill_takes_whole_session_at_once(tmp_path, fake):
    proc = fake("ok")
    proc.start(ready_timeout_s=20)
    sid = proc.pid
    proc.kill()
    assert session_pids(sid) == [] and not (tmp_path / "ray" / "got_sigterm").exists()


def test_process_that_exits_early_raises_with_log_tail(fake):
    with pytest.raises(RayStartError, match=r"(?s)exited with 3.*boom: cannot reach the GCS"):
        fake("exit").start(ready_timeout_s=20)


def test_a_start_that_aborts_once_is_launched_again(tmp_path, fake):
    proc = fake("abort-1")
    assert proc.start(ready_timeout_s=20) == "192.0.2.2:6379"
    assert (tmp_path / "tries").read_text() == "2"
    proc.stop(grace_s=5)


def test_a_start_that_keeps_aborting_is_an_error_with_its_log(tmp_path, fake):
    with pytest.raises(RayStartError, match=r"(?s)exited with -6.*start 2: Check failed"):
        fake("abort-5").start(ready_timeout_s=20)
    assert (tmp_path / "tries").read_text() == "2"  # one retry, no more


def test_process_not_ready_in_time_is_stopped(fake):
    proc = fake("hang")
    with pytest.raises(RayStartError, match="not up after 1 s"):
        proc.start(ready_timeout_s=1)
    assert session_pids(proc.pid) == []


def test_process_leaves_when_its_parent_is_killed(tmp_path, fake):
    """PR_SET_PDEATHSIG: SIGKILL of the edgetune process still makes `ray start` leave (SIGTERM)."""
    proc = fake("ok")  # not started here: the runner process below starts its own copy
    parent = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from edgetune.runtime.cluster.ray_process import RayProcess
        p = RayProcess({proc.argv!r}, env={{}}, temp_dir=Path({str(proc.temp_dir)!r}),
                       log_path=Path({str(proc.log_path)!r}), label="fake")
        p.start(ready_timeout_s=20)
        print(p.pid, flush=True)
        time.sleep(600)
    """)
    runner = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    sessions: list[int] = []
    try:
        sid = int(runner.stdout.readline())
        sessions.append(sid)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 10
        while not (tmp_path / "ray" / "got_sigterm").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "ray" / "got_sigterm").exists()
    finally:  # the fake "worker" ignores SIGTERM (real Ray workers die with their raylet): SIGKILLed here
        stop_process(runner, timeout_s=10, settle_s=0, sessions=sessions)


# -- a real cluster -----------------------------------------------------------------
@pytest.mark.slow
def test_the_session_cluster_carries_edgetune_resources_and_labels(ray_cluster):
    """A head + 2 nodes started through RayHead / RayNodeProcess: Ray sees each node with the
    edgetune resource, its own name resource and its options as labels. (Killing a node and
    leaving no process behind are covered by test_cluster_cli.py, on a cluster of its own.)"""
    import ray

    from edgetune.tests.conftest import cluster_node_options

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3
    by_name = {n["Labels"].get(LABEL_NAME): n for n in nodes}
    assert set(by_name) == {None, "node-0", "node-1"}  # None: the head, which carries no edgetune tags
    for options in cluster_node_options():
        node = by_name[options["name"]]
        assert node["Resources"]["edgetune_node"] == 1 and node["Resources"][node_resource(options["name"])] == 1
        assert NodeOptions.from_labels(node["Labels"]) == NodeOptions.from_labels(options["labels"])
    assert NodeOptions.from_labels(by_name["node-1"]["Labels"]).fetch_weights
