"""Load for the accounting tests and scripts/bench-scale: many distinct UDP flows, fast, bounded.

    python -m routetrace.storm DEST FLOWS [--packets N] [--size BYTES] [--sockets S] [--rate FLOWS_PER_S]
                               [--batch B] [--cpu N] [--until-stopped] [--echo]

Flows are (source port, destination port) pairs: S sockets (S source ports), each sending to
FLOWS/S destination ports from --base-port on, N datagrams per flow; --rate paces the new flows
(checked every 500 sends, or every batch), otherwise as fast as it can. Every datagram is sent
unconnected, so each is its own output route lookup: one sendto each, or with --batch B, B per
sendmmsg call, each with its own destination (a Python loop of sendto calls spends about 2 µs of
its own per datagram and tops out near 80,000 new flows/s here, below the rates the benchmark
asks about). --cpu pins the sender to one CPU; --until-stopped sends the same flows again and
again until SIGTERM or SIGINT (a background flood for as long as another load runs): the signal
is acted on between sends, so every datagram sent is counted. --echo sends ICMP echo requests
instead (IPv4, a raw socket, so root), the port standing for the echo id: the receiver answers
each from its softirq. Prints one JSON line: what was sent, so a test can compare it with what
was traced.
Runs inside whatever network namespace it is started in; sends only to DEST.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import signal
import socket
import struct
import sys
import time


class _Stopped(Exception):
    """Raised by the send loops themselves, between sends, once SIGTERM or SIGINT came during
    --until-stopped (the handler only sets _stopping: raised from inside a send, it would lose
    the count of datagrams already handed to the kernel)."""


_stopping = False


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request with its checksum (the kernel fills it in only for ICMPv6)."""
    head = struct.pack("!BBHHH", 8, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    data = head + b"\0" * (len(head) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return head[:2] + struct.pack("!H", ~total & 0xFFFF) + head[4:]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


class BatchSender:
    """sendmmsg(2) of one payload to many (address, port) destinations of one family: the
    destinations' sockaddrs are written into a fixed array, the batch goes in one call."""

    def __init__(self, family: int, dest: str, payload: bytes, batch: int):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
        # The address as sendto would take it (a name, an IPv6 scope such as %eth0).
        address = socket.getaddrinfo(dest, None, family, socket.SOCK_DGRAM)[0][4]
        self._head = struct.pack("=H", family)
        if family == socket.AF_INET:
            # struct sockaddr_in: family (host order), port (network order), address, 8 bytes of zero
            self._addr_len = 16
            self._tail = socket.inet_pton(family, address[0]) + bytes(8)
        else:
            # struct sockaddr_in6: family, port, flowinfo, address, scope id (host order)
            self._addr_len = 28
            self._tail = (struct.pack("!I", address[2]) + socket.inet_pton(family, address[0].split("%")[0])
                          + struct.pack("=I", address[3]))
        self.batch = batch
        self._payload = ctypes.create_string_buffer(payload, len(payload))
        self._iov = _Iovec(ctypes.addressof(self._payload), len(payload))
        self._addrs = ctypes.create_string_buffer(self._addr_len * batch)
        self._msgs = (_Mmsghdr * batch)()
        for i, m in enumerate(self._msgs):
            m.hdr.name = ctypes.addressof(self._addrs) + i * self._addr_len
            m.hdr.namelen = self._addr_len
            m.hdr.iov = ctypes.addressof(self._iov)
            m.hdr.iovlen = 1

    def send(self, fd: int, ports: range) -> tuple[int, int]:
        """One datagram to each port (at most `batch`): (sent, failed). A datagram the kernel
        refuses (ENOBUFS, say) is counted as failed and skipped, as a failed sendto is."""
        head, tail = self._head, self._tail
        self._addrs[:len(ports) * self._addr_len] = b"".join(head + port.to_bytes(2, "big") + tail for port in ports)
        sent = failed = done = 0
        while done < len(ports):
            n = self._libc.sendmmsg(fd, ctypes.byref(self._msgs, done * ctypes.sizeof(_Mmsghdr)), len(ports) - done, 0)
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                failed += 1
                done += 1
            else:
                sent += n
                done += n
        return sent, failed


def _pace(start: float, rate: float, done: int) -> None:
    """Sleep until `done` new flows are due at `rate` per second since `start`."""
    ahead = done / rate - (time.perf_counter() - start)
    if ahead > 0:
        time.sleep(ahead)


def storm(dest: str, flows: int, packets: int = 1, size: int = 1, sockets: int = 0,
          base_port: int = 20000, rate: float = 0, until_stopped: bool = False, echo: bool = False,
          batch: int = 0) -> dict:
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    if echo and family != socket.AF_INET:
        raise ValueError("--echo is IPv4 only")
    per_socket = min(flows, 65535 - base_port) if sockets == 0 else -(-flows // sockets)
    socks = []
    payload = b"r" * size
    batcher = BatchSender(family, dest, payload, batch) if batch > 1 and not echo else None
    sent = errors = rounds = 0
    start = time.perf_counter()
    try:
        while True:
            remaining, index = flows, 0
            while remaining > 0:
                if index == len(socks):        # a repeated round sends from the same source ports
                    if echo:                   # the answers are not read: a small buffer drops them
                        s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 12)
                    else:
                        s = socket.socket(family, socket.SOCK_DGRAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
                    socks.append(s)
                s = socks[index]
                n = min(per_socket, remaining)
                for _ in range(packets):
                    if batcher is not None:
                        for first in range(base_port, base_port + n, batch):
                            ok, failed = batcher.send(s.fileno(), range(first, min(first + batch, base_port + n)))
                            sent, errors = sent + ok, errors + failed
                            if _stopping:
                                raise _Stopped
                            if rate:
                                _pace(start, rate, rounds * flows + flows - remaining
                                      + min(first + batch, base_port + n) - base_port)
                        continue
                    for port in range(base_port, base_port + n):
                        try:
                            if echo:
                                s.sendto(echo_request(port, rounds, payload), (dest, 0))
                            else:
                                s.sendto(payload, (dest, port))
                            sent += 1
                        except OSError:
                            errors += 1        # e.g. ENOBUFS: not sent, so not on any device either
                        if _stopping:
                            raise _Stopped
                        if rate and (sent + errors) % 500 == 0:
                            _pace(start, rate, rounds * flows + flows - remaining + port - base_port)
                remaining -= n
                index += 1
            rounds += 1
            if not until_stopped:
                break
    except _Stopped:
        pass
    elapsed = time.perf_counter() - start
    for s in socks:
        s.close()
    return {"dest": dest, "echo": echo, "flows": flows, "packets_per_flow": packets, "sent": sent, "errors": errors,
            "rounds": rounds, "seconds": elapsed, "flows_per_s": flows / elapsed if elapsed else None}


def _stop(signum, frame):
    global _stopping
    _stopping = True


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routetrace.storm")
    p.add_argument("dest")
    p.add_argument("flows", type=int)
    p.add_argument("--packets", type=int, default=1)
    p.add_argument("--size", type=int, default=1)
    p.add_argument("--sockets", type=int, default=0)
    p.add_argument("--base-port", type=int, default=20000)
    p.add_argument("--rate", type=float, default=0, help="new flows per second (default: as fast as possible)")
    p.add_argument("--batch", type=int, default=0,
                   help="datagrams per sendmmsg call (UDP; default: one sendto each)")
    p.add_argument("--cpu", type=int, default=None, help="run only on this CPU")
    p.add_argument("--until-stopped", action="store_true",
                   help="repeat the flows until SIGTERM or SIGINT, then print what was sent")
    p.add_argument("--echo", action="store_true", help="ICMP echo requests (IPv4, root) instead of UDP datagrams")
    a = p.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    if a.until_stopped:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    print(json.dumps(storm(a.dest, a.flows, a.packets, a.size, a.sockets, a.base_port, a.rate, a.until_stopped, a.echo,
                                 a.batch)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
