"""`edgetune status --coordinator HOST:PORT`: the cluster as a table."""
from __future__ import annotations

from edgetune.runtime.wire import messages as wire


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(status: wire.ClusterStatus) -> str:
    """One line per node: name, health, hardware, measured speed, assigned blocks, load."""
    lines = [f"Ray cluster: {status.ray_address}    models placed: {', '.join(status.models) or 'none'}"]
    header = ("node", "health", "host", "device", "dtype", "weights", "kernels", "threads", "memory", "block f+b", "layers", "sessions", "busy")
    rows = []
    for n in status.nodes:
        hardware = n.device + (f" ({n.gpu_name})" if n.gpu_name else "")
        layers = ", ".join(f"[{h.start}, {h.end})" for h in n.stages) or "-"
        health = "alive" if n.alive else "dead"
        if n.alive and n.stages and n.info is None:
            health = "unreachable"
        if n.alive and n.banned_s > 0:
            health = f"banned {n.banned_s:.0f}s"
        sessions = _sessions(n.info) if n.info else "-"
        busy = f"{100 * n.info.busy_fraction:.0f}%" if n.info else "-"
        rows.append((n.name, health, n.host, hardware, n.dtype or "-", n.quantize or "-", n.kernels or "-",
                     str(n.threads or "-"),
                     _size(n.memory_bytes) if n.memory_bytes else "-",
                     f"{n.block_time_s * 1e3:.1f} ms" if n.block_time_s else "-", layers, sessions, busy))
    if not rows:
        return lines[0] + "\nno edgetune node has joined yet (start one: edgetune node --coordinator HOST:PORT)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _sessions(info: wire.NodeInfo) -> str:
    """"2: alice, bob x2" -- how many sessions, by the edge identity that opened them."""
    if not info.open_sessions:
        return str(info.sessions)
    owners: dict[str, int] = {}
    for s in info.open_sessions:
        owners[s.owner or "?"] = owners.get(s.owner or "?", 0) + 1
    return f"{info.sessions}: " + ", ".join(o if c == 1 else f"{o} x{c}" for o, c in sorted(owners.items()))


def run_status(args) -> int:
    from edgetune.commands.trust import status_trust
    from edgetune.runtime.wire.coordinator_client import CoordinatorClient

    trust, address = status_trust(args)
    client = CoordinatorClient(address, trust)
    try:
        print(format_status(client.status()))
    finally:
        client.close()
    return 0
