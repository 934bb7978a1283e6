"""The load generator's batched path (sendmmsg): every datagram reaches its own destination port,
on IPv4 and IPv6, counted as the one-sendto path counts. Loopback only, no root."""
import json
import socket
import subprocess
import sys

import pytest


@pytest.mark.parametrize("family,dest", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
@pytest.mark.parametrize("batch", [0, 4])
def test_each_datagram_reaches_its_port(family, dest, batch):
    receivers = []
    try:
        for _ in range(10):
            r = socket.socket(family, socket.SOCK_DGRAM)
            receivers.append(r)
        # Ten consecutive free ports: bind the first to 0, then try the nine after it.
        for attempt in range(50):
            receivers[0].close()
            receivers[0] = socket.socket(family, socket.SOCK_DGRAM)
            receivers[0].bind((dest, 0))
            base = receivers[0].getsockname()[1]
            if base + 10 > 65535:
                continue
            try:
                for i, r in enumerate(receivers[1:], 1):
                    r.bind((dest, base + i))
                break
            except OSError:
                for i, r in enumerate(receivers[1:], 1):
                    r.close()
                    receivers[i] = socket.socket(family, socket.SOCK_DGRAM)
        else:
            pytest.fail("no ten consecutive free UDP ports")
        out = subprocess.run([sys.executable, "-m", "routetrace.storm", dest, "10", "--base-port", str(base),
                              "--packets", "2", "--size", "7", "--batch", str(batch)],
                             capture_output=True, text=True, check=True, timeout=60)
        report = json.loads(out.stdout)
        assert (report["sent"], report["errors"], report["flows"]) == (20, 0, 10)
        sources = set()
        for i, r in enumerate(receivers):
            r.settimeout(5)
            for _ in range(2):
                data, addr = r.recvfrom(64)
                assert data == b"r" * 7
                sources.add(addr[1])
            r.setblocking(False)
            with pytest.raises(BlockingIOError):     # exactly two each
                r.recvfrom(64)
        assert len(sources) == 1                      # one socket: one source port
    finally:
        for r in receivers:
            r.close()
