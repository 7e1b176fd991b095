"""An emulated WAN for edgetune: the edge and each node in its own network namespace.

    sudo python -m edgetune.benchmarks.wan check --rate 20mbit --rtt-ms 50     # the self-check alone

Topology: a chain of point-to-point veth pairs, edge -- node-0 -- node-1 ..., the route's own
hops (results travel back up the same hops). Each pair is a /30 from 198.18.0.0/15 (the
benchmarking range), with no default route and no NAT, and nothing changes in the root
namespace but the namespaces' creation. Names are unique per run and short (`etw` + 5 hex +
role: at most 15 characters, the host is shared).

- **Rate**: `tc tbf` on both ends of every pair (each direction shaped on its way out), with a
  queue of at least the bandwidth-delay product.
- **Latency**: this kernel has no `sch_netem`, so a user-space proxy sits in front of every
  hop's server (in the server's namespace) and delays each chunk by half the RTT in each
  direction. It stamps every chunk with its release time and a writer releases chunks in order
  when they are due, so delayed data stays pipelined (no sleep per chunk); it records how late
  its timer released each chunk it had to hold (a chunk that waited behind the shaped link's
  backpressure is the link's queueing, not lateness), and a run whose p99 lateness exceeds
  2 ms is invalid.
- **Self-check** before each measurement: the RTT through the proxy (TCP ping-pong, within 1 ms
  of the setting) and the throughput of one stream (>= 95% of the rate).
- **Cuts**: `Lab.cut(hop)` makes a hop silent both ways (the `blackhole` qdisc in place of tbf: no
  reset, no ICMP, the veths stay up) until `Lab.mend(hop)`; `train_through(..., cut=LinkCut(...))`
  cuts one for a while once the edge has recorded a chosen step.
- **Cleanup**: every namespace (its veths go with it) and process is removed on exit, also on
  Ctrl-C, SIGTERM or failure; `leftovers()` lists anything of ours that survived (`.ci/run`
  fails on it).

Needs root (CAP_NET_ADMIN) and iproute2; `available()` says why not where it is missing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "etw"  # every namespace and veth this harness creates starts with it
BASE = (198, 18)  # 198.18.0.0/15: hop i uses 198.18.<run>.<4i + 1 | 4i + 2>/30
LATENESS_LIMIT_S = 0.002


def available() -> str | None:
    """None where namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"{tool} (iproute2) is not installed"
    name = f"{PREFIX}{secrets.token_hex(3)[:5]}z"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def leftovers() -> list[str]:
    """Namespaces and root-namespace links of ours that still exist."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    ours = [n for n in names if n.startswith(PREFIX)]
    ours += [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
             if line.split(":")[1].strip().startswith(PREFIX)]
    return ours


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    result = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"tc {' '.join(args)} in {ns}: {result.stderr.strip()}")


@dataclass
class Hop:
    """One veth pair between namespaces `a` (client side) and `b` (server side)."""

    a: str
    b: str
    a_addr: str
    b_addr: str
    a_dev: str = ""
    b_dev: str = ""


@dataclass
class Lab:
    """Namespaces for the edge and `nodes` nodes, chained by shaped veth pairs. A context manager."""

    nodes: int
    rate_bits: float  # per direction of every hop
    rtt_s: float
    run: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    base_rtt_s: float = 0.0  # the round trip with no added delay (veth, tbf, the proxy's own path): self_check measures it
    namespaces: list[str] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def proxy_delay_s(self) -> float:
        """The delay each proxy adds per direction so that a round trip takes rtt_s."""
        return max(0.0, (self.rtt_s - self.base_rtt_s) / 2)

    @property
    def edge(self) -> str:
        return f"{PREFIX}{self.run}e"

    def node(self, i: int) -> str:
        return f"{PREFIX}{self.run}n{i}"

    def __enter__(self) -> Lab:
        self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGTERM, _raise_exit)
        signal.signal(signal.SIGINT, _raise_interrupt)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        third = int(self.run[:2], 16)  # one /24 per run: concurrent runs differ (they are isolated anyway)
        chain = [self.edge] + [self.node(i) for i in range(self.nodes)]
        for ns in chain:
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            va, vb = f"{PREFIX}{self.run}{i}a", f"{PREFIX}{self.run}{i}b"
            _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
            a_addr, b_addr = f"{BASE[0]}.{BASE[1]}.{third}.{4 * i + 1}", f"{BASE[0]}.{BASE[1]}.{third}.{4 * i + 2}"
            for ns, dev, addr in ((a, va, a_addr), (b, vb, b_addr)):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _tc(ns, "qdisc", "add", "dev", dev, "root", *self._shaper())
            self.hops.append(Hop(a, b, a_addr, b_addr, va, vb))

    def _shaper(self) -> list[str]:
        """The tbf qdisc (and its arguments) on each end of every hop."""
        bdp = self.rate_bits / 8 * max(self.rtt_s, 0.001)
        queue = int(max(2 * bdp, 64 * 1500))  # tbf's queue: at least the bandwidth-delay product
        burst = int(max(self.rate_bits / 8 / 250, 3 * 1500))  # ~4 ms of tokens, at least a few packets
        return ["tbf", "rate", f"{int(self.rate_bits)}bit", "burst", str(burst), "limit", str(queue)]

    def cut(self, hop: Hop) -> None:
        """Cut `hop` both ways: the `blackhole` qdisc replaces tbf on both ends and drops every packet as
        it leaves, while telling the sender it went out. The veths stay up with their routes, no reset
        or ICMP comes back: to TCP on both ends the path just went silent (retransmissions back off),
        as when a link in the middle of a WAN fails. `mend` undoes it."""
        for ns, dev in ((hop.a, hop.a_dev), (hop.b, hop.b_dev)):
            _tc(ns, "qdisc", "replace", "dev", dev, "root", "blackhole")

    def mend(self, hop: Hop) -> None:
        """Undo `cut`: the hop's shaping as it was built (packets dropped meanwhile stay lost)."""
        for ns, dev in ((hop.a, hop.a_dev), (hop.b, hop.b_dev)):
            _tc(ns, "qdisc", "replace", "dev", dev, "root", *self._shaper())

    def spawn(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process in namespace `ns`, in its own process group (stopped by close())."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def start_proxy(self, hop: Hop, port: int, target_port: int, report: str | None = None,
                    delay_s: float | None = None) -> subprocess.Popen:
        """A delay proxy in `hop`'s server namespace: `hop.b_addr:port` -> `127.0.0.1:target_port`, adding
        `delay_s` (default: proxy_delay_s) each way; it writes its p99 lateness to `report` when stopped."""
        delay_s = self.proxy_delay_s if delay_s is None else delay_s
        argv = [sys.executable, "-m", "edgetune.benchmarks.wan", "proxy", "--listen", f"{hop.b_addr}:{port}",
                "--to", f"127.0.0.1:{target_port}", "--delay-ms", str(delay_s * 1e3)]
        return self.spawn(hop.b, argv + (["--report", str(report)] if report else []))

    def stop(self, *procs: subprocess.Popen) -> None:
        """SIGTERM each process group, SIGKILL what has not ended within 5 s; they leave self.procs."""
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc in self.procs:
                self.procs.remove(proc)

    def close(self) -> None:
        self.stop(*self.procs)
        for ns in reversed(self.namespaces):  # its veths go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        for sig, handler in getattr(self, "_old", {}).items():
            signal.signal(sig, handler)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------ the proxy
