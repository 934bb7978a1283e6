"""The load generator's batched path (sendmmsg): every datagram reaches its own destination port,
on IPv4 and IPv6, counted as the one-sendto path counts. Loopback only, no root."""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest


def bind_consecutive(family, dest, count: int = 10) -> list[socket.socket]:
    """`count` UDP sockets bound to consecutive free ports of dest."""
    for _ in range(50):
        first = socket.socket(family, socket.SOCK_DGRAM)
        first.bind((dest, 0))
        base = first.getsockname()[1]
        bound = [first]
        try:
            for i in range(1, count):
                r = socket.socket(family, socket.SOCK_DGRAM)
                bound.append(r)
                r.bind((dest, base + i))
            return bound
        except OSError:
            for r in bound:
                r.close()
    pytest.fail(f"no {count} consecutive free UDP ports")


@pytest.mark.parametrize("family,dest", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
@pytest.mark.parametrize("batch", [0, 4])
def test_each_datagram_reaches_its_port(family, dest, batch):
    receivers = bind_consecutive(family, dest)
    base = receivers[0].getsockname()[1]
    try:
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


@pytest.mark.parametrize("batch", [0, 4])
def test_a_stopped_flood_reports_every_datagram_it_sent(batch):
    """--until-stopped ends on SIGTERM between sends: the datagrams it reports are the ones the
    receivers got, to the one (paced: about 120 a port, within a receive buffer's 256)."""
    receivers = bind_consecutive(socket.AF_INET, "127.0.0.1")
    base = receivers[0].getsockname()[1]
    try:
        flood = subprocess.Popen([sys.executable, "-m", "routetrace.storm", "127.0.0.1", "10", "--base-port", str(base),
                                  "--batch", str(batch), "--rate", "1500", "--until-stopped"],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(0.8)
        flood.send_signal(signal.SIGTERM)
        report = json.loads(flood.communicate(timeout=30)[0])
        assert flood.returncode == 0 and report["errors"] == 0 and report["rounds"] >= 10, report
        received = 0
        for r in receivers:
            r.setblocking(False)
            while True:
                try:
                    r.recvfrom(64)
                except BlockingIOError:
                    break
                received += 1
        assert received == report["sent"] > 0
    finally:
        for r in receivers:
            r.close()
