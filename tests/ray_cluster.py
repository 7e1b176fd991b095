"""A real multi-node Ray cluster on this host for integration tests.

Built from the production classes (RayHead + RayNodeProcess, real `ray start`
processes), with fast health checks so a killed node is declared dead in ~2 s.
Share one per session -- a head + 2 nodes cost ~10 s to start on 2 cores:

    @pytest.fixture(scope="session")
    def ray_cluster(tmp_path_factory):
        with start_local_cluster(2, tmp_path_factory.mktemp("ray")) as cluster:
            yield cluster          # the test process is connected as a driver

    def test_x(ray_cluster):
        ray_cluster.kill_node(1)   # node1 vanishes (SIGKILL), as if its host died

Ray's own `ray.cluster_utils.Cluster` also works here (custom resources and
labels per `add_node`, `remove_node` for death) but runs nodes in-process
rather than through `ray start`, and writes the cluster address to
$RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray), which other Ray users
on the host then pick up; see notes/ray_findings.md.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.coordinator.ray_head import RayHead, RayHeadConfig
from edgetune.nodes.ray_join import RayNodeConfig, RayNodeProcess
from edgetune.runtime.cluster.ray_process import RayAuth, RayTLS
from edgetune.tests.procs import ProcessTree

# Kill detection ~ period * threshold = 2 s; a hung node ~ (period + timeout) * threshold = 10 s.
# The timeout is generous because this 2-core host is shared with other test runs.
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500, "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 4, "health_check_initial_delay_ms": 0,
}
TEST_OBJECT_STORE_BYTES = 128 << 20  # Ray's minimum is 75 MiB; tests move little data


@dataclass
class LocalCluster:
    """A running head + nodes; `shutdown()` leaves no process behind."""

    head: RayHead
    nodes: list[RayNodeProcess]
    temp_root: Path  # short dir holding every Ray --temp-dir (unix socket path limit)
    connected: bool = False
    _down: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return self.head.address

    @property
    def auth(self) -> RayAuth:
        return self.head.auth

    @property
    def node_names(self) -> list[str]:
        return [n.config.name for n in self.nodes]

    def session_ids(self) -> list[int]:
        """Session id (= `ray start` pid) of the head and of every node: all their processes carry one."""
        return [p.pid for p in [self.head, *self.nodes] if p.pid is not None]

    def connect(self, namespace: str = "edgetune") -> None:
        """Make the test process a driver of this cluster."""
        self.head.connect(namespace)
        self.connected = True

    def kill_node(self, i: int) -> None:
        """SIGKILL node i's whole process group and session: it vanishes without leaving."""
        self.nodes[i].kill()

    def stop_node(self, i: int) -> None:
        """Node i leaves cleanly (what Ctrl-C on `edgetune node` does)."""
        self.nodes[i].stop()

    def shutdown(self) -> None:
        """Stop nodes, disconnect, stop the head, remove temp dirs; raise if anything had to be force-killed late.

        Each stop runs even where one before it raised; whatever of the nodes' and the head's
        sessions is still running afterwards is SIGKILLed, then reported.
        """
        if self._down:
            return
        self._down = True
        sessions = self.session_ids()
        try:
            with contextlib.ExitStack() as stops:  # callbacks run last-in first-out: the nodes in order, the head last
                stops.callback(self.head.stop)
                for node in reversed(self.nodes):
                    stops.callback(node.stop)
        finally:
            leftovers = ProcessTree.of(sessions=sessions).kill()
            shutil.rmtree(self.temp_root, ignore_errors=True)
        if leftovers:
            raise RuntimeError(f"Ray processes survived shutdown and were SIGKILLed: {leftovers}")

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _node_options(i: int, node_options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    if node_options is None:
        return {}
    if isinstance(node_options, Mapping):
        return dict(node_options)
    return dict(node_options[i])


def start_local_cluster(
    num_nodes: int,
    tmp_path: Path,
    node_options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    auth_mode: str = "token",
    connect: bool = True,
    head_options: Mapping[str, Any] | None = None,
    tls: RayTLS | None = None,
) -> LocalCluster:
    """Start a head and `num_nodes` nodes named node0.. on this host; connect this process unless told not to.

    `node_options`: RayNodeConfig fields for every node (a mapping) or per node
    (a sequence of mappings), e.g. `{"threads": 2}` or `[{"name": "a"}, {"name": "b"}]`.
    `ray start` logs go to `tmp_path`; Ray's own temp dirs to a short /tmp/et* dir.
    `tls`: Ray's mutual TLS for the head, every node and the driver (all on this host: one certificate).
    """
    temp_root = Path(tempfile.mkdtemp(prefix="et", dir="/tmp"))
    head_config = RayHeadConfig(
        temp_dir=temp_root / "head", auth_mode=auth_mode, tls=tls,
        object_store_memory_bytes=TEST_OBJECT_STORE_BYTES,
        **{**FAST_HEALTH_CHECKS, **(head_options or {})},
    )
    head = RayHead(head_config, log_path=Path(tmp_path) / "ray-head.log")
    cluster = LocalCluster(head=head, nodes=[], temp_root=temp_root)
    try:
        head.start()
        for i in range(num_nodes):
            options = {"name": f"node{i}", "object_store_memory_bytes": TEST_OBJECT_STORE_BYTES,
                       **_node_options(i, node_options)}
            config = RayNodeConfig(ray_address=head.address, auth=head.auth, tls=tls,
                                   temp_dir=temp_root / f"n{i}", **options)
            cluster.nodes.append(RayNodeProcess(config, log_path=Path(tmp_path) / f"ray-{config.name}.log"))
        for node in cluster.nodes:  # side by side: ~3 s in all rather than ~3 s each
            node.start(wait=False)
        for node in cluster.nodes:
            node.wait_ready()
        if connect:
            cluster.connect()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> float:
    """Poll `predicate()` until true; seconds it took. Raises TimeoutError after `timeout_s`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - t0