class DelayProxy:
    """TCP proxy that delays every chunk by `delay_s` in each direction, pipelined."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        self.listen, self.target, self.delay_s = listen, target, delay_s
        self.lateness: deque[float] = deque(maxlen=100_000)

    async def serve(self) -> None:
        server = await asyncio.start_server(self._client, *self.listen)
        async with server:
            await server.serve_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for sock in (writer.get_extra_info("socket"), up_writer.get_extra_info("socket")):
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the proxy is stopping: the connection just ends
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def release() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:  # the proxy's own lateness: how long after its due time it released the chunk
                    # no busy-wait: select() sleeps to the microsecond, and at nice -10 the proxy wakes
                    # on time with training on every core (p99 0.16 ms measured), while spinning cost
                    # a third of a core per 100 Mbit/s stream, taken from the nodes' compute
                    await asyncio.sleep(wait)
                    self.lateness.append(max(0.0, loop.time() - due))
                # (a chunk already overdue waited behind the shaped link's backpressure: that is the
                # link's queue, not the proxy's lateness)
                if chunk is None:
                    break
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():  # pass the half-close on, a reply may still come back
                writer.write_eof()

        releaser = asyncio.create_task(release())
        try:
            while chunk := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + self.delay_s, chunk))  # stamped on arrival
        finally:
            queue.put_nowait((loop.time() + self.delay_s, None))
            await releaser

    def p99_lateness(self) -> float:
        values = sorted(self.lateness)
        return values[int(0.99 * (len(values) - 1))] if values else 0.0


def run_proxy(listen: str, target: str, delay_ms: float, report: str | None) -> None:
    """Run a DelayProxy until SIGTERM; write its p99 lateness (seconds) to `report` on the way out."""
    host, port = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    proxy = DelayProxy((host, int(port)), (thost, int(tport)), delay_ms / 1e3)
    signal.signal(signal.SIGTERM, _raise_exit)
    with contextlib.suppress(OSError):  # the proxy plays the network: it must not queue behind training's compute
        os.nice(-10)
    # select() takes its timeout in microseconds; epoll rounds up to whole milliseconds, which would
    # make every held chunk up to 1 ms late
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(proxy.serve())
    except (SystemExit, KeyboardInterrupt):
        for _ in range(5):  # open connections: cancel them quietly (closing one may start more work)
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    finally:
        if report:
            with open(report, "w") as f:
                f.write(f"{proxy.p99_lateness():.6f} {len(proxy.lateness)}\n")


# --------------------------------------------------------------------------- self-check
def _echo_server(host: str, port: int, stop: threading.Event) -> None:
    srv = socket.create_server((host, port))
    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"p":  # ping-pong: echo single bytes
                while b := conn.recv(1):
                    conn.sendall(b)
            else:  # sink: count bytes, reply with the count when the client half-closes
                total = 0
                while data := conn.recv(1 << 16):
                    total += len(data)
                conn.sendall(str(total).encode())
    srv.close()


def _tx_bytes(dev: str) -> int:
    with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
        return int(f.read())


def measure(host: str, port: int, seconds: float = 2.0, pings: int = 20, dev: str | None = None) -> tuple[float, float]:
    """(median RTT s, throughput bits/s) to an echo/sink server through whatever is in between.

    With `dev` (the sending veth), throughput is what left through it, headers included (what tbf
    shapes), over the send after its first quarter (past TCP's slow start); without, the payload
    the sink counted over the whole send."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"p")
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            s.sendall(b"x")
            s.recv(1)
            rtts.append(time.perf_counter() - start)
    if seconds <= 0:
        return statistics.median(rtts), 0.0
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"s")
        block = b"\0" * (1 << 16)
        sent, start = 0, time.perf_counter()
        mark = None
        while (now := time.perf_counter()) - start < seconds:
            if dev and mark is None and now - start >= seconds / 4:
                mark = (now, _tx_bytes(dev))
            s.sendall(block)
            sent += len(block)
        end = (time.perf_counter(), _tx_bytes(dev)) if dev else None
        s.shutdown(socket.SHUT_WR)
        received = int(s.recv(64).decode() or 0)
        elapsed = time.perf_counter() - start
    if dev and mark is not None:
        return statistics.median(rtts), 8 * (end[1] - mark[1]) / (end[0] - mark[0])
    return statistics.median(rtts), 8 * received / elapsed


