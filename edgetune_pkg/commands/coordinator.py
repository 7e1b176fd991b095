"""`edgetune coordinator`: a Ray head (or a driver of an existing Ray cluster) + the route service.

Runs in the foreground until Ctrl-C / SIGTERM, then stops the shard actors, its
gRPC server and -- when it started one -- its Ray head, and nothing else.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from edgetune.runtime.wire import rpc

log = logging.getLogger("edgetune.coordinator")

PRELOAD_RETRY_S = 5.0
REVOCATION_POLL_S = 0.5  # how often the revocation list is re-read: revoked streams end within ~1 s


def coordinator_token(token_file: str | None, new: bool = False) -> tuple[str, Path]:
    """The cluster token: read from the file, or generated there (mode 0600) when it does not exist."""
    path = Path(token_file).expanduser() if token_file else rpc.default_token_path()
    if path.exists() and not new:
        return rpc.load_token(path), path
    token = rpc.write_token(path)
    log.info("wrote a new cluster token to %s -- give this file to nodes and edges (--token-file)", path)
    return token, path


def _preload(coordinator, model: str, stop: threading.Event) -> None:
    """Place `model` as soon as nodes have joined (retrying quietly until then)."""
    while not stop.is_set():
        try:
            route = coordinator.route(model)
            log.info("pre-loaded %s: %s", model, " -> ".join(f"{h.name}[{h.start},{h.end})" for h in route.hops))
            return
        except Exception as e:  # no nodes yet, or still joining
            log.debug("pre-load of %s not ready: %s", model, e)
            stop.wait(PRELOAD_RETRY_S)


def _ray_tls(authority, host_ips: list[str]):
    """Ray's TLS files for the head and this driver, from the Ray-only CA (under the state folder)."""
    from edgetune.runtime.cluster.ray_process import RayTLS

    cert, key = authority.ray_keypair("ray-coordinator", host_ips)
    return RayTLS.write(authority.folder / "ray-tls", cert, key, authority.ray_ca.cert_pem)


def _trust(args, ips: list[str]):
    """(Trust, ClusterAuthority or None): mutual TLS from the state folder's CA, or --insecure's token."""
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.security.authority import ClusterAuthority, default_state_dir

    if args.insecure:
        from edgetune.commands.trust import INSECURE_WARNING

        log.warning(INSECURE_WARNING)
        token, _ = coordinator_token(args.token_file, args.new_token)
        return Trust.insecure(token), None
    authority = ClusterAuthority(Path(args.state).expanduser() if args.state else default_state_dir())
    cert, key = authority.server_keypair(ips)
    return Trust.mutual(authority.ca.cert_pem, cert, key), authority


def run_coordinator(args) -> int:
    import ray

    from edgetune.commands.ray_ports import ray_ports_from
    from edgetune.coordinator.core import Coordinator
    from edgetune.coordinator.ray_head import RayHead, RayHeadConfig, join_existing
    from edgetune.coordinator.service import serve
    from edgetune.runtime.cluster.ray_process import RayAuth
    from edgetune.runtime.security.credentials import local_addresses

    ips = sorted({*local_addresses(), *([args.advertise] if _is_ip(args.advertise) else [])})
    trust, authority = _trust(args, ips)
    ray_tls = _ray_tls(authority, ips) if authority is not None and not args.no_ray_tls else None
    head = None
    if args.ray_address:  # the existing cluster's auth comes as Ray's own settings do: RAY_AUTH_MODE / RAY_AUTH_TOKEN
        auth = RayAuth(os.environ.get("RAY_AUTH_MODE", "disabled"), os.environ.get("RAY_AUTH_TOKEN") or None)
        ray_tls = None  # an existing cluster brings its own TLS settings (RAY_USE_TLS ...), or none
        join_existing(args.ray_address, auth)
        ray_address, ray_token, ray_mode = args.ray_address, auth.token or "", auth.mode
    else:
        head = RayHead(RayHeadConfig(port=args.ray_port, temp_dir=Path(args.temp_dir) if args.temp_dir else None,
                                     host=args.advertise, ports=ray_ports_from(args), tls=ray_tls))
        ray_address = head.start()
        head.connect()
        ray_token, ray_mode = head.auth_token or "", head.auth.mode
    coordinator = Coordinator(trust, ray_address, ray_token, ray_mode, authority=authority, ray_tls=ray_tls is not None,
                              ban_s=args.ban_s)
    join_port = None if authority is None else (args.join_port if args.join_port is not None
                                                else (args.port + 1 if args.port else 0))
    server, port, joined_port = serve(coordinator, args.host, args.port, join_port=join_port)
    stop = threading.Event()
    if args.model:
        threading.Thread(target=_preload, args=(coordinator, args.model, stop), daemon=True).start()
    host = args.advertise or (args.host if args.host not in ("0.0.0.0", "::", "") else ray_address.rsplit(":", 1)[0])
    coordinator.address = f"{host}:{port}"
    print(f"edgetune coordinator listening on {args.host}:{port} (reach it as {host}:{port})", flush=True)
    print(f"  Ray cluster: {ray_address}{' (started here)' if head else ''}"
          f"{', Ray TLS from a Ray-only CA' if ray_tls else ''}", flush=True)
    if authority is None:
        print("  INSECURE: plaintext gRPC with a shared token (loopback development only)", flush=True)
        print(f"  nodes join with: edgetune node --insecure --coordinator {host}:{port} --token-file "
              f"{args.token_file or rpc.default_token_path()}", flush=True)
    else:
        authority.set_listening(f"{host}:{port}", f"{host}:{joined_port}")
        print(f"  mutual TLS; cluster CA sha256:{authority.ca.fingerprint} in {authority.folder}", flush=True)
        print(f"  joiners (TLS, no certificate yet) on port {joined_port}", flush=True)
        print("  nodes join with: edgetune node --join \"$(edgetune token create --role node --quiet"
              f"{_state_flag(args)})\"", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(REVOCATION_POLL_S):
            _pick_up_revocations(coordinator)
    finally:
        print("edgetune coordinator: stopping", flush=True)
        coordinator.shutdown()
        server.stop(grace=2.0).wait(5.0)
        ray.shutdown()
        if head is not None:
            head.stop()
        time.sleep(0.1)
    return 0


def _pick_up_revocations(coordinator) -> None:
    try:
        coordinator.check_revocations()
    except Exception as e:  # a damaged revoked.json: say so, keep serving with the list it had
        log.error("cannot read the revocation list: %s", e)


def _state_flag(args) -> str:
    return f" --state {args.state}" if args.state else ""


def _is_ip(text: str | None) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text or "")
    except ValueError:
        return False
    return True
