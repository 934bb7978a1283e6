"""Load for the accounting tests and scripts/bench-scale: many distinct UDP flows, fast, bounded.

    python -m routetrace.storm DEST FLOWS [--packets N] [--size BYTES] [--sockets S] [--rate FLOWS_PER_S]

Flows are (source port, destination port) pairs: S sockets (S source ports), each sending to
FLOWS/S destination ports from --base-port on, N datagrams per flow; --rate paces the new flows
(checked every 500 sends), otherwise as fast as it can. Prints one JSON line:
what was sent, so a test can compare it with what was traced. Runs inside whatever network
namespace it is started in; sends only to DEST.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def storm(dest: str, flows: int, packets: int = 1, size: int = 1, sockets: int = 0,
          base_port: int = 20000, rate: float = 0) -> dict:
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    per_socket = min(flows, 65535 - base_port) if sockets == 0 else -(-flows // sockets)
    socks = []
    payload = b"r" * size
    sent = errors = 0
    start = time.perf_counter()
    remaining = flows
    while remaining > 0:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        socks.append(s)
        n = min(per_socket, remaining)
        for _ in range(packets):
            for port in range(base_port, base_port + n):
                try:
                    s.sendto(payload, (dest, port))
                    sent += 1
                except OSError:
                    errors += 1        # e.g. ENOBUFS: not sent, so not on any device either
                if rate and (sent + errors) % 500 == 0:
                    ahead = (flows - remaining + port - base_port) / rate - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        remaining -= n
    elapsed = time.perf_counter() - start
    for s in socks:
        s.close()
    return {"dest": dest, "flows": flows, "packets_per_flow": packets, "sent": sent, "errors": errors,
            "seconds": elapsed, "flows_per_s": flows / elapsed if elapsed else None}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routetrace.storm")
    p.add_argument("dest")
    p.add_argument("flows", type=int)
    p.add_argument("--packets", type=int, default=1)
    p.add_argument("--size", type=int, default=1)
    p.add_argument("--sockets", type=int, default=0)
    p.add_argument("--base-port", type=int, default=20000)
    p.add_argument("--rate", type=float, default=0, help="new flows per second (default: as fast as possible)")
    a = p.parse_args(argv)
    print(json.dumps(storm(a.dest, a.flows, a.packets, a.size, a.sockets, a.base_port, a.rate)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