def rtt_tolerance_s(rtt_s: float) -> float:
    """How far a measured round trip may be from the setting: 1 ms or 5% of it, whichever is larger
    (a shared 2-core machine under load jitters the base RTT that much)."""
    return max(0.001, 0.05 * rtt_s)


def self_check(lab: Lab, hop: Hop, seconds: float = 2.0, port: int = 17001) -> tuple[float, float, float]:
    """(RTT s, throughput bits/s, proxy p99 lateness s) of `hop` through a delay proxy, measured from its
    client namespace; raises when the RTT is off by more than rtt_tolerance_s or the throughput is
    under 95%.

    First it measures the hop's round trip with a proxy that adds nothing (lab.base_rtt_s), so the
    proxies then add what makes the whole round trip the setting."""
    lab.base_rtt_s = 0.0
    base, _, _ = _measure_hop(lab, hop, 0.0, port, seconds=0.0)
    lab.base_rtt_s = base
    rtt, rate, lateness = _measure_hop(lab, hop, lab.proxy_delay_s, port, seconds)
    problems = []
    if abs(rtt - lab.rtt_s) > rtt_tolerance_s(lab.rtt_s):
        problems.append(f"RTT {rtt * 1e3:.2f} ms, set {lab.rtt_s * 1e3:.2f} ms")
    if rate < 0.95 * lab.rate_bits:
        problems.append(f"throughput {rate / 1e6:.2f} Mbit/s < 95% of {lab.rate_bits / 1e6:.2f}")
    if not lateness <= LATENESS_LIMIT_S:  # NaN too: the proxy wrote no report
        problems.append(f"proxy p99 lateness {lateness * 1e3:.2f} ms > {LATENESS_LIMIT_S * 1e3:.0f} ms")
    if problems:
        raise RuntimeError(f"self-check of {hop.a} -> {hop.b}: " + "; ".join(problems))
    return rtt, rate, lateness


