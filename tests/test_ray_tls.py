"""Ray's own mutual TLS (`RayTLS`): the files, the environment every Ray process gets, and a real
head + node whose channels only a driver holding a certificate from the same Ray-only CA can use.

Unit tests start no Ray. The slow tests start one head + 1 node on this host, each from the
production classes, and run their drivers in subprocesses: this process may already be the
driver of the session's cluster (`ray_cluster`), and a driver's TLS settings live in its
os.environ.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgetune.nodes.ray_join import node_resource
from edgetune.runtime.cluster.ray_process import (
    TLS_ENV_VARS,
    RayAuth,
    RayTLS,
    ray_env,
    ray_tls_sans,
    session_pids,
)
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.security.ca import Authority, describe, load_cert
from edgetune.tests.procs import stop_process

TOKEN = "ab" * 32
REFUSED_DRIVER_WAIT_S = 15.0  # a refused driver hangs in Ray's GCS connect retries (~40 s) rather than failing


def _ray_tls(ca: Authority, directory: Path) -> RayTLS:
    """A Ray certificate for this host from `ca`, written to `directory`."""
    ips, dns = ray_tls_sans()
    cert, key = ca.issue_keypair(f"ray-{dns[-1]}", "node", ips=ips, dns=dns, valid_s=3600)
    return RayTLS.write(directory, cert, key, ca.cert_pem)


# -- files and environment ------------------------------------------------------------
def test_ray_tls_reports_every_bad_file_at_once(tmp_path):
    (tmp_path / "cert.der").write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ConfigError) as err:
        RayTLS(tmp_path / "cert.der", tmp_path / "missing.key", tmp_path)  # a folder cannot be read, even by root
    message = str(err.value)
    assert "cert_file" in message and "is not PEM" in message
    assert "key_file" in message and "does not exist" in message
    assert "ca_file" in message and "is not readable" in message


def test_ray_tls_writes_owner_only_files_and_sets_absolute_paths(tmp_path, monkeypatch):
    ca = Authority.create("ray")
    tls = _ray_tls(ca, tmp_path / "tls")
    for path in (tls.cert_file, tls.key_file, tls.ca_file):
        assert path.is_absolute() and path.stat().st_mode & 0o077 == 0, path
    assert tls.ca_file.read_bytes() == ca.cert_pem and ca.signed(load_cert(tls.cert_file.read_bytes(), "cert"))
    assert tls.env() == {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(tls.cert_file),
                         "RAY_TLS_SERVER_KEY": str(tls.key_file), "RAY_TLS_CA_CERT": str(tls.ca_file)}
    monkeypatch.chdir(tmp_path)  # relative paths are made absolute: Ray's processes need not share this directory
    assert RayTLS(Path("tls/ray.crt"), Path("tls/ray.key"), Path("tls/ray-ca.crt")) == tls


def test_ray_tls_sans_name_this_host_as_ray_sees_it():
    from ray._common.network_utils import node_ip_address_from_perspective

    ips, dns = ray_tls_sans()
    assert "127.0.0.1" in ips and node_ip_address_from_perspective() in ips and "localhost" in dns
    cert, _ = Authority.create("ray").issue_keypair("ray-host", "node", ips=ips, dns=dns, valid_s=60)
    assert set(ips) <= set(describe(cert).ips)


def test_ray_env_replaces_inherited_tls():
    base = {"PATH": "/bin", "RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": "/old.crt", "RAY_TLS_SERVER_KEY": "/old.key",
            "RAY_TLS_CA_CERT": "/old-ca.crt"}
    plain = ray_env(RayAuth("token", TOKEN), base)
    assert not set(TLS_ENV_VARS) & set(plain) and plain["RAY_AUTH_TOKEN"] == TOKEN


def test_ray_env_gives_tls(tmp_path):
    tls = _ray_tls(Authority.create("ray"), tmp_path)
    env = ray_env(RayAuth.disabled(), {"PATH": "/bin", "RAY_TLS_CA_CERT": "/old-ca.crt"}, tls=tls)
    assert env == {"PATH": "/bin", "RAY_AUTH_MODE": "disabled", **tls.env(), "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


# -- a real cluster -------------------------------------------------------------------
DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import ray
    from edgetune.coordinator.ray_head import join_existing
    from edgetune.runtime.cluster.ray_process import RayAuth, RayTLS
    address, token, files, resource = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    join_existing(address, RayAuth("token", token), tls=RayTLS(*map(Path, files)) if files else None)

    @ray.remote(num_cpus=0, resources={resource: 1})
    def add_one(x):
        return x + 1

    print("RESULT", ray.get(add_one.remote(41), timeout=60), flush=True)
""")


class Driver:
    """A Ray driver (`join_existing`, then one task on node0) in a subprocess of its own."""

    def __init__(self, cluster, tls: RayTLS | None, log: Path):
        files = [str(tls.cert_file), str(tls.key_file), str(tls.ca_file)] if tls else []
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER, cluster.address, cluster.auth.token, json.dumps(files),
                 node_resource("node0")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, deadline: float) -> tuple[int | None, str]:
        """Wait until `deadline`, then stop the driver: (its exit code, None if it still ran; its output)."""
        try:
            code = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # SIGKILL: a driver stuck in Ray's C++ connect loop ignores SIGTERM, and it leaves nothing behind
            stop_process(self.proc, signal.SIGKILL, timeout_s=5, settle_s=0)
        return code, self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A head + node0 on Ray TLS from one Ray-only CA; (cluster, its TLS, a TLS from another CA)."""
    from edgetune.tests.ray_cluster import start_local_cluster

    certs = tmp_path_factory.mktemp("ray-tls")
    tls = _ray_tls(Authority.create("ray"), certs / "ray")
    other = _ray_tls(Authority.create("another ray"), certs / "other")
    cluster = start_local_cluster(1, tmp_path_factory.mktemp("ray-tls-logs"), connect=False, tls=tls)
    sessions = cluster.session_ids()
    try:
        yield cluster, tls, other
    finally:
        cluster.shutdown()  # raises if any of its processes had to be SIGKILLed
    assert all(session_pids(sid) == [] for sid in sessions)


@pytest.mark.slow
def test_a_driver_with_the_ray_ca_runs_a_task_on_a_tls_node(tls_cluster, tmp_path):
    cluster, tls, _ = tls_cluster
    code, out = Driver(cluster, tls, tmp_path / "driver.log").finish(time.monotonic() + 120)
    assert code == 0 and "RESULT 42" in out, out


@pytest.mark.slow
def test_drivers_without_tls_or_with_another_ca_cannot_use_the_cluster(tls_cluster, tmp_path):
    """Same address and token as the driver above: only the TLS setting differs. Side by side,
    since each hangs in Ray's connect retries until killed."""
    cluster, _, other = tls_cluster
    drivers = {"no TLS": Driver(cluster, None, tmp_path / "plain.log"),
               "another CA": Driver(cluster, other, tmp_path / "other.log")}
    deadline = time.monotonic() + REFUSED_DRIVER_WAIT_S
    for what, driver in drivers.items():
        code, out = driver.finish(deadline)
        assert code != 0 and "RESULT" not in out, f"a driver with {what} used the cluster:\n{out}"
    # gRPC's own words: the driver rejected the head's certificate (the head rejects a plaintext driver silently)
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "other.log").read_text(errors="replace")
