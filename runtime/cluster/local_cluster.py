"""A whole cluster on this machine, started the way a user starts one: an `edgetune coordinator`
process and `edgetune node` processes, each in a session of its own, on free ports, with Ray's
files in a short temporary folder.

    with LocalCluster.start(nodes=[["--threads", "1"], ["--threads", "1", "--memory-limit", "600M"]]) as c:
        c.edgetune("finetune", *c.edge_args("alice"), ...)
        print(format_status(c.status()))

It is secured as a real one is (mutual TLS, a CA in its state folder, nodes joining with
one-time join strings, Ray's TLS), unless started with `insecure=True` (a shared token).
`edge_args(name)` joins an edge identity once and gives the flags a `finetune` needs.

`stop()` ends the nodes, then the coordinator, and makes sure no process they started (Ray's
included) survives -- found by session id, so nothing else on the machine is touched. The
demo (`edgetune demo`) and the multi-process tests use it.
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

from edgetune.runtime.cluster.ray_process import session_pids
from edgetune.runtime.wire.ports import free_ports

EDGETUNE = [sys.executable, "-m", "edgetune.cli"]
STARTUP_TIMEOUT_S = 120.0


def child_env() -> dict[str, str]:
    """This environment for the cluster's processes, without the caller's Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


class ClusterError(RuntimeError):
    """The local cluster did not come up; the message carries the processes' log tails."""