def _measure_hop(lab: Lab, hop: Hop, delay_s: float, port: int, seconds: float) -> tuple[float, float, float]:
    py = sys.executable
    sink = lab.spawn(hop.b, [py, "-c", "import threading; from edgetune.benchmarks.wan import _echo_server; "
                                       f"_echo_server('127.0.0.1', {port}, threading.Event())"])
    report = f"/tmp/{PREFIX}{lab.run}-proxy-check"
    proxy = lab.start_proxy(hop, port + 1, port, report, delay_s)
    try:
        _wait_port(lab, hop.a, hop.b_addr, port + 1)
        out = subprocess.run(["ip", "netns", "exec", hop.a, py, "-c",
                              "from edgetune.benchmarks.wan import measure; "
                              f"r, b = measure('{hop.b_addr}', {port + 1}, {seconds}, dev='{hop.a_dev}'); print(r, b)"],
                             capture_output=True, text=True, timeout=60 + seconds)
        if out.returncode:
            raise RuntimeError(f"self-check failed: {out.stderr.strip()[-500:]}")
        rtt, rate = map(float, out.stdout.split())
    finally:
        lab.stop(proxy, sink)
    lateness = float(open(report).read().split()[0]) if os.path.exists(report) else float("nan")
    with contextlib.suppress(FileNotFoundError):
        os.remove(report)
    return rtt, rate, lateness


def _wait_port(lab: Lab, ns: str, host: str, port: int, timeout: float = 30.0) -> None:
    code = (f"import socket, time\nend = time.time() + {timeout}\n"
            "while True:\n"
            f"    try:\n        socket.create_connection(('{host}', {port}), timeout=1).close(); break\n"
            "    except OSError:\n"
            "        if time.time() > end: raise\n        time.sleep(0.05)\n")
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, capture_output=True,
                   timeout=timeout + 5)


# --------------------------------------------------------------------- one gRPC stream
_SINK_METHOD = "/edgetune.wan.Sink/Stream"


