"""One `ray start ... --block` process, supervised: the plumbing the coordinator's
Ray head (`edgetune.coordinator.ray_head`) and a worker node
(`edgetune.nodes.ray_join`) share.

What it guarantees (each checked against Ray 2.60, see notes/ray_findings.md):

- **Own session.** The child runs in a new session (`setsid`), so the
  terminal's Ctrl-C reaches edgetune, not Ray; edgetune then leaves cleanly.
  Ray's processes (gcs_server, raylet, agents) share that session's process
  group; Ray's workers call `setpgid` and get groups of their own but stay in
  the session -- so "everything this node started" is "every process whose
  session id is the child's pid", and nothing else on the host (other nodes,
  another user's head) is ever signalled. Never `ray stop`: it kills every Ray
  process on the host.
- **Clean leave.** `stop()` sends SIGTERM to `ray start` alone. With
  `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0` (set in the child's environment) it
  skips Ray's node drain -- which waits up to 30 s for busy workers to go idle,
  and shard actors never do -- and SIGTERMs its raylet, which tells the GCS it
  is leaving: the node is marked dead at once ("received SIGTERM"). Whatever
  is left after `grace_s` is SIGKILLed by session.
- **Fate sharing.** The child gets `PR_SET_PDEATHSIG=SIGTERM`: if the edgetune
  process dies (even by SIGKILL), the node still leaves. Ray itself
  fate-shares its children with `ray start` the same way, and workers die with
  their raylet. Caveat: Linux fires it when the *thread* that spawned the
  child exits -- start Ray processes from a long-lived thread.
- **Auth.** Ray 2.60's token auth is configured only through the environment:
  `RAY_AUTH_MODE` (`token` | `disabled`) and the token in `RAY_AUTH_TOKEN`
  (or a file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`). Every
  process of a cluster must agree. Left unset, `ray start --head` turns auth
  on only if `~/.ray/auth_token` happens to exist and a driver leaves it off,
  so children always get the mode set explicitly.
- **TLS.** Ray 2.60 puts mutual TLS on all of its own gRPC channels when every
  process has `RAY_USE_TLS=1` and the PEM files `RAY_TLS_SERVER_CERT`,
  `RAY_TLS_SERVER_KEY`, `RAY_TLS_CA_CERT` (`RayTLS`): each process serves and
  calls with that certificate and requires the peer's to be signed by the CA.
  Like auth, inherited settings are replaced, never merged.

Linux only: fate sharing uses prctl and the session sweep reads /proc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.runtime.atomic import atomic_write
from edgetune.runtime.errors import ConfigError, EdgetuneError

logger = logging.getLogger("edgetune.ray")

AUTH_MODES = ("token", "disabled")
TLS_ENV_VARS = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
# Ray writes "<ip>:<gcs port>" here once `ray start` has finished starting.
READY_FILE = "ray_current_cluster"
# A unix socket path holds at most 107 bytes; Ray puts its sockets at
# <temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (~65 bytes).
MAX_TEMP_DIR_BYTES = 40
_TOKEN_RE = re.compile(r"[0-9A-Za-z_\-.]{16,512}")
_PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: a forked child of a threaded process must not dlopen/dlsym.
# Linux only (as is /proc, which session_pids reads); elsewhere there is no fate sharing.
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
if _PRCTL is not None:
    _PRCTL.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _PRCTL.restype = ctypes.c_int


class RayStartError(EdgetuneError):
    """A Ray process did not come up, or the cluster could not be reached."""


@dataclass(frozen=True)
class RayAuth:
    """How every process of one Ray cluster authenticates. The token never shows in repr."""

    mode: str = "token"
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in AUTH_MODES:
            raise ConfigError(f"Ray auth mode {self.mode!r} is not one of {AUTH_MODES}")
        if self.mode == "token" and (self.token is None or not _TOKEN_RE.fullmatch(self.token)):
            raise ConfigError(
                "Ray auth mode 'token' needs a token of 16-512 characters [0-9A-Za-z_-.]; "
                "generate one with RayAuth.generate() or use mode 'disabled'"
            )
        if self.mode == "disabled" and self.token is not None:
            raise ConfigError("Ray auth mode 'disabled' takes no token; drop the token or use mode 'token'")

    @classmethod
    def generate(cls) -> RayAuth:
        """Token auth with a fresh 256-bit token (the same strength Ray generates)."""
        return cls("token", secrets.token_hex(32))

    @classmethod
    def disabled(cls) -> RayAuth:
        return cls("disabled", None)

    def env(self) -> dict[str, str]:
        """The environment variables that give a Ray process this auth setting."""
        env = {"RAY_AUTH_MODE": self.mode}
        if self.token is not None:
            env["RAY_AUTH_TOKEN"] = self.token
        return env


@dataclass(frozen=True)
class RayTLS:
    """Mutual TLS on Ray's own channels (GCS, raylets, workers, agents, drivers): three PEM files.

    Every process of the cluster gets `env()`; each then serves and calls with
    `cert_file` and accepts a peer only with a certificate `ca_file` signed.
    Keep `ca_file` a CA for Ray alone, apart from edgetune's own CA: whoever
    holds a certificate it signed can join Ray and run code on every node.
    Its certificate must name the node's IP as a SAN: Ray dials every process
    at its node's IP, and peers check the name (a certificate without it stalls
    `ray start` with "No match found for server name: <ip>" in its log).
    `ray_tls_sans()` lists this host's addresses. Example::

        tls = RayTLS(Path("/etc/et/ray.crt"), Path("/etc/et/ray.key"), Path("/etc/et/ray-ca.crt"))
        head = RayHead(RayHeadConfig(tls=tls))
    """

    cert_file: Path
    key_file: Path
    ca_file: Path

    def __post_init__(self) -> None:
        problems = []
        for name in ("cert_file", "key_file", "ca_file"):
            path = Path(getattr(self, name)).absolute()  # Ray's workers need not run in this directory
            object.__setattr__(self, name, path)
            problems += _pem_problems(path, name)
        if problems:
            raise ConfigError("invalid Ray TLS files: " + "; ".join(problems))

    @classmethod
    def write(cls, directory: Path, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> RayTLS:
        """Save a Ray certificate, its key and the Ray CA's certificate (PEM) in `directory` as
        ray.crt, ray.key and ray-ca.crt -- atomically, readable by the owner only; their RayTLS."""
        directory = Path(directory)
        for name, pem in (("ray.crt", cert_pem), ("ray.key", key_pem), ("ray-ca.crt", ca_pem)):
            atomic_write(directory / name, lambda tmp, pem=pem: tmp.write_bytes(pem))  # mkstemp: mode 0600
        return cls(directory / "ray.crt", directory / "ray.key", directory / "ray-ca.crt")

    def env(self) -> dict[str, str]:
        """The environment variables that put a Ray process on this TLS setting."""
        return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(self.cert_file),
                "RAY_TLS_SERVER_KEY": str(self.key_file), "RAY_TLS_CA_CERT": str(self.ca_file)}


def _pem_problems(path: Path, what: str) -> list[str]:
    """Why `path` cannot be one of Ray's TLS files (empty when fine): Ray itself fails late and obscurely."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return [f"{what} {str(path)!r} does not exist"]
    except OSError as exc:
        return [f"{what} {str(path)!r} is not readable ({exc.strerror}); check its permissions"]
    if b"-----BEGIN " not in head:
        return [f"{what} {str(path)!r} is not PEM (no '-----BEGIN' line)"]
    return []


