"""A cluster started the way a user starts one: `edgetune coordinator` and `edgetune node`
processes, each in a session of its own, on free ports in a short temporary folder.

    with CliCluster.start(tmp, nodes=[["--threads", "1"], ["--threads", "1"]]) as c:
        c.edgetune("finetune", "--coordinator", c.address, "--token-file", c.token_file, ...)
        c.kill_node(1)                      # SIGKILL the node and everything it started

`stop()` ends the nodes, then the coordinator, and fails if any process they
started (Ray's included) is still alive -- found by session id, so nothing
else on the machine is touched.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.runtime.ports import free_port
from edgetune.runtime.ray_process import session_pids

EDGETUNE = [sys.executable, "-m", "edgetune.cli"]
STARTUP_TIMEOUT_S = 120.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


@dataclass
class CliCluster:
    root: Path
    address: str
    token_file: Path
    coordinator: subprocess.Popen
    nodes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def start(cls, nodes: list[list[str]], extra: list[str] = ()) -> "CliCluster":
        root = Path(tempfile.mkdtemp(prefix="et-cli-", dir="/tmp"))  # short: Ray's socket paths
        port = free_port()
        address = f"127.0.0.1:{port}"
        token = root / "token"
        log = root / "coordinator.log"
        proc = subprocess.Popen([*EDGETUNE, "coordinator", "--host", "127.0.0.1", "--port", str(port),
                                 "--token-file", str(token), "--temp-dir", str(root / "h"), *extra],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        cluster = cls(root, address, token, proc, logs=[log])
        try:
            cluster.wait_for(lambda s: True, "the coordinator to answer")
            for i, options in enumerate(nodes):
                node_log = root / f"node-{i}.log"
                cluster.logs.append(node_log)
                cluster.nodes.append(subprocess.Popen(
                    [*EDGETUNE, "node", "--coordinator", address, "--token-file", str(token), "--name", f"node-{i}",
                     "--temp-dir", str(root / f"n{i}"), *options],
                    stdout=node_log.open("w"), stderr=subprocess.STDOUT, env=_env(), start_new_session=True))
            cluster.wait_for(lambda s: sum(n.alive for n in s.nodes) == len(nodes), f"{len(nodes)} nodes to join")
        except BaseException:
            cluster.stop(check=False)
            raise
        return cluster

    # -- use -------------------------------------------------------------------------
    def edgetune(self, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
        return subprocess.run([*EDGETUNE, *args], capture_output=True, text=True, env=_env(), timeout=timeout_s)

    def status(self):
        from edgetune.runtime import rpc
        from edgetune.runtime.cluster_client import CoordinatorClient

        client = CoordinatorClient(self.address, rpc.load_token(self.token_file))
        try:
            return client.status()
        finally:
            client.close()

    def wait_for(self, predicate, what: str, timeout_s: float = STARTUP_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited ({self.coordinator.returncode}):\n{self.log_text()}")
            try:
                status = self.status()
                if predicate(status):
                    return status
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"waiting for {what}: {last}\n{self.log_text()}")

    def kill_node(self, i: int) -> None:
        """The node vanishes: SIGKILL its process and every process of its Ray node."""
        node = self.nodes[i]
        ray_sessions = _children_sessions(node.pid)
        os.killpg(node.pid, signal.SIGKILL)
        for sid in ray_sessions:
            for pid in session_pids(sid):
                _kill(pid)
        node.wait(10)

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs if p.exists())

    # -- teardown --------------------------------------------------------------------
    def stop(self, check: bool = True) -> None:
        sessions = [p.pid for p in [self.coordinator, *self.nodes]]
        sessions += [sid for p in [self.coordinator, *self.nodes] for sid in _children_sessions(p.pid)]
        for proc in [*self.nodes, self.coordinator]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        left = []
        while time.monotonic() < deadline:
            left = [pid for sid in sessions for pid in session_pids(sid)]
            if not left:
                break
            time.sleep(0.2)
        for pid in left:
            _kill(pid)
        shutil.rmtree(self.root, ignore_errors=True)
        if check and left:
            raise AssertionError(f"processes survived the cluster's shutdown: {left}")

    def __enter__(self) -> "CliCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(check=exc[0] is None)


def _children_sessions(pid: int) -> list[int]:
    """Sessions of `pid`'s descendants that differ from its own (Ray's `ray start` runs in its own)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        own = os.getsid(pid)
        return sorted({os.getsid(c.pid) for c in parent.children(recursive=True)} - {own})
    except (psutil.Error, ProcessLookupError, PermissionError):
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
