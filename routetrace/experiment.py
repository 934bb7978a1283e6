"""Traffic for experiments and tests: a throwaway pair of network namespaces, a listener, a client.

The sandbox is the article's machine in miniature: namespace A has an interface named eth0
with 198.51.100.1/24 (its "own IP"), namespace B is a peer at 198.51.100.2 (a non-local
control). Only these addresses and loopback are ever used as destinations.
"""
from __future__ import annotations

import argparse
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from .errors import EnvironmentProblem

OWN_ADDR, PEER_ADDR, PREFIX = "198.51.100.1", "198.51.100.2", 24


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise EnvironmentProblem(f"ip {' '.join(args)}: {out.stderr.strip()}")


@dataclass
class Sandbox:
    """Two namespaces joined by a veth pair; removed on exit, whatever happened inside."""
    host: str = ""
    peer: str = ""
    own_addr: str = OWN_ADDR
    peer_addr: str = PEER_ADDR
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> "Sandbox":
        tag = secrets.token_hex(3)
        self.host, self.peer = f"rt-{tag}-host", f"rt-{tag}-peer"
        try:
            _ip("netns", "add", self.host)
            _ip("netns", "add", self.peer)
            # veth names are global until moved: make them unique, then call both eth0.
            _ip("link", "add", f"rt{tag}a", "type", "veth", "peer", "name", f"rt{tag}b")
            for ns, dev, addr in ((self.host, f"rt{tag}a", self.own_addr), (self.peer, f"rt{tag}b", self.peer_addr)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "link", "set", dev, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._procs.clear()
        for ns in (self.host, self.peer):
            if ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def serve(self, ns: str | None, *ports: int, kind: str = "serve") -> None:
        self._procs.append(start_listener(ns, ports, kind))

    def connect(self, ns: str | None, host: str, port: int, proto: str = "tcp") -> str:
        return connect_from(ns, host, port, proto)


def _argv(ns: str | None, *args: str) -> list[str]:
    """This module run as a helper process, inside network namespace `ns` (None: this one)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return [*prefix, sys.executable, "-m", "routetrace.experiment", *args]


def start_listener(ns: str | None, ports, kind: str = "serve") -> subprocess.Popen:
    """A listener on every address of `ns`, on each port; ready when this returns."""
    proc = subprocess.Popen(_argv(ns, kind, *map(str, ports)), stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise EnvironmentProblem(f"could not listen on port {', '.join(map(str, ports))}"
                                 f"{f' in {ns}' if ns else ''} (in use?)")
    return proc


def connect_from(ns: str | None, host: str, port: int, proto: str = "tcp") -> str:
    """Connect from `ns`, send a line, expect it back; returns "ok" or "refused"."""
    out = subprocess.run(_argv(ns, "connect", host, str(port), "--proto", proto),
                         capture_output=True, text=True, check=False, timeout=30)
    if out.returncode != 0:
        raise EnvironmentProblem(f"client to {host}:{port} failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


# ---- the processes that run inside a namespace -------------------------------------------

MESSAGE = b"routetrace\n"


def serve(ports: list[int]) -> None:
    import selectors
    sel = selectors.DefaultSelector()
    for port in ports:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", port))
        tcp.listen(128)
        sel.register(tcp, selectors.EVENT_READ, "tcp")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", port))
        sel.register(udp, selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data == "tcp":
                conn, _ = sock.accept()
                conn.settimeout(5)
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(data)
                except OSError:
                    pass
                conn.close()
            else:
                data, peer = sock.recvfrom(65536)
                sock.sendto(data, peer)


def connect(host: str, port: int, proto: str) -> str:
    if proto == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.connect((host, port))
            s.send(MESSAGE)
            try:
                return "ok" if s.recv(65536) == MESSAGE else "bad reply"
            except ConnectionRefusedError:
                return "refused"
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(MESSAGE)
            reply = s.recv(65536)
            return "ok" if reply == MESSAGE else "bad reply"
    except ConnectionRefusedError:
        return "refused"


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="routetrace.experiment")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("ports", type=int, nargs="+")
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.ports)
    else:
        print(connect(args.host, args.port, args.proto))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