def ray_tls_sans() -> tuple[list[str], list[str]]:
    """(IPs, DNS names) for a Ray certificate of this host: each address of this host (Ray dials a
    node at the IP it advertises, whichever that is), 127.0.0.1 and ::1, localhost and the host name."""
    from edgetune.runtime.security.credentials import local_addresses

    ips = ["127.0.0.1", "::1", *local_addresses()]
    return list(dict.fromkeys(ips)), list(dict.fromkeys(["localhost", socket.gethostname()]))


def _is_security_var(key: str) -> bool:
    """Whether `key` decides whom a Ray process trusts (auth or TLS): never inherited."""
    return key.startswith("RAY_AUTH_") or key in TLS_ENV_VARS


def security_env(auth: RayAuth, tls: RayTLS | None = None) -> dict[str, str]:
    """The auth and TLS variables of one cluster (no TLS variable at all when `tls` is None)."""
    return {**auth.env(), **(tls.env() if tls is not None else {})}


def ray_env(auth: RayAuth, base: Mapping[str, str] | None = None, tls: RayTLS | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) made fit for a Ray child process.

    Inherited auth and TLS settings and RAY_ADDRESS are replaced, never merged:
    a stray RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token or RAY_USE_TLS must not
    decide which cluster a process can talk to.
    """
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not _is_security_var(k) and k != "RAY_ADDRESS"}
    env.update(security_env(auth, tls))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


def check_temp_dir(temp_dir: Path | None, what: str) -> list[str]:
    """Problems with a Ray `--temp-dir` (empty when fine), for a config's error list."""
    if temp_dir is None:
        return []
    if not Path(temp_dir).is_absolute():
        return [f"{what} must be an absolute path, got {str(temp_dir)!r}"]
    if len(str(temp_dir).encode()) > MAX_TEMP_DIR_BYTES:
        size = len(str(temp_dir).encode())
        return [(f"{what} {str(temp_dir)!r} is {size} bytes; Ray's unix sockets live under it "
                 f"and need it <= {MAX_TEMP_DIR_BYTES} bytes (e.g. /tmp/et-node-a)")]
    return []