def serve_grpc_sink(port: int) -> None:
    """A gRPC server with edgetune's channel options whose one stream method counts what it receives."""
    from concurrent import futures

    import grpc

    from edgetune.runtime.wire import rpc
    from edgetune.runtime.wire.serde import channel_options

    def count(requests, context):
        total = sum(len(r) for r in requests)
        return str(total).encode()

    handler = grpc.method_handlers_generic_handler("edgetune.wan.Sink", {
        "Stream": grpc.stream_unary_rpc_method_handler(count)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=channel_options() + rpc.KEEPALIVE_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, _raise_exit)
    print("ready", flush=True)
    try:
        server.wait_for_termination()
    except (SystemExit, KeyboardInterrupt):
        server.stop(grace=0.5)


def measure_grpc(address: str, seconds: float, message_bytes: int = 1 << 20) -> float:
    """Bits/s of one client stream sending `message_bytes` messages to serve_grpc_sink for `seconds`
    (edgetune's channel options), counted by the server, over the stream's whole life."""
    import grpc

    from edgetune.runtime.wire import rpc
    from edgetune.runtime.wire.serde import channel_options

    channel = grpc.insecure_channel(address, options=channel_options() + rpc.KEEPALIVE_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.stream_unary(_SINK_METHOD, request_serializer=None, response_deserializer=None)
    payload = b"\0" * message_bytes
    start = time.perf_counter()

    def messages():
        while time.perf_counter() - start < seconds:
            yield payload

    total = int(call(messages(), timeout=seconds + 60))
    elapsed = time.perf_counter() - start
    channel.close()
    return 8 * total / elapsed


def grpc_throughput(lab: Lab, hop: Hop, seconds: float = 6.0, port: int = 17201) -> float:
    """Bits/s of one gRPC stream across `hop`, through its delay proxy (see measure_grpc)."""
    py = sys.executable
    sink = lab.spawn(hop.b, [py, "-m", "edgetune.benchmarks.wan", "grpc-sink", "--port", str(port)],
                     stdout=subprocess.PIPE, text=True)
    proxy = lab.start_proxy(hop, port + 1, port)
    try:
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the gRPC sink did not start")
        _wait_port(lab, hop.a, hop.b_addr, port + 1)
        out = subprocess.run(["ip", "netns", "exec", hop.a, py, "-c",
                              "from edgetune.benchmarks.wan import measure_grpc; "
                              f"print(measure_grpc('{hop.b_addr}:{port + 1}', {seconds}))"],
                             capture_output=True, text=True, timeout=seconds + 90)
        if out.returncode:
            raise RuntimeError(f"gRPC throughput failed: {out.stderr.strip()[-500:]}")
        return float(out.stdout.split()[-1])
    finally:
        lab.stop(proxy, sink)


# ----------------------------------------------------------------- training over the lab
SHARD_PORT = 17100  # each node's shard, on its loopback; its proxy listens on SHARD_PORT + 1 facing the previous hop


def serve_node(folder: str, start: int, end: int, port: int, token_file: str, name: str, threads: int) -> None:
    """Serve blocks [start, end) of `folder` on 127.0.0.1:port with `threads` torch threads until SIGTERM
    (runs inside a node namespace)."""
    from edgetune.runtime.threads import set_threads

    set_threads(threads)
    from edgetune.nodes.service import serve
    from edgetune.nodes.shard import Shard
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.wire import rpc

    part = load_model(folder, start=start, end=end, edge=False)
    shard = Shard(name, folder, part, fingerprint(checkpoint_manifest(folder)))
    server, _ = serve(shard, Trust.insecure(rpc.load_token(token_file)), host="127.0.0.1", port=port)
    signal.signal(signal.SIGTERM, _raise_exit)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except (SystemExit, KeyboardInterrupt):
        server.stop(grace=1.0)


class _RouteClient:
    """A coordinator client that always answers with one fixed route (the lab's)."""

    def __init__(self, route) -> None:
        self.route = route
        self.address = "the lab's route"

    def get_route(self, model, failed=None, timeout_s=0.0):
        return self.route

    def status(self):
        from edgetune.runtime.wire import messages as wire

        return wire.ClusterStatus("", [], [self.route.model])  # no profiles: the lab's runs give --micro-batches

    def close(self) -> None:
        pass


def run_edge(spec_file: str, out_file: str) -> None:
    """Fine-tune through the lab's route (runs inside the edge namespace); writes the metrics as JSON."""
    import json

    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.train import remote
    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.runtime.wire import messages as wire
    from edgetune.runtime.wire import rpc

    spec = json.loads(Path(spec_file).read_text())
    folder = spec["folder"]
    manifest = checkpoint_manifest(folder)
    hops = [wire.Hop(h["name"], h["address"], h["start"], h["end"]) for h in spec["hops"]]
    route = wire.Route(folder, fingerprint(manifest), hops, hops[-1].end, manifest)
    cfg = TrainConfig(**spec["train"])
    token = Trust.insecure(rpc.load_token(cfg.token_file))  # the lab measures the network, not TLS
    remote.RemoteTrainer.connect = classmethod(lambda cls, c: cls(c, _RouteClient(route), token, route, Path(folder)))
    started = time.perf_counter()
    result = finetune(cfg)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    Path(out_file).write_text(json.dumps({"losses": result.losses, "eval_loss": result.eval_loss,
                                         "seconds": time.perf_counter() - started,
                                         "steps": [r for r in records if "loss" in r]}))


@dataclass(frozen=True)
class LinkCut:
    """Cut `lab.hops[hop]` (0: the edge's link; i: node i-1 to node i) for `seconds` (Lab.cut) as soon as
    the edge has recorded step `after_step` in its metrics.jsonl: the cut meets step after_step + 1's
    adapter push and forwards on their way."""

    hop: int
    after_step: int
    seconds: float


def _cut_after_step(lab: Lab, cut: LinkCut, metrics: Path, done: threading.Event, timeline: dict) -> None:
    """Wait for `cut.after_step`'s record, cut for `cut.seconds` (shorter if the edge ends meanwhile), mend;
    `timeline` gets the wall-clock times (time.time()) of the cut and of the mend."""
    import json

    while not done.wait(0.005):
        lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # whole lines: the edge appends
        if any("loss" in r and r["step"] >= cut.after_step for r in map(json.loads, lines)):
            break
    else:
        return
    hop = lab.hops[cut.hop]
    lab.cut(hop)
    timeline["cut_at"] = time.time()
    try:
        done.wait(cut.seconds)
    finally:
        lab.mend(hop)
        timeline["mended_at"] = time.time()


def train_through(lab: Lab, folder: str, splits: list[int], train: dict, workdir: str, num_layers: int,
                  cut: LinkCut | None = None) -> dict:
    """Shards for [0, s1), [s1, s2), ... in the lab's node namespaces, a delay proxy in front of each, and
    finetune in the edge namespace through them; returns run_edge's figures plus each proxy's p99 lateness
    and, with `cut`, when the link was cut and mended (`cut_at`, `mended_at`: time.time()). The edge's and
    nodes' logs (INFO, timestamped) are `edge.log` and `node-<i>.log` in `workdir`.

    Each process plays a machine of its own, so the host's cores are shared out among them (at least
    one thread each): more torch threads than cores make every process's compute erratic."""
    import json

    from edgetune.runtime.wire import rpc

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    token_file = work / "token"
    rpc.write_token(token_file)
    bounds = [0, *splits, num_layers]
    threads = max(1, (os.cpu_count() or 1) // (len(bounds) - 1 + 1))  # the nodes and the edge
    train = {"threads": threads, **train}
    py = sys.executable
    nodes = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):  # all at once: each loads on a machine of its own
        with (work / f"node-{i}.log").open("w") as log_file:
            nodes.append(lab.spawn(lab.node(i), [py, "-m", "edgetune.benchmarks.wan", "node", "--folder", folder,
                                                 "--start", str(start), "--end", str(end), "--port", str(SHARD_PORT),
                                                 "--token-file", str(token_file), "--name", f"node-{i}",
                                                 "--threads", str(threads)],
                                   stdout=subprocess.PIPE, stderr=log_file, text=True))
    hops, proxies = [], []
    for i, (node, start, end) in enumerate(zip(nodes, bounds, bounds[1:])):
        hop = lab.hops[i]
        if node.stdout.readline().strip() != "ready":
            raise RuntimeError(f"node {i} in {lab.node(i)} did not start (exit code {node.poll()}): "
                               f"{(work / f'node-{i}.log').read_text()[-2000:]}")
        report = work / f"proxy{i}.txt"
        proxies.append((lab.start_proxy(hop, SHARD_PORT + 1, SHARD_PORT, str(report)), report))
        _wait_port(lab, hop.a, hop.b_addr, SHARD_PORT + 1)
        hops.append({"name": f"node-{i}", "address": f"{hop.b_addr}:{SHARD_PORT + 1}", "start": start, "end": end})
    spec = work / "spec.json"
    spec.write_text(json.dumps({"folder": folder, "hops": hops,
                                "train": {**train, "coordinator": "lab:1", "token_file": str(token_file)}}))
    out = work / "edge.json"
    edge_log = work / "edge.log"
    with edge_log.open("w") as log_file:
        edge = lab.spawn(lab.edge, [py, "-m", "edgetune.benchmarks.wan", "edge", "--spec", str(spec), "--out",
                                    str(out)], stderr=log_file)
    done, timeline = threading.Event(), {}
    cutter = threading.Thread(target=_cut_after_step, daemon=True,
                              args=(lab, cut, Path(train["out"]) / "metrics.jsonl", done, timeline))
    if cut is not None:
        cutter.start()
    try:
        code = edge.wait()
    finally:
        done.set()
        if cutter.is_alive():
            cutter.join()
    lab.stop(edge)
    if code:
        raise RuntimeError(f"the edge's fine-tuning failed with exit code {code}: "
                           f"{edge_log.read_text()[-2000:]}")
    result = {**json.loads(out.read_text()), **timeline}
    lab.stop(*(proc for proc, _ in proxies))
    result["proxy_p99_lateness_s"] = [float(report.read_text().split()[0]) for _, report in proxies]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    px = sub.add_parser("proxy", help="run one delay proxy (used inside a namespace)")
    px.add_argument("--listen", required=True)
    px.add_argument("--to", required=True)
    px.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    px.add_argument("--report", default=None)
    nd = sub.add_parser("node", help="serve blocks of a model on loopback (used inside a namespace)")
    nd.add_argument("--folder", required=True)
    nd.add_argument("--start", type=int, required=True)
    nd.add_argument("--end", type=int, required=True)
    nd.add_argument("--port", type=int, required=True)
    nd.add_argument("--token-file", required=True)
    nd.add_argument("--name", required=True, help="the shard's name, as the route names its hop")
    nd.add_argument("--threads", type=int, default=1, help="torch threads")
    ed = sub.add_parser("edge", help="fine-tune through a fixed route (used inside the edge namespace)")
    ed.add_argument("--spec", required=True)
    ed.add_argument("--out", required=True)
    gs = sub.add_parser("grpc-sink", help="a gRPC stream sink on loopback (used inside a namespace)")
    gs.add_argument("--port", type=int, required=True)
    ck = sub.add_parser("check", help="build a lab of one hop and run the self-check")
    ck.add_argument("--grpc", action="store_true", help="also measure one gRPC stream's throughput")
    ck.add_argument("--rate", default="20mbit")
    ck.add_argument("--rtt-ms", type=float, default=50.0)
    ck.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    if args.cmd == "proxy":
        run_proxy(args.listen, args.to, args.delay_ms, args.report)
        return 0
    if args.cmd in ("node", "edge"):  # timestamped INFO records on stderr: train_through keeps them in files
        from edgetune.commands.logs import setup_logging

        setup_logging("INFO")
    if args.cmd == "node":
        serve_node(args.folder, args.start, args.end, args.port, args.token_file, args.name, args.threads)
        return 0
    if args.cmd == "edge":
        run_edge(args.spec, args.out)
        return 0
    if args.cmd == "grpc-sink":
        serve_grpc_sink(args.port)
        return 0
    from edgetune.runtime.plan.planner import parse_link

    link = parse_link(f"{args.rate},{args.rtt_ms}ms")
    reason = available()
    if reason:
        print(f"wan: cannot build namespaces here: {reason}", file=sys.stderr)
        return 2
    with Lab(nodes=1, rate_bits=link.rate_bits, rtt_s=link.rtt_s) as lab:
        rtt, rate, late = self_check(lab, lab.hops[0], args.seconds)
        print(f"self-check {lab.hops[0].a} -> {lab.hops[0].b}: RTT {rtt * 1e3:.2f} ms (set {args.rtt_ms:g}), "
              f"throughput {rate / 1e6:.2f} Mbit/s (set {link.rate_bits / 1e6:g}), proxy p99 lateness {late * 1e3:.3f} ms")
        if args.grpc:
            bits = grpc_throughput(lab, lab.hops[0], seconds=max(args.seconds, 6.0))
            print(f"one gRPC stream: {bits / 1e6:.2f} Mbit/s = {bits / link.rate_bits:.1%} of the link (payload, "
                  "whole stream including its start)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
