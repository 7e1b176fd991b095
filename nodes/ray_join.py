"""A worker node joining the coordinator's Ray cluster: `ray start --address ... --block`
with edgetune's resources and labels, in the foreground, leaving cleanly on Ctrl-C.

Each node advertises
  resources  {"edgetune_node": 1, "edgetune_node:<name>": 1}
  labels     edgetune's node options (`edgetune.runtime.cluster.node_labels`: name,
             device, threads, memory limit, ...)
so the coordinator finds nodes with `ray.nodes()` and pins a shard actor to one
with `resources={"edgetune_node:<name>": 1}`, a NodeAffinitySchedulingStrategy
or `label_selector={LABEL_NAME: name}`.

Several nodes can share a host: every port defaults to 0, which Ray turns into
an OS-assigned port at bind time (race-free), and each node gets a temp dir of
its own.

    node = RayNodeProcess(RayNodeConfig(ray_address="10.0.0.5:41227", name="a", auth=auth))
    node.run_until_interrupted()        # `edgetune node`: joins, blocks, Ctrl-C leaves
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.runtime.cluster.node_labels import NODE_RESOURCE, NodeOptions
from edgetune.runtime.cluster.ray_process import (
    RayAuth,
    RayPorts,
    RayProcess,
    RayStartError,
    RayTLS,
    check_temp_dir,
    logger,
    ray_env,
)
from edgetune.runtime.errors import ConfigError

DEVICES = ("cpu", "cuda")
# A Ray label value: <= 63 chars, alphanumeric at both ends, [-_.] allowed inside.
_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_LABEL_KEY_RE = re.compile(r"([a-z0-9]([a-z0-9.-]*[a-z0-9])?/)?" + _NAME_RE.pattern)
_ADDRESS_RE = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


def node_resource(name: str) -> str:
    """The custom Ray resource only node `name` has: schedule onto it with `resources={...: 1}`."""
    return f"{NODE_RESOURCE}:{name}"


@dataclass(frozen=True)
class RayNodeConfig:
    """How one edgetune node joins Ray. The auth token comes from the coordinator's Join reply."""

    ray_address: str  # "host:port" of the Ray head's GCS
    name: str  # unique per cluster; a Ray label value (<= 63 chars, [A-Za-z0-9_.-])
    auth: RayAuth  # the cluster's mode and token, from the coordinator's Join reply
    tls: RayTLS | None = None  # Ray's mutual TLS: a certificate for this host from the cluster's Ray-only CA
    num_cpus: int = 1
    device: str = "cpu"
    num_gpus: int = 0
    memory_limit_bytes: int | None = None  # edgetune's budget for this node's shard; None = no limit
    threads: int = 1  # torch threads the shard actor uses
    temp_dir: Path | None = None  # Ray's --temp-dir, one per node, <= 40 bytes; None = a fresh /tmp/et-<name>-*
    labels: Mapping[str, str] | None = None  # Ray labels; None = node_labels.NodeOptions(...).labels() of the above
    node_ip: str | None = None  # --node-ip-address this node advertises; None = Ray picks the routable IP
    object_store_memory_bytes: int | None = None  # None = Ray's default (30% of RAM, lazily used)
    ports: RayPorts = field(default_factory=RayPorts)  # 0 = Ray picks; set only where a firewall needs it
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 15.0

    def __post_init__(self) -> None:
        problems = check_temp_dir(self.temp_dir, "temp_dir")
        match = _ADDRESS_RE.fullmatch(self.ray_address)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            problems.append(f"ray_address {self.ray_address!r} is not host:port (the address the coordinator reports)")
        if not _NAME_RE.fullmatch(self.name):
            problems.append(f"name {self.name!r} must be 1-63 characters [A-Za-z0-9_.-], alphanumeric at both ends")
        if self.num_cpus < 0:
            problems.append(f"num_cpus must be >= 0, got {self.num_cpus}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {DEVICES}, got {self.device!r}")
        elif self.device == "cuda" and self.num_gpus < 1:
            problems.append(f"device 'cuda' needs num_gpus >= 1, got {self.num_gpus}")
        elif self.device == "cpu" and self.num_gpus != 0:
            problems.append(f"device 'cpu' takes num_gpus 0, got {self.num_gpus}; use device 'cuda'")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes < 1:
            problems.append(f"memory_limit_bytes must be >= 1 or None, got {self.memory_limit_bytes}")
        if self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if self.object_store_memory_bytes is not None and self.object_store_memory_bytes < 78643200:
            problems.append(f"object_store_memory_bytes must be >= 75 MiB (Ray's minimum), got {self.object_store_memory_bytes}")
        if self.ready_timeout_s <= 0 or self.stop_grace_s < 0:
            problems.append("ready_timeout_s must be > 0 and stop_grace_s >= 0")
        for key, value in (self.labels or {}).items():
            if key.startswith("ray.io/") or not _LABEL_KEY_RE.fullmatch(key) or not (
                    value == "" or _NAME_RE.fullmatch(value)):
                problems.append(f"label {key}={value!r} is not a Ray label (keys [prefix/]name, values <= 63 "
                                "chars [A-Za-z0-9_.-], no 'ray.io/' prefix)")
        if self.node_ip in ("0.0.0.0", "::", ""):
            problems.append(f"node_ip {self.node_ip!r} is not an address other nodes can reach")
        if problems:
            raise ConfigError(f"invalid node config for {self.name!r}: " + "; ".join(problems))

    def resources(self) -> dict[str, float]:
        return {NODE_RESOURCE: 1, node_resource(self.name): 1}

    def ray_labels(self) -> dict[str, str]:
        """The labels `ray start` gets: `labels` as given, else edgetune's standard node labels."""
        if self.labels is not None:
            return dict(self.labels)
        return NodeOptions(name=self.name, device=self.device, threads=self.threads,
                           memory_limit_bytes=self.memory_limit_bytes or 0).labels()