@dataclass(frozen=True)
class RayPorts:
    """The ports one Ray node (a raylet with its agents) binds; 0 = Ray binds an OS-assigned port.

    0 is race-free and lets several nodes share a host; set explicit ports only
    where a firewall needs them. `min_worker_port = max_worker_port = 0` gives
    each worker an OS-assigned port; Ray's own default (10002-19999 for every
    node) would have co-located nodes hand out the same ports.
    """

    node_manager_port: int = 0
    object_manager_port: int = 0
    runtime_env_agent_port: int = 0
    dashboard_agent_grpc_port: int = 0
    dashboard_agent_listen_port: int = 0  # Ray's default is a fixed 52365: two nodes clash
    metrics_export_port: int = 0
    min_worker_port: int = 0
    max_worker_port: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid Ray ports: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = [
            f"{name} must be 0 (pick) or 1024..65535, got {value}"
            for name, value in vars(self).items()
            if not (value == 0 or 1024 <= value <= 65535)
        ]
        lo, hi = self.min_worker_port, self.max_worker_port
        if (lo == 0) != (hi == 0) or (lo and hi <= lo):
            out.append(f"worker ports must both be 0 or satisfy min < max, got {lo}..{hi}")
        return out

    def flags(self) -> list[str]:
        """The `ray start` flags that set these ports."""
        out: list[str] = []
        for name, value in vars(self).items():
            out += ["--" + name.replace("_", "-"), str(value)]
        return out


