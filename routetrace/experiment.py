"""Traffic for experiments and tests: a throwaway pair of network namespaces, a listener, a client.

The sandbox is the article's machine in miniature: namespace A has an interface named eth0
with 198.51.100.1/24 (its "own IP"), namespace B is a peer at 198.51.100.2 (a non-local
control). Only these addresses and loopback are ever used as destinations.
"""
from __future__ import annotations

import argparse
import errno
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from .errors import EnvironmentProblem, UsageError

OWN_ADDR, PEER_ADDR, PREFIX = "198.51.100.1", "198.51.100.2", 24
OWN_ADDR6, PEER_ADDR6, PREFIX6 = "2001:db8::1", "2001:db8::2", 64


def run_ip(*args: str) -> None:
    """`ip ARGS`, or EnvironmentProblem with what ip said."""
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
    own_addr6: str = OWN_ADDR6
    peer_addr6: str = PEER_ADDR6
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> "Sandbox":
        tag = secrets.token_hex(3)
        self.host, self.peer = f"rt-{tag}-host", f"rt-{tag}-peer"
        try:
            run_ip("netns", "add", self.host)
            run_ip("netns", "add", self.peer)
            # veth names are global until moved: make them unique, then call both eth0.
            run_ip("link", "add", f"rt{tag}a", "type", "veth", "peer", "name", f"rt{tag}b")
            for ns, dev, addr, addr6 in ((self.host, f"rt{tag}a", self.own_addr, self.own_addr6),
                                         (self.peer, f"rt{tag}b", self.peer_addr, self.peer_addr6)):
                run_ip("link", "set", dev, "netns", ns)
                run_ip("-n", ns, "link", "set", dev, "name", "eth0")
                run_ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", "eth0")
                # nodad: usable at once, no duplicate-address probe to wait for
                run_ip("-n", ns, "addr", "add", f"{addr6}/{PREFIX6}", "dev", "eth0", "nodad")
                run_ip("-n", ns, "link", "set", "lo", "up")
                run_ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            stop_process(proc)
        self._procs.clear()
        for ns in (self.host, self.peer):
            if ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def describe(self) -> str:
        return (f"sandbox: namespaces {self.host} (eth0 {self.own_addr}/{PREFIX} {self.own_addr6}/{PREFIX6}) and "
                f"{self.peer} (eth0 {self.peer_addr}/{PREFIX} {self.peer_addr6}/{PREFIX6}), removed on exit")

    def serve(self, ns: str | None, *ports: int, addresses: list[str] | None = None,
              device: str | None = None) -> None:
        self._procs.append(start_listener(ns, ports, addresses=addresses, device=device))

    def connect(self, ns: str | None, host: str, port: int, proto: str = "tcp",
                options: "SocketOptions | None" = None) -> str:
        return connect_from(ns, host, port, proto, options)


def enter_sandbox(stack) -> Sandbox:
    """A Sandbox held by an ExitStack, announced on stderr so its namespaces can be found."""
    sb = stack.enter_context(Sandbox())
    print(sb.describe(), file=sys.stderr, flush=True)
    return sb


def host_addresses(given: list[str]) -> list[str]:
    """The own addresses to test on this host: those given, else every non-loopback IPv4 one."""
    from . import netns
    own = list(given) or netns.own_ipv4()
    if not own:
        raise UsageError("this host has no IPv4 address besides loopback: give one with --to, or use --sandbox")
    return own


