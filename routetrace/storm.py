"""Load for the accounting tests and scripts/bench-scale: many distinct UDP flows, fast, bounded.

    python -m routetrace.storm DEST FLOWS [--packets N] [--size BYTES] [--sockets S] [--rate FLOWS_PER_S]
                               [--cpu N] [--until-stopped] [--echo]

Flows are (source port, destination port) pairs: S sockets (S source ports), each sending to
FLOWS/S destination ports from --base-port on, N datagrams per flow; --rate paces the new flows
(checked every 500 sends), otherwise as fast as it can. Every datagram is an unconnected sendto,
so each is its own output route lookup. --cpu pins the sender to one CPU; --until-stopped sends
the same flows again and again until SIGTERM or SIGINT (a background flood for as long as another
load runs). --echo sends ICMP echo requests instead (IPv4, a raw socket, so root), the port standing
for the echo id: the receiver answers each from its softirq. Prints one JSON line: what was sent,
so a test can compare it with what was traced.
Runs inside whatever network namespace it is started in; sends only to DEST.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import time


class _Stopped(Exception):
    """SIGTERM or SIGINT during --until-stopped."""


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request with its checksum (the kernel fills it in only for ICMPv6)."""
    head = struct.pack("!BBHHH", 8, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    data = head + b"\0" * (len(head) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return head[:2] + struct.pack("!H", ~total & 0xFFFF) + head[4:]


def storm(dest: str, flows: int, packets: int = 1, size: int = 1, sockets: int = 0,
          base_port: int = 20000, rate: float = 0, until_stopped: bool = False, echo: bool = False) -> dict:
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    if echo and family != socket.AF_INET:
        raise ValueError("--echo is IPv4 only")
    per_socket = min(flows, 65535 - base_port) if sockets == 0 else -(-flows // sockets)
    socks = []
    payload = b"r" * size
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
                    for port in range(base_port, base_port + n):
                        try:
                            if echo:
                                s.sendto(echo_request(port, rounds, payload), (dest, 0))
                            else:
                                s.sendto(payload, (dest, port))
                            sent += 1
                        except OSError:
                            errors += 1        # e.g. ENOBUFS: not sent, so not on any device either
                        if rate and (sent + errors) % 500 == 0:
                            done = rounds * flows + flows - remaining + port - base_port
                            ahead = done / rate - (time.perf_counter() - start)
                            if ahead > 0:
                                time.sleep(ahead)
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
    raise _Stopped


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routetrace.storm")
    p.add_argument("dest")
    p.add_argument("flows", type=int)
    p.add_argument("--packets", type=int, default=1)
    p.add_argument("--size", type=int, default=1)
    p.add_argument("--sockets", type=int, default=0)
    p.add_argument("--base-port", type=int, default=20000)
    p.add_argument("--rate", type=float, default=0, help="new flows per second (default: as fast as possible)")
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
    print(json.dumps(storm(a.dest, a.flows, a.packets, a.size, a.sockets, a.base_port, a.rate, a.until_stopped, a.echo)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
