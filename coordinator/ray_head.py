"""The coordinator's Ray head: `ray start --head --block` as a supervised child,
or a driver connection to a Ray cluster someone else runs (`--ray-address`).

    with RayHead(RayHeadConfig(temp_dir=Path("/tmp/et-head"))) as head:
        address = head.address          # "10.0.0.5:41227" -- Ray reports the routable IP
        head.connect()                  # ray.init(address, namespace="edgetune") here
        token = head.auth_token         # hand to joining nodes in the Join reply

With `RayHeadConfig(tls=RayTLS(...))` every channel of the head, and the
driver, run Ray's mutual TLS; the nodes must then get certificates from the
same Ray-only CA (`RayNodeConfig.tls`).

Node-death detection is the GCS's health check of every raylet, so its
settings live here: a node whose processes die is declared dead after about
`health_check_period_ms * health_check_failure_threshold`; one that hangs
(host unreachable) after up to `(period + timeout) * threshold`.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.runtime.cluster.ray_process import (
    AUTH_MODES,
    RayAuth,
    RayPorts,
    RayProcess,
    RayStartError,
    RayTLS,
    check_temp_dir,
    connect_driver,
    logger,
    ray_env,
)
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.wire.ports import free_port

NAMESPACE = "edgetune"


@dataclass(frozen=True)
class RayHeadConfig:
    """How the coordinator starts its Ray head. All times carry their unit in the name."""

    host: str | None = None  # --node-ip-address; None = Ray picks. Ray rewrites 127.0.0.1 to the routable IP.
    port: int = 0  # GCS port; 0 = Ray binds an OS-assigned one
    temp_dir: Path | None = None  # Ray's --temp-dir; <= 40 chars (unix sockets). None = a fresh /tmp/et-head-*
    num_cpus: int = 0  # the head hosts no shards by default
    auth_mode: str = "token"  # "token": Ray's token auth (token handed to nodes); "disabled"
    tls: RayTLS | None = None  # Ray's mutual TLS for the head and the driver; None = plaintext
    health_check_period_ms: int = 1000
    health_check_timeout_ms: int = 1000
    health_check_failure_threshold: int = 4
    health_check_initial_delay_ms: int = 1000
    object_store_memory_bytes: int | None = None  # None = Ray's default (30% of RAM, lazily used)
    ports: RayPorts = field(default_factory=RayPorts)
    ray_client_server_port: int = 0  # 0 = pick a free one (Ray refuses 0 here and defaults to a fixed 10001)
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 15.0

    def __post_init__(self) -> None:
        problems = check_temp_dir(self.temp_dir, "temp_dir")
        if self.host in ("0.0.0.0", "::", ""):
            problems.append(f"host {self.host!r} is not an address other nodes can reach; give this host's IP")
        for name in ("port", "ray_client_server_port"):
            value = getattr(self, name)
            if not (value == 0 or 1024 <= value <= 65535):
                problems.append(f"{name} must be 0 (pick) or 1024..65535, got {value}")
        if self.num_cpus < 0:
            problems.append(f"num_cpus must be >= 0, got {self.num_cpus}")
        if self.auth_mode not in AUTH_MODES:
            problems.append(f"auth_mode must be one of {AUTH_MODES}, got {self.auth_mode!r}")
        for name in ("health_check_period_ms", "health_check_timeout_ms", "health_check_failure_threshold"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.health_check_initial_delay_ms < 0:
            problems.append(f"health_check_initial_delay_ms must be >= 0, got {self.health_check_initial_delay_ms}")
        if self.object_store_memory_bytes is not None and self.object_store_memory_bytes < 78643200:
            problems.append(f"object_store_memory_bytes must be >= 75 MiB (Ray's minimum), got {self.object_store_memory_bytes}")
        if self.ready_timeout_s <= 0 or self.stop_grace_s < 0:
            problems.append("ready_timeout_s must be > 0 and stop_grace_s >= 0")
        if problems:
            raise ConfigError("invalid Ray head config: " + "; ".join(problems))

    def system_config(self) -> dict[str, int]:
        """Ray `_system_config` entries for the GCS (JSON for `--system-config`)."""
        return {
            "health_check_period_ms": self.health_check_period_ms,
            "health_check_timeout_ms": self.health_check_timeout_ms,
            "health_check_failure_threshold": self.health_check_failure_threshold,
            "health_check_initial_delay_ms": self.health_check_initial_delay_ms,
        }


def build_head_command(config: RayHeadConfig, *, temp_dir: Path, client_port: int, python: str = sys.executable) -> list[str]:
    """The `ray start --head --block` command line for `config` (pure; nothing is started)."""
    cmd = [
        python, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--port", str(config.port),
        "--temp-dir", str(temp_dir),
        "--num-cpus", str(config.num_cpus),
        "--num-gpus", "0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--ray-client-server-port", str(client_port),
        "--system-config", json.dumps(config.system_config(), sort_keys=True),
        *config.ports.flags(),
    ]
    if config.host is not None:
        cmd += ["--node-ip-address", config.host]
    if config.object_store_memory_bytes is not None:
        cmd += ["--object-store-memory", str(config.object_store_memory_bytes)]
    return cmd


class RayHead:
    """A Ray head run by the coordinator: starts it, connects the driver, stops only its own processes."""

    def __init__(self, config: RayHeadConfig, auth: RayAuth | None = None, *, log_path: Path | None = None):
        if auth is None:
            auth = RayAuth.generate() if config.auth_mode == "token" else RayAuth.disabled()
        if auth.mode != config.auth_mode:
            raise ConfigError(f"RayHead: auth mode {auth.mode!r} does not match config.auth_mode {config.auth_mode!r}")
        self.config = config
        self.auth = auth
        self._log_path = log_path
        self._process: RayProcess | None = None
        self._connected = False

    @property
    def auth_token(self) -> str | None:
        """The token nodes and drivers need (None when auth is disabled)."""
        return self.auth.token

    @property
    def address(self) -> str | None:
        """The GCS address "ip:port" other nodes join, once started."""
        return None if self._process is None else self._process.address

    @property
    def pid(self) -> int | None:
        """pid of `ray start`; also the session id of every process of this head."""
        return None if self._process is None else self._process.pid

    def start(self) -> str:
        """Start the head and block until it is up; returns its address."""
        if self._process is not None:
            raise RayStartError(f"Ray head already started at {self.address}")
        temp_dir = self.config.temp_dir or Path(tempfile.mkdtemp(prefix="et-head-", dir="/tmp"))
        client_port = self.config.ray_client_server_port or free_port("0.0.0.0")
        argv = build_head_command(self.config, temp_dir=temp_dir, client_port=client_port)
        self._process = RayProcess(
            argv, env=ray_env(self.auth, tls=self.config.tls), temp_dir=temp_dir,
            log_path=self._log_path or temp_dir / "ray_start_head.log", label="ray head",
        )
        logger.info("ray head: starting (temp dir %s, auth %s, TLS %s, health check every %d ms, "
                    "dead after %d misses)", temp_dir, self.auth.mode, "on" if self.config.tls else "off",
                    self.config.health_check_period_ms, self.config.health_check_failure_threshold)
        return self._process.start(self.config.ready_timeout_s)

    def connect(self, namespace: str = NAMESPACE) -> None:
        """Connect this process to the head as a Ray driver (`ray.init`)."""
        if self.address is None:
            raise RayStartError("RayHead.connect(): start() the head first")
        connect_driver(self.address, self.auth, namespace, tls=self.config.tls)
        self._connected = True

    def stop(self) -> list[int]:
        """Disconnect the driver if `connect()` made one, then stop the head's processes.

        Only this head's session is signalled: nodes and other Ray clusters on
        the host are untouched. Returns pids that had to be SIGKILLed.
        """
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
        return [] if self._process is None else self._process.stop(self.config.stop_grace_s)

    def __enter__(self) -> RayHead:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def join_existing(address: str, auth: RayAuth, namespace: str = NAMESPACE, tls: RayTLS | None = None) -> None:
    """`--ray-address`: start no head, connect this process as a driver of an existing cluster.

    The cluster's auth mode and token must be given, and its TLS files where it
    runs TLS (Ray reads them from this process's environment; they are set
    here). Ray requires a Ray node on this host for the driver to attach to.
    """
    connect_driver(address, auth, namespace, tls=tls)