def _set_pdeathsig() -> None:
    """Runs in the child between fork and exec: SIGTERM it when its parent thread dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of `pid` from /proc, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ..." -- comm may contain spaces and ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes in session `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == sid and stat[0] != "Z":
                out.append(int(entry))
    return out


class RayProcess:
    """One `ray start ... --block` child in a session of its own.

    `ready_file` is `<temp_dir>/ray_current_cluster`: Ray writes the cluster
    address there when the start finished, so each process needs its own
    temp dir. Example::

        proc = RayProcess(argv, env=ray_env(auth), temp_dir=Path("/tmp/et-a"),
                          log_path=Path("/tmp/et-a.log"), label="node a")
        address = proc.start(ready_timeout_s=60)
        ...
        proc.stop(grace_s=15)
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], temp_dir: Path, log_path: Path, label: str):
        self.argv = list(argv)
        self.env = dict(env)
        self.temp_dir = Path(temp_dir)
        self.log_path = Path(log_path)
        self.label = label
        self.address: str | None = None
        self._popen: subprocess.Popen | None = None
        self._launched_at = 0.0

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen is not None and _exit_code(self._popen.pid) is None

    def start(self, ready_timeout_s: float) -> str:
        """Launch and block until Ray reports the node started; returns the cluster address."""
        self.launch()
        return self.wait_ready(ready_timeout_s)

    def launch(self) -> None:
        """Spawn `ray start` and return at once (`wait_ready` then blocks until it is up)."""
        if self._popen is not None:
            raise RayStartError(f"{self.label}: already started (pid {self.pid})")
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        (self.temp_dir / READY_FILE).unlink(missing_ok=True)  # a previous run's address must not pass for ready
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._launched_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig,  # noqa: PLW1509 -- async-signal-safe prctl only
            )
        logger.info("%s: ray start pid %d, log %s", self.label, self.pid, self.log_path)

    def wait_ready(self, ready_timeout_s: float, crash_retries: int = 1) -> str:
        """Block until the launched `ray start` reports the node up; returns the cluster address.

        A `ray start` killed by a signal before it is up -- an abort inside Ray's own gRPC
        ("Check failed: wakeup_fd_->ConsumeWakeup()"), seen now and then on a loaded machine --
        is launched again, `crash_retries` times. On any other failure, or a timeout, the
        process is stopped and RayStartError carries its log's tail.
        """
        if self._popen is None:
            raise RayStartError(f"{self.label}: launch() first")
        ready = self.temp_dir / READY_FILE
        try:
            # Ray creates the file, then writes the address into it: wait for the address, not the file
            while not (ready.exists() and ready.read_text().strip()):
                code = _exit_code(self._popen.pid)
                if code is not None and code < 0 and crash_retries > 0:
                    logger.warning("%s: ray start died of signal %d while starting; starting it again",
                                   self.label, -code)
                    self.stop(grace_s=5)
                    self._popen, crash_retries = None, crash_retries - 1
                    self.launch()
                    continue
                if code is not None or time.monotonic() - self._launched_at > ready_timeout_s:
                    why = f"exited with {code}" if code is not None else f"was not up after {ready_timeout_s:.0f} s"
                    raise RayStartError(f"{self.label}: ray start {why}; last lines of {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.1)
        except BaseException:  # a failed start, or Ctrl-C while waiting: leave nothing running
            self.stop(grace_s=5)
            raise
        self.address = ready.read_text().strip()
        logger.info("%s: up in %.1f s, cluster %s", self.label, time.monotonic() - self._launched_at, self.address)
        return self.address

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until `ray start` exits (its exit code, negative for a signal) or `timeout_s` passes (None).

        The exited child is left unreaped, so `stop()` can still find its
        session's stragglers by its pid; call `stop()` afterwards.
        """
        if self._popen is None:
            return None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (code := _exit_code(self._popen.pid)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
        return code

    def stop(self, grace_s: float) -> list[int]:
        """Leave cleanly; SIGKILL whatever of this session is left after `grace_s`.

        Returns the pids that had to be SIGKILLed. Idempotent.
        """
        if self._popen is None or self._popen.returncode is not None:
            return []
        pid = self._popen.pid
        if _exit_code(pid) is None:
            os.kill(pid, signal.SIGTERM)
            _wait_exit(pid, grace_s)
        if _exit_code(pid) is None:
            _killpg(pid)  # the leader's group: gcs_server, raylet, agents
            _wait_exit(pid, 5.0)
        # The exited leader stays an unreaped zombie until the end of this method,
        # so its pid -- the session id -- cannot have been reused by another session.
        stragglers = session_pids(pid)
        for straggler in stragglers:
            _kill(straggler)
        _wait_gone(pid, 5.0)
        self._popen.wait()
        if stragglers:
            logger.warning("%s: SIGKILLed %d leftover Ray processes %s", self.label, len(stragglers), stragglers)
        logger.info("%s: stopped (ray start exit code %s)", self.label, self._popen.returncode)
        return stragglers

    def kill(self) -> None:
        """SIGKILL every process of the session at once: the node vanishes without leaving."""
        if self._popen is None or self._popen.returncode is not None:
            return
        for pid in session_pids(self._popen.pid):
            _kill(pid)
        _wait_gone(self._popen.pid, 5.0)
        self._popen.wait()
        logger.info("%s: killed (SIGKILL to every process of session %d)", self.label, self._popen.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_code(pid: int) -> int | None:
    """Exit code of our child `pid` (negative: killed by that signal), None while it runs.

    Uses WNOWAIT: the child is not reaped, so its pid stays reserved.
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped by someone else (a SIGCHLD handler): gone, code unknown
        return -1
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _wait_exit(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _exit_code(pid) is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_gone(sid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.05)


def set_driver_env(auth: RayAuth, tls: RayTLS | None = None) -> None:
    """Put this process's Ray auth and TLS settings (its os.environ) on `auth` and `tls`.

    A driver's Ray reads them from this process's environment, and caches them
    when `ray` is imported, so inherited ones are replaced and the caches are
    refreshed (private Ray API; an import that fails means a Ray upgrade moved it).
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    for key in [k for k in os.environ if _is_security_var(k)]:
        del os.environ[key]
    os.environ.update(security_env(auth, tls), RAY_USAGE_STATS_ENABLED="0")
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect_driver(address: str, auth: RayAuth, namespace: str = "edgetune", tls: RayTLS | None = None) -> None:
    """`ray.init(address=...)` for this process, with the cluster's auth and TLS settings.

    They are set in this process's environment first (`set_driver_env`). The
    driver must run on a host that has a Ray node: Ray connects it through the
    local raylet (the head's, when several share the host).
    """
    import ray

    if ray.is_initialized():
        raise RayStartError("this process is already connected to a Ray cluster; call ray.shutdown() first")
    set_driver_env(auth, tls)
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    except ConnectionError as exc:
        raise RayStartError(
            f"could not connect to the Ray cluster at {address} ({exc}); check the address, and that its "
            f"auth mode is {auth.mode!r}" + (" with the same token" if auth.token else "")
            + (" and its TLS certificates come from the CA in " + str(tls.ca_file) if tls else " and TLS is off")
        ) from exc
    logger.info("driver connected to Ray cluster %s (namespace %s, auth %s, TLS %s)",
                address, namespace, auth.mode, "on" if tls else "off")
