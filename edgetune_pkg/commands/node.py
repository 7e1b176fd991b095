"""`edgetune node --coordinator HOST:PORT`: join the cluster and stay in the foreground.

1. Ask the coordinator to join (with the edgetune token): it answers with the Ray
   address and Ray's own credentials.
2. `ray start --address ... --block` with edgetune's resource and labels (free
   ports, a temp folder of its own, so several nodes can share a host).
3. Wait; the coordinator places this node's shard actor when a model needs it.
   Ctrl-C (or SIGTERM) leaves the Ray cluster and stops only this node's processes.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

log = logging.getLogger("edgetune.node")


def default_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40].strip("-_.") or "node"
    return f"{host}-{os.getpid()}"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run_node(args) -> int:
    from edgetune.commands.ray_ports import ray_ports_from
    from edgetune.nodes.profile import parse_size
    from edgetune.nodes.ray_join import RayNodeConfig, RayNodeProcess
    from edgetune.runtime.cluster.node_labels import NodeOptions
    from edgetune.runtime.cluster.ray_process import RayAuth
    from edgetune.runtime.compute.kernels import resolve_kernels
    from edgetune.runtime.errors import ConfigError
    from edgetune.runtime.threads import default_threads
    from edgetune.runtime.wire import rpc
    from edgetune.runtime.wire.coordinator_client import CoordinatorClient

    try:
        limit = parse_size(args.memory_limit) if args.memory_limit else 0
    except ValueError as e:
        raise ConfigError(f"--memory-limit: {e}") from None
    options = NodeOptions(name=args.name or default_name(), device=args.device,
                          threads=args.threads or default_threads(), memory_limit_bytes=limit,
                          fetch_weights=args.fetch_weights, shard_port=args.shard_port, dtype=args.dtype,
                          quantize=args.quantize, kernels=args.kernels)
    resolve_kernels(options.kernels, options.device)  # --kernels fused on a CPU: say so now, not at placement
    token = rpc.load_token(Path(args.token_file).expanduser() if args.token_file else rpc.default_token_path())
    client = CoordinatorClient(args.coordinator, token)
    try:
        reply = client.join(options.name)
    finally:
        client.close()
    auth = RayAuth(reply.ray_auth_mode or "disabled", reply.ray_auth_token or None)
    gpus = 1 if options.device.startswith("cuda") else 0
    config = RayNodeConfig(ray_address=reply.ray_address, name=options.name, auth=auth, num_cpus=options.threads,
                           device="cuda" if gpus else "cpu", num_gpus=gpus, threads=options.threads,
                           memory_limit_bytes=limit or None, labels=options.labels(),
                           temp_dir=Path(args.temp_dir) if args.temp_dir else None, node_ip=args.node_ip,
                           ports=ray_ports_from(args))
    node = RayNodeProcess(config)
    print(f"edgetune node {options.name}: joining {reply.ray_address} ({options.device}, dtype {options.dtype}, weights {options.quantize}, "
          f"kernels {options.kernels}, {options.threads} threads"
          f"{f', memory limit {args.memory_limit}' if limit else ''}); Ctrl-C leaves", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` leaves as cleanly as Ctrl-C
    code = node.run_until_interrupted()
    print(f"edgetune node {options.name}: left the cluster", flush=True)
    return code
