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


def run_coordinator(args) -> int:
    import ray

    from edgetune.commands.ray_ports import ray_ports_from
    from edgetune.coordinator.core import Coordinator
    from edgetune.coordinator.ray_head import RayHead, RayHeadConfig, join_existing
    from edgetune.coordinator.service import serve
    from edgetune.runtime.cluster.ray_process import RayAuth

    token, token_path = coordinator_token(args.token_file, args.new_token)
    head = None
    if args.ray_address:  # the existing cluster's auth comes as Ray's own settings do: RAY_AUTH_MODE / RAY_AUTH_TOKEN
        auth = RayAuth(os.environ.get("RAY_AUTH_MODE", "disabled"), os.environ.get("RAY_AUTH_TOKEN") or None)
        join_existing(args.ray_address, auth)
        ray_address, ray_token, ray_mode = args.ray_address, auth.token or "", auth.mode
    else:
        head = RayHead(RayHeadConfig(port=args.ray_port, temp_dir=Path(args.temp_dir) if args.temp_dir else None,
                                     host=args.advertise, ports=ray_ports_from(args)))
        ray_address = head.start()
        head.connect()
        ray_token, ray_mode = head.auth_token or "", head.auth.mode
    coordinator = Coordinator(token, ray_address, ray_token, ray_mode)
    server, port = serve(coordinator, args.host, args.port)
    stop = threading.Event()
    if args.model:
        threading.Thread(target=_preload, args=(coordinator, args.model, stop), daemon=True).start()
    host = args.advertise or (args.host if args.host not in ("0.0.0.0", "::", "") else ray_address.rsplit(":", 1)[0])
    print(f"edgetune coordinator listening on {args.host}:{port} (reach it as {host}:{port})", flush=True)
    print(f"  Ray cluster: {ray_address}{' (started here)' if head else ''}", flush=True)
    print(f"  token file: {token_path}", flush=True)
    print(f"  nodes join with: edgetune node --coordinator {host}:{port} --token-file {token_path}", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("edgetune coordinator: stopping", flush=True)
        coordinator.shutdown()
        server.stop(grace=2.0).wait(5.0)
        ray.shutdown()
        if head is not None:
            head.stop()
        time.sleep(0.1)
    return 0
