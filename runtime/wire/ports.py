"""Pick free TCP ports for servers edgetune starts (gRPC services, Ray processes).

Race caveat: a port is free only at the moment it is probed. Between this
function returning and the server binding it, another process on the host may
take it, and the server's bind then fails. Prefer letting the server bind port
0 itself and reporting the port it got (gRPC's `add_insecure_port("[::]:0")`,
Ray's `--node-manager-port 0`) -- that is race-free. Use these functions only
where a port must be known *before* the server starts (a port flag that refuses
0, a port written into another process's command line).

A port free on 127.0.0.1 may still be taken on another interface; probe
`host="0.0.0.0"` when the server will bind all interfaces (Ray's servers do).
"""
from __future__ import annotations

import random
import socket
from contextlib import ExitStack

from edgetune.runtime.errors import ConfigError

# Linux hands out ephemeral ports from 32768-60999 by default and Ray's default
# worker ports are 10002-19999: a range picked from 20000-32767 collides with
# neither, so an OS-assigned port never lands inside it later.
RANGE_LOW = 20000
RANGE_HIGH = 32767


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); raises OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port that is free on `host` right now (see the race caveat above)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` right now.

    All `n` probe sockets stay bound until every port is picked, so the OS
    cannot hand the same port out twice.
    """
    if n < 0:
        raise ConfigError(f"free_ports: n must be >= 0, got {n}")
    with ExitStack() as stack:
        socks = [stack.enter_context(_bound_socket(host, 0)) for _ in range(n)]
        return [s.getsockname()[1] for s in socks]


def free_port_range(
    size: int,
    host: str = "127.0.0.1",
    *,
    low: int = RANGE_LOW,
    high: int = RANGE_HIGH,
    attempts: int = 64,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """`(first, last)`: `size` consecutive ports, all free on `host` right now.

    For worker port ranges such as Ray's `--min-worker-port/--max-worker-port`
    (both ends inclusive: `last - first + 1 == size`). Tries up to `attempts`
    random starting points inside [low, high]; raises ConfigError when none is
    wholly free. The race caveat of the module applies to every port in it.
    """
    if size < 1 or size > high - low + 1:
        raise ConfigError(f"free_port_range: size must be in 1..{high - low + 1} for [{low}, {high}], got {size}")
    rng = rng or random.Random()
    for _ in range(attempts):
        first = rng.randint(low, high - size + 1)
        try:
            with ExitStack() as stack:
                for port in range(first, first + size):
                    stack.enter_context(_bound_socket(host, port))
        except OSError:
            continue
        return first, first + size - 1
    raise ConfigError(
        f"free_port_range: no {size} consecutive free ports found in [{low}, {high}] on {host} "
        f"after {attempts} tries; pick a smaller size or another range"
    )
