"""bench's servers are up only when the sockets on their ports are theirs: on a shared host another
process may hold a port first, and then bench must say so (one line, exit 2), not hide a server of
its own that failed to bind behind the other one and measure that. Every case runs in a namespace
the test creates, the other process's socket being a plain socket of this test process there."""
import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from routetrace import bench, loadgen
from routetrace.errors import EnvironmentProblem

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@pytest.fixture
def tools_in_ci():
    """In CI sockperf and iperf3 must be there (scripts/setup installs them), so that their
    servers are the ones tested; elsewhere a missing one falls back to Python's, as bench does."""
    missing = [t for t in ("sockperf", "iperf3") if not shutil.which(t)]
    if missing and os.environ.get("CI"):
        pytest.fail(f"{', '.join(missing)} missing in CI: scripts/setup installs them")


@contextlib.contextmanager
def socket_in_namespace(ns: str, proto: str, address: str, port: int):
    """A plain socket of this process in namespace `ns`, bound to address:port (TCP: listening;
    UDP: with SO_REUSEADDR, which lets a server that also sets it bind the same port beside it,
    so the server's own bind succeeds and only ownership tells the two apart). Made in a thread
    that entered the namespace: a network namespace is per thread, and a socket stays in the one
    it was made in."""
    made: dict = {}

    def make():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            if proto == "udp":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            if proto == "tcp":
                s.listen(8)
            made["socket"] = s
        except BaseException as exc:     # noqa: BLE001 - raised in the test's thread below
            made["error"] = exc

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    with made["socket"]:
        yield made["socket"]


def _tools(load: str) -> dict[int, dict[str, str]]:
    return bench.tools_per_family(bench.FAMILIES, bench.MODES, load)


def _rr_port(tools, proto: str, base: int) -> int:
    """The port of the server that answers `proto`'s ping-pong (sockperf's, else Python's echo)."""
    tool = tools[4][f"{proto}-rr"]
    return base + {"sockperf": loadgen.PORT_SOCKPERF, "python": loadgen.PORT_ECHO}[tool]


def _binds(where: str, sandbox) -> list[str] | None:
    """As bench binds: each family's wildcard in its sandbox, only the targets on a host (here
    the test namespace's own addresses stand for a host's)."""
    return None if where == "sandbox" else [sandbox.own_addr, sandbox.own_addr6]


def _ss_holders(ns: str, base: int) -> dict[tuple[str, int, str], set[int]]:
    """(proto, port, local address) -> pids, for every socket on bench's ports in the namespace,
    as ss reports them (independent of loadgen's own reading of /proc)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hlntup"], capture_output=True, text=True,
                         check=True).stdout
    held = {}
    for line in out.splitlines():
        fields = line.split()
        address, port = fields[4].rsplit(":", 1)
        if base <= int(port) < base + loadgen.PORTS_USED:
            key = (fields[0], int(port), address.strip("[]").split("%")[0])
            held[key] = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    return held


@pytest.mark.parametrize("where", ["sandbox", "host"])
@pytest.mark.parametrize("load", ["auto", "python"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_port_held_by_another_process_fails_bench_naming_it(sandbox, tools_in_ci, where, load, proto):
    tools, base = _tools(load), 9100
    port = _rr_port(tools, proto, base)
    with socket_in_namespace(sandbox.host, proto, sandbox.own_addr, port):
        with pytest.raises(EnvironmentProblem) as failed:
            with loadgen.Servers(sandbox.host, base, tools, addresses=_binds(where, sandbox)):
                pass
    message = str(failed.value)
    assert re.fullmatch(rf"{proto.upper()} port {port} in namespace {sandbox.host} is held by another process "
                        rf"\(pid {os.getpid()} \(.*\), bound to {re.escape(sandbox.own_addr)}\), not by the server "
                        r"bench started: stop it or choose another base port with --port", message), message
    assert "\n" not in message


@pytest.mark.parametrize("where", ["sandbox", "host"])
@pytest.mark.parametrize("load", ["auto", "python"])
def test_every_socket_on_bench_ports_is_its_servers_and_other_ones_do_not_count(sandbox, tools_in_ci, where, load):
    """The normal case, with another process's sockets in the namespace that take nothing meant
    for bench's servers: on a host a listener at another address on the same port (bench binds
    only its targets), in a sandbox one just past bench's ports."""
    tools, base = _tools(load), 9100
    port = _rr_port(tools, "tcp", base)
    other = ("127.0.0.1", port) if where == "host" else (sandbox.own_addr, base + loadgen.PORTS_USED)
    with socket_in_namespace(sandbox.host, "tcp", *other):
        with loadgen.Servers(sandbox.host, base, tools, addresses=_binds(where, sandbox)) as servers:
            ours = {p.pid for p in servers.procs}
            assert ours and all(p.poll() is None for p in servers.procs)
            held = _ss_holders(sandbox.host, base)
            served = {(s.proto, s.port) for s in servers.served}
    assert {(proto, on) for proto, on, _a in held} == served
    for (proto, on, address), pids in held.items():
        if (address, on) == other and proto == "tcp":
            assert pids == {os.getpid()}
        else:
            assert pids and pids <= ours, (proto, on, address, pids)
    if where == "host":
        assert ("tcp", port, other[0]) in held      # it was there all along, and did not count
        assert {address for _p, _on, address in held} == {sandbox.own_addr, sandbox.own_addr6, other[0]}