def _argv(ns: str | None, *args: str) -> list[str]:
    """This module run as a helper process, inside network namespace `ns` (None: this one)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return [*prefix, sys.executable, "-m", "routetrace.experiment", *args]


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def listen_addresses(ns: str | None) -> list[str]:
    """What a helper binds when not told: 127.0.0.1 and the namespace's own IPv4 addresses,
    each by itself (never the wildcard)."""
    from . import netns
    return ["127.0.0.1", *netns.own_ipv4(netns.inode_of(ns))]


def start_listener(ns: str | None, ports, addresses: list[str] | None = None,
                   drop: bool | None = None, device: str | None = None) -> subprocess.Popen:
    """A listener on each of `addresses` (default: see listen_addresses) in `ns`, on each port;
    ready when this returns. On a real host (ns None) it drops root to nobody once bound.
    `device`: bind the sockets to it first (SO_BINDTODEVICE; a VRF master puts them in its VRF)."""
    addresses = list(addresses) if addresses else listen_addresses(ns)
    drop = (ns is None) if drop is None else drop
    args = ["serve", *map(str, ports), "--bind", ",".join(addresses)] + (["--drop"] if drop else [])
    args += ["--device", device] if device else []
    proc = subprocess.Popen(_argv(ns, *args), stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise EnvironmentProblem(f"could not listen on {', '.join(addresses)} port {', '.join(map(str, ports))}"
                                 f"{f' in {ns}' if ns else ''} (in use?)")
    return proc


@dataclass(frozen=True)
class SocketOptions:
    """What a client socket is given before connect(): each changes the route the kernel picks."""
    device: str | None = None     # SO_BINDTODEVICE: the lookup's oif
    mark: int | None = None       # SO_MARK: the lookup's fwmark (policy rules match it)
    source: str | None = None     # bind() to this address first: the lookup's saddr
    timeout: float = 5.0          # seconds connect() may take ("timeout" when it does not complete)

    def argv(self) -> list[str]:
        return ([*(["--device", self.device] if self.device else []),
                 *(["--mark", str(self.mark)] if self.mark is not None else []),
                 *(["--source", self.source] if self.source else []), "--timeout", str(self.timeout)])


def connect_from(ns: str | None, host: str, port: int, proto: str = "tcp",
                 options: SocketOptions | None = None) -> str:
    """Connect from `ns`, send a line, expect it back; returns "ok", "refused" or (with a
    client that could not reach anyone) "timeout", "unreachable"."""
    out = subprocess.run(_argv(ns, "connect", host, str(port), "--proto", proto, *(options or SocketOptions()).argv()),
                         capture_output=True, text=True, check=False, timeout=30)
    if out.returncode != 0:
        raise EnvironmentProblem(f"client to {host}:{port} failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


# ---- the processes that run inside a namespace -------------------------------------------

MESSAGE = b"routetrace\n"


MAX_CONNECTIONS = 256          # served at once; more are closed at accept
CONNECTION_TIMEOUT_S = 5


def _bound(addr: str, port: int, kind: int, device: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if device:
        # Before bind(): in a VRF the address is looked up in the VRF's table.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    return sock


def _drop_root() -> None:
    """A helper on a real host needs root only to bind: then it is nobody, with nothing."""
    import os
    if os.geteuid() == 0:
        from .privileges import drop_to_nobody
        drop_to_nobody()


def _one_reply(conn: socket.socket, slots) -> None:
    """Echo what the first read brings, then close; each connection in its own thread, so a
    client that sends nothing stalls only itself, for at most CONNECTION_TIMEOUT_S."""
    try:
        with conn:
            conn.settimeout(CONNECTION_TIMEOUT_S)
            data = conn.recv(65536)
            if data:
                conn.sendall(data)
    except OSError:
        pass
    finally:
        slots.release()


def serve(ports: list[int], addresses: list[str] = ("0.0.0.0",), drop: bool = False,
          device: str | None = None) -> None:
    import selectors
    import threading
    sel = selectors.DefaultSelector()
    for port in ports:
        for addr in addresses:
            sel.register(_bound(addr, port, socket.SOCK_STREAM, device), selectors.EVENT_READ, "tcp")
            sel.register(_bound(addr, port, socket.SOCK_DGRAM, device), selectors.EVENT_READ, "udp")
    if drop:
        _drop_root()
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data == "tcp":
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                if not slots.acquire(blocking=False):
                    conn.close()
                    continue
                threading.Thread(target=_one_reply, args=(conn, slots), daemon=True).start()
            else:
                try:
                    data, peer = sock.recvfrom(65536)
                    sock.sendto(data, peer)
                except OSError:
                    pass


def _configured(sock: socket.socket, options: SocketOptions) -> socket.socket:
    if options.device:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, options.device.encode())
    if options.mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, options.mark)
    if options.source:
        sock.bind((options.source, 0))
    return sock


def connect(host: str, port: int, proto: str, options: SocketOptions | None = None) -> str:
    if options is not None and options != SocketOptions():
        return _connect_with(host, port, options)
    if proto == "udp":
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
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


def _connect_with(host: str, port: int, options: SocketOptions) -> str:
    """A TCP client whose socket is bound, marked or sourced first: its connect() may leave
    on another device and never complete (the SYNs are what is traced), so it is bounded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _configured(socket.socket(family, socket.SOCK_STREAM), options) as s:
        s.settimeout(options.timeout)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return "unreachable"
            raise
        s.sendall(MESSAGE)
        return "ok" if s.recv(65536) == MESSAGE else "bad reply"


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="routetrace.experiment")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("ports", type=int, nargs="+")
    s.add_argument("--bind", default="0.0.0.0", help="comma-separated addresses")
    s.add_argument("--drop", action="store_true", help="become nobody once bound")
    s.add_argument("--device", help="SO_BINDTODEVICE before bind")
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    c.add_argument("--device")
    c.add_argument("--mark", type=int)
    c.add_argument("--source")
    c.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.ports, args.bind.split(","), args.drop, args.device)
    else:
        print(connect(args.host, args.port, args.proto,
                      SocketOptions(args.device, args.mark, args.source, args.timeout)))
    return 0


def run_helper(main, argv: list[str]) -> None:
    """The entry point of a helper process (this module's, loadgen's): exit codes, no tracebacks."""
    try:
        sys.exit(main(argv))
    except (KeyboardInterrupt, BrokenPipeError):
        # The parent (prove, bench, a test) was interrupted and took the pipe with it: a helper
        # has nothing to add to the user's terminal.
        sys.exit(130)
    except OSError as exc:
        # E.g. its namespace was removed under it (the parent was interrupted while it started):
        # one line, which the parent reports if it is still there to care.
        print(f"routetrace helper: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_helper(_main, sys.argv[1:])
