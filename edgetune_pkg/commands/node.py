"""`edgetune node --join STRING` (once; later just `edgetune node`): join the cluster and stay in
the foreground.

0. With --join: fetch the CA from the coordinator's join port, check it against the string's
   pin, and trade the token and a CSR for this node's certificate (kept in --credentials).
1. Ask the coordinator to join (mutual TLS): it answers with the Ray address and Ray's own
   credentials (a token, and a certificate from the Ray-only CA).
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
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("edgetune.node")


def default_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40].strip("-_.") or "node"
    return f"{host}-{os.getpid()}"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _node_trust(args, name: str):
    """(Trust, coordinator address, node name, credentials folder or None)."""
    from edgetune.runtime.errors import ConfigError
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.security.credentials import local_addresses
    from edgetune.runtime.wire import rpc
    from edgetune.runtime.wire.coordinator_client import credentials_for

    if args.insecure:
        from edgetune.commands.trust import INSECURE_WARNING

        log.warning(INSECURE_WARNING)
        if not args.coordinator:
            raise ConfigError("--insecure needs --coordinator HOST:PORT")
        token = rpc.load_token(Path(args.token_file).expanduser() if args.token_file else rpc.default_token_path())
        return Trust.insecure(token), args.coordinator, name, None
    ips = [args.node_ip] if args.node_ip else local_addresses()
    creds = credentials_for("node", args.credentials, args.join or "", name, ips)
    held = creds.info.name
    if args.name and args.name != held:
        raise ConfigError(f"--name {args.name!r}: the credentials in {creds.folder} are node {held!r}'s; a node's name "
                          "is the one it joined with")
    return creds.trust(), args.coordinator or creds.coordinator, held, creds.folder


def _ray_tls(reply, folder: Path):
    """Ray's TLS files from the Join reply, beside the node's credentials (key 0600)."""
    from edgetune.runtime.cluster.ray_process import RayTLS

    return RayTLS.write(folder / "ray-tls", reply.ray_tls_cert, reply.ray_tls_key, reply.ray_tls_ca)


def run_node(args) -> int:
    from edgetune.commands.ray_ports import ray_ports_from
    from edgetune.nodes.profile import parse_size
    from edgetune.nodes.ray_join import RayNodeConfig, RayNodeProcess
    from edgetune.runtime.cluster.node_labels import NodeOptions
    from edgetune.runtime.cluster.ray_process import RayAuth
    from edgetune.runtime.compute.kernels import resolve_kernels
    from edgetune.runtime.errors import ConfigError
    from edgetune.runtime.threads import default_threads
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
    trust, address, name, folder = _node_trust(args, options.name)
    options = replace(options, name=name)
    client = CoordinatorClient(address, trust)
    try:
        reply = client.join(options.name)
    finally:
        client.close()
    auth = RayAuth(reply.ray_auth_mode or "disabled", reply.ray_auth_token or None)
    tls = _ray_tls(reply, folder) if reply.ray_tls_cert else None
    gpus = 1 if options.device.startswith("cuda") else 0
    config = RayNodeConfig(ray_address=reply.ray_address, name=options.name, auth=auth, num_cpus=options.threads,
                           device="cuda" if gpus else "cpu", num_gpus=gpus, threads=options.threads,
                           memory_limit_bytes=limit or None, labels=options.labels(),
                           temp_dir=Path(args.temp_dir) if args.temp_dir else None, node_ip=args.node_ip,
                           ports=ray_ports_from(args), tls=tls)
    node = RayNodeProcess(config)
    print(f"edgetune node {options.name}: joining {reply.ray_address} ({options.device}, dtype {options.dtype}, weights {options.quantize}, "
          f"kernels {options.kernels}, {options.threads} threads"
          f"{f', memory limit {args.memory_limit}' if limit else ''}); Ctrl-C leaves", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` leaves as cleanly as Ctrl-C
    code = node.run_until_interrupted()
    print(f"edgetune node {options.name}: left the cluster", flush=True)
    return code