@dataclass
class LocalCluster:
    root: Path
    address: str
    token_file: Path  # --insecure only
    coordinator: subprocess.Popen
    nodes: list[subprocess.Popen] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    insecure: bool = False
    edges: dict[str, Path] = field(default_factory=dict)  # edge name -> its credentials folder
    coordinator_args: list[str] = field(default_factory=list)  # to start it again (restart_coordinator)
    node_options: list[list[str]] = field(default_factory=list)  # each node's own flags (restart_node)
    env: dict[str, str] = field(default_factory=dict)  # added to every child's environment

    @property
    def state(self) -> Path:
        """The coordinator's state folder (its CA)."""
        return self.root / "state"

    @classmethod
    def start(cls, nodes: list[list[str]], extra: list[str] = (), names: list[str] | None = None,
              timeout_s: float = STARTUP_TIMEOUT_S, insecure: bool = False,
              env: dict[str, str] | None = None) -> LocalCluster:
        """A coordinator (`extra`: more of its flags) and one node per entry of `nodes` (its flags),
        named `names` (default node-0, node-1, ...); returns once every node has joined. `env`: added
        to every process's environment (e.g. Ray's auth settings with `--ray-address`)."""
        names = list(names or [f"node-{i}" for i in range(len(nodes))])
        root = Path(tempfile.mkdtemp(prefix="et-cl-", dir="/tmp"))  # short: Ray's socket paths live below it
        port, join_port = free_ports(2)
        address = f"127.0.0.1:{port}"
        token = root / "token"
        log = root / "coordinator.log"
        trust = ["--insecure", "--token-file", str(token)] if insecure else \
            ["--state", str(root / "state"), "--join-port", str(join_port)]
        args = ["coordinator", "--host", "127.0.0.1", "--port", str(port), *trust, "--temp-dir", str(root / "h"), *extra]
        proc = _spawn(args, log, env)
        cluster = cls(root, address, token, proc, node_names=names, logs=[log], insecure=insecure,
                      coordinator_args=args, env=dict(env or {}), node_options=[list(o) for o in nodes])
        try:
            cluster.wait_for(lambda s: insecure or (root / "state" / "coordinator.json").exists(),
                             "the coordinator to answer", timeout_s)
            for i, (name, options) in enumerate(zip(names, nodes)):
                node_log = root / f"{name}.log"
                cluster.logs.append(node_log)
                cluster.nodes.append(_spawn(["node", "--coordinator", address, *cluster._node_trust(name),
                                             "--name", name, "--temp-dir", str(root / f"n{i}"), *options], node_log,
                                            env))
            cluster.wait_for(lambda s: sum(n.alive for n in s.nodes) == len(nodes), f"{len(nodes)} nodes to join",
                             timeout_s)
        except BaseException:
            cluster.stop(check=False)
            raise
        return cluster

    # -- trust -----------------------------------------------------------------------
    def _authority(self):
        from edgetune.runtime.security.authority import ClusterAuthority

        return ClusterAuthority(self.state)

    def join_string(self, role: str) -> str:
        """A fresh one-time join string (as `edgetune token create --role ROLE` prints it)."""
        return str(self._authority().create_token(role, ttl_s=600.0))

    def _node_trust(self, name: str) -> list[str]:
        if self.insecure:
            return ["--insecure", "--token-file", str(self.token_file)]
        return ["--join", self.join_string("node"), "--credentials", str(self.root / "nodes" / name)]

    def edge_credentials(self, name: str = "edge") -> Path:
        """The credentials folder of edge `name`, joined on first use."""
        if name not in self.edges:
            from edgetune.runtime.wire.coordinator_client import join_cluster

            folder = self.root / "edges" / name
            join_cluster(self.join_string("edge"), folder, name, "edge")
            self.edges[name] = folder
        return self.edges[name]

    def edge_args(self, name: str = "edge") -> list[str]:
        """The flags `edgetune finetune` (or `status`) needs to reach this cluster as edge `name`."""
        if self.insecure:
            return ["--coordinator", self.address, "--insecure", "--token-file", str(self.token_file)]
        return ["--coordinator", self.address, "--credentials", str(self.edge_credentials(name))]

    def edge_options(self, name: str = "edge") -> dict:
        """The same as TrainConfig fields."""
        if self.insecure:
            return {"coordinator": self.address, "insecure": True, "token_file": str(self.token_file)}
        return {"coordinator": self.address, "credentials": str(self.edge_credentials(name))}

    def operator_trust(self):
        """What the coordinator's operator connects with (a short-lived coordinator-role certificate)."""
        from edgetune.runtime.security.access import Trust
        from edgetune.runtime.wire import rpc

        if self.insecure:
            return Trust.insecure(rpc.load_token(self.token_file))
        if not (self.state / "ca.pem").exists():
            raise ClusterError("the coordinator has not created its CA yet")
        authority = self._authority()
        cert, key = authority.ca.issue_keypair("operator", "coordinator", valid_s=600.0)
        return Trust.mutual(authority.ca.cert_pem, cert, key)

    # -- use -------------------------------------------------------------------------
    def edgetune(self, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
        """Run an `edgetune` command to completion and capture its output."""
        return subprocess.run([*EDGETUNE, *args], capture_output=True, text=True, env=child_env(), timeout=timeout_s)

    def client(self, edge: str | None = None):
        """A coordinator client as the operator, or as edge `edge` (which may ask for routes)."""
        from edgetune.runtime.security.credentials import Credentials
        from edgetune.runtime.wire.coordinator_client import CoordinatorClient

        if edge is None or self.insecure:
            return CoordinatorClient(self.address, self.operator_trust())
        return CoordinatorClient(self.address, Credentials.load(self.edge_credentials(edge), "edge").trust())

    def status(self):
        client = self.client()
        try:
            return client.status()
        finally:
            client.close()

    def wait_for(self, predicate, what: str, timeout_s: float = STARTUP_TIMEOUT_S):
        """Poll the coordinator's status until `predicate(status)` holds."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise ClusterError(f"the coordinator exited ({self.coordinator.returncode}):\n{self.log_text()}")
            try:
                status = self.status()
                if predicate(status):
                    return status
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what} ({last})\n{self.log_text()}")

    def kill_node(self, i: int) -> None:
        """The node vanishes: SIGKILL its process and every process of its Ray node."""
        node = self.nodes[i]
        ray_sessions = _children_sessions(node.pid)
        os.killpg(node.pid, signal.SIGKILL)
        for sid in ray_sessions:
            for pid in session_pids(sid):
                _kill(pid)
        node.wait(10)

    def restart_node(self, i: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start node `i` again after it died, with its stored credentials (no join string): it joins
        Ray anew; returns once the coordinator counts it alive."""
        name = self.node_names[i]
        trust = ["--insecure", "--token-file", str(self.token_file)] if self.insecure else \
            ["--credentials", str(self.root / "nodes" / name)]
        runs = sum(1 for p in self.root.glob(f"n{i}*"))  # a fresh Ray folder for each start
        self.nodes[i] = _spawn(["node", "--coordinator", self.address, *trust, "--name", name,
                                "--temp-dir", str(self.root / f"n{i}r{runs}"), *self.node_options[i]],
                               self.root / f"{name}.log", self.env, append=True)
        self.wait_for(lambda s: any(n.alive and n.name == name for n in s.nodes), f"{name} to rejoin", timeout_s)

    def kill_coordinator(self) -> None:
        """The route service vanishes (SIGKILL of the coordinator process and its session)."""
        os.killpg(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait(10)

    def restart_coordinator(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start the coordinator again as before (same port, state folder and Ray cluster)."""
        log = self.root / "coordinator.log"
        self.coordinator = _spawn(self.coordinator_args, log, self.env, append=True)
        self.wait_for(lambda s: True, "the restarted coordinator to answer", timeout_s)

    def shard_pids(self, i: int) -> list[int]:
        """Processes of node `i` that run a shard actor (Ray names them after the class)."""
        import psutil

        pids = []
        for sid in _children_sessions(self.nodes[i].pid):
            for pid in session_pids(sid):
                try:
                    if "ShardServer" in " ".join(psutil.Process(pid).cmdline()):
                        pids.append(pid)
                except psutil.Error:
                    continue
        return pids

    def hang_node(self, i: int, resume: bool = False) -> list[int]:
        """Node `i`'s shard processes stop (SIGSTOP) as a hung GPU or a wedged host would, its Ray node
        still alive; `resume=True` sends SIGCONT. Returns the pids signalled."""
        pids = self.shard_pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT if resume else signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return pids

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs if p.exists())

    # -- teardown --------------------------------------------------------------------
    def stop(self, check: bool = True) -> list[int]:
        """Stop every process; returns (and with `check`, raises on) the pids that had to be killed."""
        procs = [self.coordinator, *self.nodes]
        sessions = [p.pid for p in procs] + [sid for p in procs for sid in _children_sessions(p.pid)]
        for proc in [*self.nodes, self.coordinator]:  # nodes first: they leave the cluster
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        left: list[int] = []
        while time.monotonic() < deadline:
            left = [pid for sid in sessions for pid in session_pids(sid)]
            if not left:
                break
            time.sleep(0.2)
        for pid in left:
            _kill(pid)
        shutil.rmtree(self.root, ignore_errors=True)
        if check and left:
            raise ClusterError(f"processes survived the cluster's shutdown and were killed: {left}")
        return left

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(check=exc[0] is None)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None, append: bool = False) -> subprocess.Popen:
    with log.open("a" if append else "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*EDGETUNE, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**child_env(), **(env or {})}, start_new_session=True)


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
