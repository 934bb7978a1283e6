"""Load for the accounting tests and scripts/bench-scale: many distinct UDP flows, fast, bounded.

    python -m routetrace.storm DEST FLOWS [--packets N] [--size BYTES] [--sockets S] [--rate FLOWS_PER_S]
                               [--cpu N] [--until-stopped]

Flows are (source port, destination port) pairs: S sockets (S source ports), each sending to
FLOWS/S destination ports from --base-port on, N datagrams per flow; --rate paces the new flows
(checked every 500 sends), otherwise as fast as it can. Every datagram is an unconnected sendto,
so each is its own output route lookup. --cpu pins the sender to one CPU; --until-stopped sends
the same flows again and again until SIGTERM or SIGINT (a background flood for as long as another
load runs). Prints one JSON line: what was sent, so a test can compare it with what was traced.
Runs inside whatever network namespace it is started in; sends only to DEST.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time


class _Stopped(Exception):
    """SIGTERM or SIGINT during --until-stopped."""


def storm(dest: str, flows: int, packets: int = 1, size: int = 1, sockets: int = 0,
          base_port: int = 20000, rate: float = 0, until_stopped: bool = False) -> dict:
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
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
                    s = socket.socket(family, socket.SOCK_DGRAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
                    socks.append(s)
                s = socks[index]
                n = min(per_socket, remaining)
                for _ in range(packets):
                    for port in range(base_port, base_port + n):
                        try:
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
    return {"dest": dest, "flows": flows, "packets_per_flow": packets, "sent": sent, "errors": errors,
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
    a = p.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    if a.until_stopped:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    print(json.dumps(storm(a.dest, a.flows, a.packets, a.size, a.sockets, a.base_port, a.rate, a.until_stopped)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
