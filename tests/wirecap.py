"""Capture the TCP payload bytes that cross the loopback interface, so a test can prove what an
eavesdropper on the wire could (and could not) read.

    with LoopbackCapture(ports={server_port}) as cap:
        ...                                   # traffic to or from server_port
    assert cap.dropped() == 0                 # the kernel kept every matching packet
    assert not cap.contains(secret)           # e.g. the channel is encrypted

Linux only, and needs CAP_NET_RAW (root): a raw AF_PACKET socket bound to `lo`, as tcpdump uses.
On `lo` the kernel shows a tap every packet twice -- once as it is sent (PACKET_OUTGOING) and
once as it is received (PACKET_HOST) -- so the outgoing copy is dropped and each packet counts
once. The received copy is the one kept because a tap sees it before TCP does: once the
receiving application has read some bytes, the capture has already queued the packets that
carried them.

A classic BPF filter keeps only TCP to or from `ports` in the kernel, so unrelated loopback
traffic (other tests, Ray) neither fills the receive buffer nor counts as a drop; the same check
runs again in Python on every packet.
"""
from __future__ import annotations

import ctypes
import ipaddress
import select
import socket
import struct
import threading
from collections.abc import Iterable

# Linux constants Python's socket module does not export everywhere.
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6  # getsockopt -> struct tpacket_stats {unsigned tp_packets, tp_drops}; reading resets it
_SO_RCVBUFFORCE = 33  # SO_RCVBUF past net.core.rmem_max (needs CAP_NET_ADMIN)
_SO_ATTACH_FILTER = 26
_PACKET_OUTGOING = 4

_ETH_HLEN = 14  # `lo` frames carry an all-zero Ethernet header
_ETHERTYPE_IPV4, _ETHERTYPE_IPV6 = 0x0800, 0x86DD
_IPPROTO_TCP = 6
# The largest frame kept: `lo`'s MTU is 65536 and GSO packets are up to 64 KiB of IP, so one frame
# fits with room to spare (BIG TCP, off by default, would need more -- see `truncated`).
_SNAPLEN = 256 * 1024

StreamKey = tuple[str, int, str, int]  # (src address, src port, dst address, dst port)


class LoopbackCapture:
    """Context manager that records TCP payload on `lo` to or from any of `ports` (None: all TCP).

    A reader thread drains the socket while the `with` block runs; on exit it reads what is
    still queued, then closes the socket. Every accessor may be called during or after capture.
    """

    def __init__(self, ports: Iterable[int] | None = None, *, rcvbuf_bytes: int = 64 * 1024 * 1024,
                 poll_s: float = 0.05) -> None:
        self.ports = None if ports is None else frozenset(int(p) for p in ports)
        self.rcvbuf_bytes = rcvbuf_bytes
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._streams: dict[StreamKey, list[bytes]] = {}
        self._order: list[bytes] = []  # every kept payload chunk, in capture order
        self._drops = 0
        self._truncated = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> LoopbackCapture:
        self._sock = _open_socket(self.ports, self.rcvbuf_bytes)
        self._stop.clear()
        self._thread = threading.Thread(target=self._read_loop, name="wirecap", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._read_stats()
            self._sock.close()
            self._sock = None

    # -- results -------------------------------------------------------------------------------

    def payload(self) -> bytes:
        """Every kept TCP payload byte, all connections and directions, in capture order."""
        with self._lock:
            return b"".join(self._order)

    def streams(self) -> dict[StreamKey, bytes]:
        """(src, sport, dst, dport) -> that direction's payload, in capture order (on `lo`, which
        neither reorders nor loses packets, that is sequence order)."""
        with self._lock:
            return {key: b"".join(chunks) for key, chunks in self._streams.items()}

    def contains(self, needle: bytes) -> bool:
        """Whether `needle` appears in one direction of one connection (so a needle split over
        several packets is still found, and none is made up across connections)."""
        return any(needle in data for data in self.streams().values())

    def dropped(self) -> int:
        """Matching packets lost: dropped by the kernel for want of buffer space, plus any frame
        larger than the receive buffer. A test that asserts on absence should assert this is 0."""
        self._read_stats()
        with self._lock:
            return self._drops + self._truncated

    # -- reader --------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None  # set by __enter__ before the thread starts
        buf = bytearray(_SNAPLEN)
        view = memoryview(buf)
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], self.poll_s)
            if ready:
                self._drain(sock, view)
        self._drain(sock, view)  # what arrived before __exit__ was called

    def _drain(self, sock: socket.socket, view: memoryview) -> None:
        """Read queued frames until the socket is empty."""
        while True:
            try:
                # MSG_TRUNC: the return value is the frame's full length, even past the buffer.
                n, addr = sock.recvfrom_into(view, 0, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
            except BlockingIOError:
                return
            if addr[2] == _PACKET_OUTGOING:
                continue  # the same packet comes back as PACKET_HOST
            if n > len(view):
                with self._lock:
                    self._truncated += 1
                continue
            self._keep(_parse_tcp(view[:n]))

    def _keep(self, parsed: tuple[StreamKey, bytes] | None) -> None:
        if parsed is None:
            return
        key, data = parsed
        if self.ports is not None and key[1] not in self.ports and key[3] not in self.ports:
            return
        if not data:
            return
        with self._lock:
            self._streams.setdefault(key, []).append(data)
            self._order.append(data)

    def _read_stats(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            raw = sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        except OSError:  # closed by __exit__ in another thread
            return
        _packets, drops = struct.unpack("II", raw)
        with self._lock:
            self._drops += drops


# -- frames ------------------------------------------------------------------------------------


def _parse_tcp(frame: memoryview) -> tuple[StreamKey, bytes] | None:
    """An Ethernet frame from `lo` -> ((src, sport, dst, dport), TCP payload), or None if it is
    not TCP over IPv4/IPv6 (IPv6 extension headers are not followed; `lo` traffic has none)."""
    if len(frame) < _ETH_HLEN + 20:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[_ETH_HLEN:]
    if ethertype == _ETHERTYPE_IPV4:
        if ip[9] != _IPPROTO_TCP:
            return None
        header_len = (ip[0] & 0x0F) * 4
        total_len = int.from_bytes(ip[2:4], "big") or len(ip)  # 0: a BIG TCP packet past 64 KiB
        src, dst = ip[12:16], ip[16:20]
    elif ethertype == _ETHERTYPE_IPV6:
        if len(ip) < 40 or ip[6] != _IPPROTO_TCP:
            return None
        header_len = 40
        total_len = 40 + int.from_bytes(ip[4:6], "big") if ip[4:6] != b"\0\0" else len(ip)
        src, dst = ip[8:24], ip[24:40]
    else:
        return None
    tcp = ip[header_len:min(total_len, len(ip))]  # the IP length, not the frame's (padding)
    if len(tcp) < 20:
        return None
    sport, dport = struct.unpack_from("!HH", tcp)
    data_offset = (tcp[12] >> 4) * 4
    key = (str(ipaddress.ip_address(bytes(src))), sport, str(ipaddress.ip_address(bytes(dst))), dport)
    return key, bytes(tcp[data_offset:])


# -- socket ------------------------------------------------------------------------------------


def _open_socket(ports: frozenset[int] | None, rcvbuf_bytes: int) -> socket.socket:
    """A raw packet socket on `lo` with a big buffer and the port filter attached *before* it is
    bound, so no unfiltered packet is ever queued."""
    try:
        # Protocol 0: the socket receives nothing until bind() names one.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except (PermissionError, AttributeError, OSError) as e:
        raise PermissionError(
            "LoopbackCapture needs a raw AF_PACKET socket (Linux, root or CAP_NET_RAW): "
            f"{type(e).__name__}: {e}") from e
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf_bytes)
        except PermissionError:  # CAP_NET_RAW without CAP_NET_ADMIN: capped at net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        program = _bpf_filter(ports)
        fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(program))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        sock.bind(("lo", _ETH_P_ALL))
        sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)  # reset the counters
    except BaseException:
        sock.close()
        raise
    return sock


# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS, _LD_H_IND, _LDX_B_MSH = 0x20, 0x28, 0x30, 0x48, 0xB1
_JEQ_K, _RET_K = 0x15, 0x06
_SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # ancillary load: skb->pkt_type
_MAX_FILTER_PORTS = 24  # past this the jumps outgrow BPF's 8-bit offsets; Python filters instead


def _bpf_filter(ports: frozenset[int] | None) -> ctypes.Array:
    """Accept (up to _SNAPLEN bytes of) TCP over IPv4/IPv6 with a port in `ports`, received side
    only -- the kernel-side twin of _parse_tcp plus the port check in _keep."""
    port_list = sorted(ports) if ports is not None and len(ports) <= _MAX_FILTER_PORTS else None
    ins: list[tuple] = []  # (opcode, k, jump-if-true label, jump-if-false label) or a label str

    def ports_at(load: int, offset: int, last: bool) -> None:
        # A = port at `offset`; accept on a match, else go on (or drop after the last check).
        ins.append((load, offset, None, None))
        for i, port in enumerate(port_list):
            miss = "drop" if last and i == len(port_list) - 1 else None
            ins.append((_JEQ_K, port, "accept", miss))

    ins += [(_LD_W_ABS, _SKF_AD_PKTTYPE, None, None), (_JEQ_K, _PACKET_OUTGOING, "drop", None),
            (_LD_H_ABS, 12, None, None), (_JEQ_K, _ETHERTYPE_IPV4, None, "v6"),
            (_LD_B_ABS, _ETH_HLEN + 9, None, None), (_JEQ_K, _IPPROTO_TCP, None, "drop")]
    if port_list is None:
        ins.append((_RET_K, _SNAPLEN, None, None))
    else:
        ins.append((_LDX_B_MSH, _ETH_HLEN, None, None))  # X = IPv4 header length
        ports_at(_LD_H_IND, _ETH_HLEN, last=False)
        ports_at(_LD_H_IND, _ETH_HLEN + 2, last=True)
    ins += ["v6", (_JEQ_K, _ETHERTYPE_IPV6, None, "drop"),
            (_LD_B_ABS, _ETH_HLEN + 6, None, None), (_JEQ_K, _IPPROTO_TCP, None, "drop")]
    if port_list is None:
        ins.append((_RET_K, _SNAPLEN, None, None))
    else:
        ports_at(_LD_H_ABS, _ETH_HLEN + 40, last=False)
        ports_at(_LD_H_ABS, _ETH_HLEN + 42, last=True)
    ins += ["accept", (_RET_K, _SNAPLEN, None, None), "drop", (_RET_K, 0, None, None)]
    return _assemble(ins)


def _assemble(ins: list[tuple | str]) -> ctypes.Array:
    """Resolve labels (None: the next instruction) into a `struct sock_filter[]` buffer."""
    labels: dict[str, int] = {}
    code: list[tuple] = []
    for item in ins:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    out = b""
    for pc, (op, k, jt, jf) in enumerate(code):
        jt_off = 0 if jt is None else labels[jt] - pc - 1
        jf_off = 0 if jf is None else labels[jf] - pc - 1
        if not (0 <= jt_off <= 255 and 0 <= jf_off <= 255):
            raise ValueError(f"BPF jump out of range at {pc}: {jt_off}, {jf_off}")
        out += struct.pack("HBBI", op, jt_off, jf_off, k)
    return ctypes.create_string_buffer(out, len(out))