def test_bench_on_a_host_whose_port_another_process_holds_says_so_in_one_line(sandbox, tools_in_ci):
    """routetrace bench on a "host" (run inside the test's namespace, whose own address is the
    target) where another process listens on bench's port at that address: exit 2, one line."""
    tools = bench.tools_per_family([4], ("tcp-rr",), "auto")
    base = 9100
    port = _rr_port(tools, "tcp", base)
    with socket_in_namespace(sandbox.host, "tcp", sandbox.own_addr, port):
        run = subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-m", "routetrace", "bench",
                              "-4", "--to", sandbox.own_addr, "--port", str(base), "--mode", "tcp-rr",
                              "--rounds", "2", "--duration", "0.2"],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"TCP port {port} is held by another process (pid {os.getpid()} " in lines[0], lines[0]
    assert run.stdout == ""


@pytest.mark.parametrize("ours, theirs, overlaps", [
    ("198.51.100.1", "198.51.100.1", True),
    ("198.51.100.1", "0.0.0.0", True),
    ("0.0.0.0", "198.51.100.1", True),
    ("198.51.100.1", "::", True),           # a dual-stack IPv6 wildcard takes IPv4 too
    ("198.51.100.1", "127.0.0.1", False),
    ("198.51.100.1", "198.51.100.2", False),
    ("2001:db8::1", "0.0.0.0", False),
    ("2001:db8::1", "::", True),
    ("2001:db8::1", "2001:db8::2", False),
    (None, "127.0.0.1", True),              # a wildcard server of ours (iperf3 without -B)
])
def test_which_other_sockets_would_take_a_servers_traffic(ours, theirs, overlaps):
    assert loadgen._overlaps(ours, theirs) is overlaps


def test_proc_net_addresses_decode_in_host_byte_order():
    """As this machine's /proc/net/tcp{,6} print 127.0.0.1, 2001:db8::1 and ::ffff:192.0.2.1."""
    import struct
    def printed(packed: bytes) -> str:
        return "".join(f"{word:08X}" for word in struct.unpack(f"={len(packed) // 4}I", packed))
    for address in ("127.0.0.1", "198.51.100.1", "2001:db8::1", "::"):
        assert loadgen._proc_net_address(printed(socket.inet_pton(
            socket.AF_INET6 if ":" in address else socket.AF_INET, address))) == address
    assert loadgen._proc_net_address(printed(socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1"))) == "192.0.2.1"