def build_command(config: RayNodeConfig, python: str = sys.executable) -> list[str]:
    """The `ray start --address ... --block` command line for `config` (pure; nothing is started).

    `--temp-dir` appears only when `config.temp_dir` is set; RayNodeProcess
    always sets it (a node without its own temp dir would share the head's).
    """
    labels = ",".join(f"{k}={v}" for k, v in config.ray_labels().items())
    cmd = [
        python, "-m", "ray.scripts.scripts", "start", "--block",
        "--address", config.ray_address,
        "--node-name", config.name,
        "--num-cpus", str(config.num_cpus),
        "--num-gpus", str(config.num_gpus),  # explicit 0 on cpu nodes: no GPU autodetection
        "--resources", json.dumps(config.resources()),
        "--labels", labels,
        "--disable-usage-stats",
        *config.ports.flags(),
    ]
    if config.temp_dir is not None:
        cmd += ["--temp-dir", str(config.temp_dir)]
    if config.node_ip is not None:
        cmd += ["--node-ip-address", config.node_ip]
    if config.object_store_memory_bytes is not None:
        cmd += ["--object-store-memory", str(config.object_store_memory_bytes)]
    return cmd


class RayNodeProcess:
    """One edgetune node's `ray start --block`: join, wait, leave -- touching only its own processes."""

    def __init__(self, config: RayNodeConfig, *, log_path: Path | None = None):
        if config.temp_dir is None:
            temp_dir = Path(tempfile.mkdtemp(prefix=f"et-{config.name[:12]}-", dir="/tmp"))
            config = dataclasses.replace(config, temp_dir=temp_dir)
        self.config = config
        self.command = build_command(config)
        self.log_path = log_path or config.temp_dir / "ray_start_node.log"
        self._process = RayProcess(
            self.command, env=ray_env(config.auth, tls=config.tls), temp_dir=config.temp_dir,
            log_path=self.log_path, label=f"node {config.name}",
        )

    @property
    def pid(self) -> int | None:
        """pid of `ray start`; also the session id of every process of this node."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.alive

    def start(self, wait: bool = True) -> None:
        """Join the cluster; with `wait`, return once Ray reports the node up (RayStartError otherwise).

        `start(wait=False)` then `wait_ready()` lets several nodes start side by side.
        """
        c = self.config
        logger.info("node %s: joining Ray cluster %s (%d CPU, %s x%d, %d threads, memory limit %s, auth %s, TLS %s)",
                    c.name, c.ray_address, c.num_cpus, c.device, c.num_gpus, c.threads,
                    "none" if c.memory_limit_bytes is None else f"{c.memory_limit_bytes} B", c.auth.mode,
                    "on" if c.tls else "off")
        self._process.launch()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until a `start(wait=False)` node is up (RayStartError when it fails or times out)."""
        self._process.wait_ready(self.config.ready_timeout_s)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the node's `ray start` exits (its exit code) or `timeout_s` passes (None)."""
        return self._process.wait(timeout_s)

    def stop(self) -> list[int]:
        """Leave the cluster cleanly (the GCS marks the node dead at once); returns pids SIGKILLed."""
        if self._process.alive:
            logger.info("node %s: leaving Ray cluster", self.config.name)
        return self._process.stop(self.config.stop_grace_s)

    def kill(self) -> None:
        """SIGKILL all of this node's processes at once (a vanished node; tests use it)."""
        self._process.kill()

    def run_until_interrupted(self) -> int:
        """`edgetune node`'s foreground loop: join, block until Ctrl-C or Ray exits, leave. Exit code.

        Ctrl-C reaches this process only (Ray runs in a session of its own), at
        any moment -- even while joining -- and always ends in `stop()`.
        """
        try:
            self.start()
            code = self.wait()
            logger.error("node %s: ray start exited by itself with %s; log %s:\n%s",
                         self.config.name, code, self.log_path, self._process.log_tail())
            return 1
        except KeyboardInterrupt:
            logger.info("node %s: interrupted", self.config.name)
            return 0
        finally:
            self.stop()

    def __enter__(self) -> RayNodeProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["NODE_RESOURCE", "RayNodeConfig", "RayNodeProcess", "RayStartError", "build_command", "node_resource"]
