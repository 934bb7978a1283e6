"""Many sockets to ONE destination with different routes, connecting at once from both CPUs.

The sandbox's host namespace gets a second veth to the peer: eth0 198.51.100.1/24 (the peer's
eth0 198.51.100.2) and eth1 203.0.113.1/24 (the peer's eth1 203.0.113.2), and a default route via
203.0.113.2 on eth1. Every client connects to 198.51.100.2: a socket bound to eth0
(SO_BINDTODEVICE) is routed on the connected route (UNICAST, eth0), one bound to eth1 by the
default route (UNICAST via 203.0.113.2, eth1). Threads pinned to each CPU run both kinds at once,
so their route lookups interleave; a tracer that files a route answer by destination alone gives
some flows the other device.

Used natively (tests/test_concurrent_routes_bpf.py, tracepoint plan) and in the VM matrix (kprobe
plan: tests/test_vm_matrix.py).
"""
import json
import secrets
import subprocess
import sys

PORT = 8895
EXTRA_OWN, EXTRA_PEER, EXTRA_PREFIX = "203.0.113.1", "203.0.113.2", 24
DEVICES = ("eth0", "eth1")

# Runs in the host namespace: one thread per (device, CPU), each pinned to its CPU, each making
# `count` TCP connections (a line sent and echoed) or, with udp, unconnected datagrams for
# `seconds` from one socket. Prints {device: [source ports]}.
CLIENT = r"""
import json, os, socket, sys, threading, time
peer, port, count, proto, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
cpus = sorted(os.sched_getaffinity(0))[:2]
ports = {dev: [] for dev in ("eth0", "eth1")}
lock = threading.Lock()
start = threading.Barrier(2 * len(cpus))
errors = []

def bound(dev, kind):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.settimeout(10)
    return s

def tcp(dev):
    for _ in range(count):
        with bound(dev, socket.SOCK_STREAM) as s:
            s.connect((peer, port))
            s.sendall(b"routetrace\n")
            if s.recv(100) != b"routetrace\n":
                raise RuntimeError("bad echo")
            with lock:
                ports[dev].append(s.getsockname()[1])

def udp(dev):
    with bound(dev, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        with lock:
            ports[dev].append(s.getsockname()[1])
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendto(b"routetrace\n", (peer, port))

def run(dev, cpu):
    try:
        os.sched_setaffinity(0, {cpu})      # this thread only
        start.wait()
        (udp if proto == "udp" else tcp)(dev)
    except Exception as exc:
        errors.append(f"{dev} on CPU {cpu}: {exc!r}")

threads = [threading.Thread(target=run, args=(dev, cpu)) for dev in ("eth0", "eth1") for cpu in cpus]
for t in threads: t.start()
for t in threads: t.join()
if errors:
    sys.exit("; ".join(errors))
print(json.dumps({"cpus": cpus, "ports": ports}))
"""


# Runs in the host namespace, pinned to one CPU: connect() a UDP socket to the peer over and over
# for `seconds`. Each connect routes (ip_route_connect: one or two lookups) and sends nothing, so
# the CPU spends much of its time in the route function; one of these per CPU makes their calls
# overlap constantly. Prints how many connects it made.
CHURN = r"""
import os, socket, sys, time
os.sched_setaffinity(0, {int(sys.argv[3])})
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, end = 0, time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    s.connect((sys.argv[1], int(sys.argv[2])))
    n += 1
print(n)
"""


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def add_second_path(sb) -> None:
    """eth1 between the sandbox's namespaces, and the host's default route through it."""
    tag = secrets.token_hex(3)
    _ip("link", "add", f"rc{tag}a", "type", "veth", "peer", "name", f"rc{tag}b")
    for ns, dev, addr in ((sb.host, f"rc{tag}a", EXTRA_OWN), (sb.peer, f"rc{tag}b", EXTRA_PEER)):
        _ip("link", "set", dev, "netns", ns)
        _ip("-n", ns, "link", "set", dev, "name", "eth1")
        _ip("-n", ns, "addr", "add", f"{addr}/{EXTRA_PREFIX}", "dev", "eth1")
        _ip("-n", ns, "link", "set", "eth1", "up")
        # The peer answers on eth1 for its eth0 address; the host gets replies from 198.51.100.2 on
        # eth1: no reverse-path filtering in either (a new namespace may inherit it strict).
        for conf in ("all", "default", "eth0", "eth1"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0"],
                           check=True, capture_output=True)
    _ip("-n", sb.host, "route", "add", "default", "via", EXTRA_PEER, "dev", "eth1")


def prepare(sb) -> None:
    add_second_path(sb)
    sb.serve(sb.peer, PORT, addresses=[sb.peer_addr])


def connect_concurrently(sb, count: int, proto: str = "tcp", seconds: float = 0.0) -> dict:
    """{device: [source ports]} of the clients, after they all finished."""
    out = subprocess.run(["ip", "netns", "exec", sb.host, sys.executable, "-c", CLIENT, sb.peer_addr, str(PORT),
                          str(count), proto, str(seconds)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["cpus"]) == 2, f"the clients need two CPUs to interleave, have {result['cpus']}"
    return result["ports"]


def churn_lookups(sb, seconds: float) -> subprocess.Popen:
    """Route lookups on both CPUs at once, in two processes (no shared interpreter lock), for
    `seconds`: wait() on what this returns."""
    procs = [subprocess.Popen(["ip", "netns", "exec", sb.host, sys.executable, "-c", CHURN, sb.peer_addr, str(PORT),
                               str(cpu), str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cpu in (0, 1)]

    class Both:
        def wait(self, timeout=600):
            outs = [p.communicate(timeout=timeout) for p in procs]
            assert all(p.returncode == 0 for p in procs), outs
            return [int(out) for out, _err in outs]
    return Both()


def check_each_flow_took_its_own_route(flows: list, ports: dict, sb, proto: str = "tcp") -> list:
    """Every client flow to the peer has its bound device's route and left on it. Returns them."""
    source = {"eth0": sb.own_addr, "eth1": EXTRA_OWN}      # each device's own address
    checked = []
    for dev in DEVICES:
        assert ports[dev], f"no client bound to {dev} ran: {ports}"
        for sport in ports[dev]:
            found = [f for f in flows if f["proto"] == proto and f["daddr"] == sb.peer_addr and f["dport"] == PORT
                     and f["saddr"] == source[dev] and f["sport"] == sport]
            assert len(found) == 1, f"expected one {proto} flow from port {sport} ({dev}), got {found}"
            flow = found[0]
            assert (flow["route_type"], flow["route_dev"]) == ("UNICAST", dev), flow
            assert set(flow["xmit_devs"]) == {dev}, flow
            checked.append(flow)
    return checked
