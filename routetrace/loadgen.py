"""The load for `routetrace bench`: the field's own tools (sockperf, iperf3) run as subprocesses
inside a network namespace, their machine-readable output parsed here; Python clients and
servers where a tool is missing (and for connection rate, where no packaged tool measures it).

Each workload ("mode") has one driver per tool; `measure()` picks the first tool present and
returns a Result naming it, so every number in bench's tables says which tool produced it.

Ports, from the base port P: P sockperf server (TCP and UDP), P+1 iperf3 server,
P+2 accept-and-close (connection rate), P+3 Python echo (TCP and UDP), P+4 Python sink.

Never root: bench needs root for its namespaces and probes, its load does not (ports >= 1024,
taskset pins its own process). Every server and client becomes nobody with no capabilities once
its privileged setup is over, after `ip netns exec` entered the namespace: the Python ones
themselves, right after binding (privileges.drop_to_nobody, as prove's helpers do); sockperf
and iperf3 through privileges.unprivileged, which drops and then execs the tool.

Both address families: a tool drives a family only where it can (sockperf gained IPv6 in 3.8;
Debian's 3.7 rejects "-i ::1" as an invalid address), so an IPv6 comparison may use the Python
clients where the IPv4 one uses sockperf, and each Result names its tool.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import netns, privileges, sanitize
from .errors import EnvironmentProblem, RoutetraceError
from .experiment import stop_process

# mode -> (what it measures, the tools that can drive it, best first)
MODES = {
    "tcp-rr": ("TCP 14-byte ping-pong round trip", ("sockperf", "python")),
    "udp-rr": ("UDP 14-byte ping-pong round trip", ("sockperf", "python")),
    "tcp-tp": ("TCP one-way throughput, 16 KiB writes", ("sockperf", "python")),
    "udp-tp": ("UDP one-way send rate, 1472-byte datagrams", ("sockperf", "python")),
    "tcp-bulk": ("TCP bulk throughput (receiver)", ("iperf3", "python")),
    "conn": ("TCP connect + RST close, one at a time", ("python",)),
}
LATENCY_MODES = ("tcp-rr", "udp-rr")
RR_SIZE, TCP_TP_SIZE, UDP_TP_SIZE = 14, 16384, 1472
SOCKPERF_WARMUP_S = 0.4             # sockperf's own warm-up inside -t, not in its statistics
PORT_SOCKPERF, PORT_IPERF3, PORT_ACCEPT, PORT_ECHO, PORT_SINK = range(5)
PORTS_USED = 5


SOCKPERF_FIRST_IPV6 = (3, 8)         # sockperf's IPv6 support (Mellanox/sockperf#161) came in 3.8


def family_of(address: str) -> int:
    """4 or 6, for an address literal (the targets are always literals)."""
    return ipaddress.ip_address(address).version


def _socket_family(address: str) -> int:
    return socket.AF_INET6 if family_of(address) == 6 else socket.AF_INET


def tool_path(tool: str) -> str | None:
    return sys.executable if tool == "python" else shutil.which(tool)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def tool_supports(tool: str, family: int) -> bool:
    """Whether this machine's `tool` can address `family`: iperf3 and the Python clients can;
    sockperf only from 3.8 on (3.7 rejects "-i ::1" as an invalid address)."""
    if family == 4 or tool != "sockperf":
        return True
    version = tool_version(tool)
    return version.startswith("sockperf ") and _version_tuple(version) >= SOCKPERF_FIRST_IPV6


def tools_available(modes=MODES, family: int = 4) -> dict[str, str]:
    """mode -> the tool that will drive it here, for targets of `family`."""
    tools = {t for m in modes for t in MODES[m][1]}
    usable = {t for t in tools if tool_path(t) and tool_supports(t, family)}
    return {m: next(t for t in MODES[m][1] if t in usable) for m in modes}


def tool_version(tool: str) -> str:
    try:
        if tool == "sockperf":
            out = subprocess.run(["sockperf", "--version"], capture_output=True, text=True, timeout=10)
            m = re.search(r"version\s+#?([\w.\-]+)", out.stdout + out.stderr)
        elif tool == "iperf3":
            out = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, timeout=10)
            m = re.search(r"iperf\s+([\w.\-+]+)", out.stdout + out.stderr)
        else:
            return f"python {sys.version.split()[0]}"
    except (OSError, subprocess.TimeoutExpired):
        return tool
    return f"{tool} {m.group(1)}" if m else tool


@dataclass
class Result:
    """One measured slice. values: metric -> number; latencies_us: the slice's round trips
    (sorted), for percentiles and the plot."""
    mode: str
    tool: str
    values: dict[str, float]
    latencies_us: list[float] = field(default_factory=list, repr=False)
    duration_s: float = 0.0


# ---- statistics on one slice ------------------------------------------------------------

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: list[float], q: float) -> float:
    """sockperf's percentile, so that ours and its summary agree: the value at rank
    q/100 * (n - 1), rounded to the nearest rank (a tie goes to the lower one).
    sorted_values must be sorted and non-empty."""
    import math
    from fractions import Fraction
    if not sorted_values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError("percentile must be in [0, 100]")
    rank = Fraction(str(q)) * (len(sorted_values) - 1) / 100
    return sorted_values[max(0, math.ceil(rank - Fraction(1, 2)))]


def latency_values(lat: list[float]) -> dict[str, float]:
    lat.sort()
    out = {f"p{q:g}": percentile(lat, q) for q in PERCENTILES}
    out["samples"] = float(len(lat))
    return out


# ---- parsers of the tools' output ------------------------------------------------------

def parse_sockperf_full_log(text: str) -> list[float]:
    """sockperf --full-log FILE: a summary block, then "packet, txTime(sec), rxTime(sec),
    rtt(usec)" (or "latency(usec)" without --full-rtt) and one CSV row per message of the valid
    (post warm-up) period. Returns the last column, in microseconds."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("packet,") and "(usec)" in line:
            break
    else:
        raise ValueError("no sockperf full-log table (header 'packet, txTime(sec), ...') found")
    out = []
    for line in lines[i + 1:]:
        parts = line.split(",")
        if len(parts) < 4:
            if line.startswith("---") or not line.strip():
                continue
            raise ValueError(f"unexpected sockperf full-log line: {line!r}")
        out.append(float(parts[3]))
    if not out:
        raise ValueError("sockperf full log has no messages")
    return out


_SP_PCTL = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_SP_VALID = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)")


def parse_sockperf_pp_summary(text: str) -> dict[str, float]:
    """sockperf ping-pong's own summary (stdout or the full log's head): its percentiles (in
    the same unit as the log, round trip with --full-rtt) and the valid run time."""
    m = _SP_VALID.search(text)
    if not m:
        raise ValueError("no '[Valid Duration]' line in sockperf output")
    out = {"valid_s": float(m.group(1)), "sent": float(m.group(2)), "received": float(m.group(3))}
    for q, v in _SP_PCTL.findall(text):
        out[f"p{float(q):g}"] = float(v)
    return out


_SP_TP_TOTAL = re.compile(r"Total of (\d+) messages sent in ([\d.]+) sec")
_SP_TP_RATE = re.compile(r"Message Rate is (\d+) \[msg/sec\]")
_SP_TP_BW = re.compile(r"BandWidth is ([\d.]+) MBps")


def parse_sockperf_tp(text: str, msg_size: int) -> dict[str, float]:
    """sockperf throughput: it prints no machine-readable form; its summary lines are stable.
    Sender side (one-way, nothing acknowledges), in bytes of payload per second."""
    total, rate = _SP_TP_TOTAL.search(text), _SP_TP_RATE.search(text)
    if not total or not rate:
        raise ValueError("no 'Total of N messages sent in T sec' / 'Message Rate' in sockperf output")
    messages, seconds = int(total.group(1)), float(total.group(2))
    return {"msg_per_s": messages / seconds, "mb_per_s": messages * msg_size / seconds / 1e6,
            "sockperf_msg_per_s": float(rate.group(1))}


def parse_iperf3_json(text: str) -> dict[str, float]:
    """iperf3 -J: the receiver's byte count over its own time (what arrived, not what left)."""
    data = json.loads(text)
    if "error" in data:
        raise ValueError(f"iperf3: {data['error']}")
    rx, tx = data["end"]["sum_received"], data["end"]["sum_sent"]
    cpu = data["end"].get("cpu_utilization_percent", {})
    return {"mb_per_s": rx["bytes"] / rx["seconds"] / 1e6, "sent_mb_per_s": tx["bytes"] / tx["seconds"] / 1e6,
            "retransmits": float(tx.get("retransmits", 0)), "client_cpu_pct": float(cpu.get("host_total", 0.0)),
            "server_cpu_pct": float(cpu.get("remote_total", 0.0))}


# ---- running things inside a namespace ----------------------------------------------------

@dataclass(frozen=True)
class Pinning:
    """CPUs for client and server (taskset -c), or None for the scheduler's choice."""
    client: str | None = None
    server: str | None = None

    def describe(self) -> str:
        if self.client is None and self.server is None:
            return "not pinned"
        if self.client == self.server:
            return f"client and servers on CPU {self.client} (taskset)"
        return f"client on CPU {self.client or 'any'}, server on CPU {self.server or 'any'} (taskset)"


def _in_namespace(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def load_command(ns: str | None, cpus: str | None, argv: list[str]) -> list[str]:
    """argv as a load process: in namespace `ns` (None: this one), pinned to `cpus` (taskset -c,
    None: not pinned), never root. The Python helpers (argv from _python_argv) drop to nobody
    themselves once bound; any other program is started through privileges.unprivileged."""
    pin = ["taskset", "-c", cpus] if cpus is not None and shutil.which("taskset") else []
    if argv[:3] == _python_argv()[:3]:
        return [*_in_namespace(ns), *pin, *argv]
    return [*_in_namespace(ns), *privileges.unprivileged([*pin, *argv])]


def _python_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "routetrace.loadgen", *args]


@contextlib.contextmanager
def _log_for_load(name: str):
    """A path the load (nobody) can write and only bench reads: a file created here and given to
    nobody, in a private directory nobody may pass through but not list or change (so it cannot
    swap the file for a link to something of root's)."""
    with tempfile.TemporaryDirectory(prefix="routetrace-load-") as tmp:
        path = Path(tmp) / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, *privileges.nobody())
                os.chmod(tmp, 0o711)
        finally:
            os.close(fd)
        yield path


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1]


@dataclass(frozen=True)
class Served:
    """A socket a server of bench's must hold: a listening TCP or a bound UDP socket on `port`
    at `address` (None: a wildcard whose family the tool picks, iperf3 without -B)."""
    proto: str                  # "tcp" or "udp"
    port: int
    address: str | None

    def describe(self) -> str:
        return f"{self.proto.upper()} port {self.port}" + (f" on {self.address}" if self.address else "")


@dataclass(frozen=True)
class TableSocket:
    """One row of the namespace's /proc/net/{tcp,udp}{,6}: a listening TCP socket or an
    unconnected UDP one (what a server holds), with the inode that names its owner's fd."""
    proto: str
    address: str
    port: int
    inode: int


_PROC_NET = ("tcp", "tcp6", "udp", "udp6")
_TCP_LISTEN, _UDP_UNCONNECTED = "0A", "07"


def _proc_net_address(hex_address: str) -> str:
    """/proc/net prints each 32-bit word of the address as a number in host byte order."""
    raw = b"".join(struct.pack("=I", int(hex_address[i:i + 8], 16)) for i in range(0, len(hex_address), 8))
    ip = ipaddress.ip_address(raw)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _read_proc_net(ns: str | None) -> list[tuple[str, str]]:
    """(file name, row) of /proc/net/{tcp,udp}{,6} in namespace `ns` (None: this one). A named
    namespace is read from a thread that entered it (setns; a network namespace is per thread and
    /proc/thread-self/net shows the thread's): no process to start, nothing needed on PATH."""
    def read(root: str) -> list[tuple[str, str]]:
        rows = []
        for name in _PROC_NET:
            with contextlib.suppress(FileNotFoundError):      # no IPv6 in this kernel
                with open(f"{root}/{name}") as fh:
                    rows += [(name, line) for line in fh]
        return rows

    if not ns:
        return read("/proc/self/net")
    got: dict = {}

    def in_namespace():
        try:
            fd = os.open(netns.NETNS_RUN_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                privileges._setns(fd)
            finally:
                os.close(fd)
            got["rows"] = read("/proc/thread-self/net")
        except OSError as exc:
            got["error"] = exc

    thread = threading.Thread(target=in_namespace, name="routetrace-netns-reader")
    thread.start()
    thread.join()                       # its namespace goes with it; this process's is untouched
    if "error" in got:
        raise EnvironmentProblem(f"cannot read the sockets of namespace {ns}: {got['error'].strerror or got['error']}")
    return got["rows"]


def socket_table(ns: str | None) -> list[TableSocket]:
    """Every listening TCP and unconnected UDP socket in namespace `ns` (None: this one)."""
    table = []
    for name, line in _read_proc_net(ns):
        fields = line.split()
        if len(fields) < 10 or not fields[0].endswith(":") or ":" not in fields[1]:
            continue                                          # the header
        proto = "tcp" if name.startswith("tcp") else "udp"
        if fields[3] != (_TCP_LISTEN if proto == "tcp" else _UDP_UNCONNECTED):
            continue
        address, port = fields[1].split(":")
        table.append(TableSocket(proto, _proc_net_address(address), int(port, 16), int(fields[9])))
    return table


def _socket_inodes(pid: int) -> set[int]:
    """The sockets process `pid` holds open; PermissionError when its fds are not ours to read."""
    inodes = set()
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):                    # closed while we looked
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"{fds}/{fd}"))
            if m:
                inodes.add(int(m.group(1)))
    return inodes


def _holders(inode: int) -> list[int]:
    """The processes holding socket `inode` (those whose fds this process may read)."""
    link = f"socket:[{inode}]"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            fds = f"/proc/{entry}/fd"
            if any(os.readlink(f"{fds}/{fd}") == link for fd in os.listdir(fds)):
                pids.append(int(entry))
    return pids


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return int(next(line for line in fh if line.startswith("PPid:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def _descends_from(pid: int, roots: set[int]) -> bool:
    while pid > 1:
        if pid in roots:
            return True
        pid = _parent(pid)
    return False


def _program_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return sanitize.text(fh.read().strip())           # any user names their process
    except OSError:
        return "?"


def _same_address(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _overlaps(ours: str | None, theirs: str) -> bool:
    """Whether a socket bound to `theirs` can take traffic meant for our server at `ours`: the
    same address, or a wildcard of its family covering it; an IPv6 wildcard may cover IPv4 too
    (dual-stack, which /proc/net does not show), so it counts as covering both."""
    if ours is None:
        return True
    a, b = ipaddress.ip_address(ours), ipaddress.ip_address(theirs)
    if a == b:
        return True
    return any(w.is_unspecified and (w.version == other.version or w.version == 6)
               for w, other in ((a, b), (b, a)))


class Servers:
    """Every server the chosen tools need, in namespace `ns`, stopped on exit.

    A server is up when the socket on its port belongs to it, not when anything listens there: on
    a shared host another user may hold the port (a server of ours that failed to bind must not
    hide behind theirs, nor bench measure theirs), so each server's sockets are matched by inode
    between the namespace's /proc/net tables and /proc/PID/fd of the process bench started (the
    tool itself: ip netns exec, the wrapper and taskset all exec; neither sockperf nor iperf3
    forks, and a socket held by a child of ours would still count as ours)."""

    def __init__(self, ns: str | None, base: int, tools: dict[int, dict[str, str]], pin: Pinning = Pinning(),
                 addresses: list[str] | None = None):
        """tools: family (4, 6) -> mode -> tool, for each family under test.
        addresses: bind only these (on a real host: the targets under test, nothing else);
        None: each family's wildcard, inside a sandbox namespace no one else can reach."""
        self.ns, self.base, self.tools, self.pin = ns, base, tools, pin
        self.binds: list[tuple[int, str | None]] = (
            [(family_of(a), a) for a in addresses] if addresses else [(f, None) for f in sorted(tools)])
        self.procs: list[subprocess.Popen] = []
        self.served: list[Served] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="routetrace-bench-")

    def __enter__(self) -> "Servers":
        try:
            p = self.base
            wildcard_iperf3 = False
            for family, addr in self.binds:
                tools = self.tools[family]
                used = set(tools.values())
                at = addr or ("::" if family == 6 else "0.0.0.0")      # where each server listens
                if "sockperf" in used:
                    # no -i: sockperf's default, 0.0.0.0; an IPv6 wildcard must be named
                    on = ["-i", addr] if addr else (["-i", "::"] if family == 6 else [])
                    self._spawn(["sockperf", "sr", "--tcp", "-p", str(p + PORT_SOCKPERF), *on], f"sockperf TCP :{p}",
                                [Served("tcp", p + PORT_SOCKPERF, at)])
                    self._spawn(["sockperf", "sr", "-p", str(p + PORT_SOCKPERF), *on], f"sockperf UDP :{p}",
                                [Served("udp", p + PORT_SOCKPERF, at)])
                if "iperf3" in used and not wildcard_iperf3:
                    # iperf3 without -B listens on [::] for both families: one serves every wildcard
                    wildcard_iperf3 = addr is None
                    self._spawn(["iperf3", "-s", "-p", str(p + PORT_IPERF3), *([] if addr is None else ["-B", addr])],
                                f"iperf3 :{p + PORT_IPERF3}", [Served("tcp", p + PORT_IPERF3, addr)])
                # Python: accept-and-close for connection rate, echo and sink for the fallbacks.
                self._spawn(_python_argv("serve", str(p), "--accept-only", "--bind", at), "python acceptor",
                            [Served("tcp", p + PORT_ACCEPT, at)], ready_line=True)
                if "python" in set(tools[m] for m in tools if m != "conn"):
                    self._spawn(_python_argv("serve", str(p), "--bind", at), "python echo and sink",
                                [Served("tcp", p + PORT_ECHO, at), Served("udp", p + PORT_ECHO, at),
                                 Served("tcp", p + PORT_SINK, at)], ready_line=True)
            self._wait_served()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()
        self.served.clear()
        self._tmp.cleanup()

    def _spawn(self, argv, what, serves: list[Served], ready_line=False):
        # stderr to a file bench reads only if the server fails: a pipe nobody drains could block it
        with open(Path(self._tmp.name) / f"server-{len(self.procs)}.err", "w+") as err:
            proc = subprocess.Popen(load_command(self.ns, self.pin.server, argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
                                    stderr=err, text=True)
        self.procs.append(proc)
        self.served += serves
        if ready_line and proc.stdout.readline().strip() != "ready":
            self._raise_if_taken()
            raise EnvironmentProblem(f"{what} did not start: {self._why(proc)}")
        if proc.poll() is not None:
            self._raise_if_taken()
            raise EnvironmentProblem(f"{what} exited at once: {self._why(proc)}")

    def _why(self, proc: subprocess.Popen) -> str:
        """The last line a failed server wrote on stderr (a wrapper's drop, a port in use)."""
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        i = self.procs.index(proc)
        try:
            said = _last_line((Path(self._tmp.name) / f"server-{i}.err").read_text(errors="replace"))
        except OSError:
            said = "?"
        return said if said != "?" else f"no message (ports {self.base}..{self.base + PORTS_USED - 1} in use?)"

    def _our_sockets(self) -> set[int]:
        inodes = set()
        for proc in self.procs:
            if proc.poll() is not None:
                continue
            try:
                inodes |= _socket_inodes(proc.pid)
            except PermissionError:
                raise EnvironmentProblem(
                    f"cannot read /proc/{proc.pid}/fd of bench's own server, so cannot tell its sockets from "
                    "another process's: run bench as root or as a user without capabilities") from None
            except OSError:
                continue                                      # exited while we looked
        return inodes

    def _survey(self) -> tuple[list[Served], list[tuple[Served, TableSocket]]]:
        """(our sockets not up yet, sockets of another process that would take their traffic)."""
        table = socket_table(self.ns)
        ours = self._our_sockets()            # after the table: a socket has its fd before it listens
        missing = [s for s in self.served
                   if not any(t.inode in ours and t.proto == s.proto and t.port == s.port
                              and (s.address is None or _same_address(t.address, s.address)) for t in table)]
        suspects = [(s, t) for s in self.served for t in table
                    if t.inode not in ours and t.proto == s.proto and t.port == s.port and _overlaps(s.address, t.address)]
        held_by_us = {t.inode: self._held_by_us(t.inode) for _s, t in suspects}    # rare: scans /proc
        return missing, [(s, t) for s, t in suspects if not held_by_us[t.inode]]

    def _held_by_us(self, inode: int) -> bool:
        """A socket not in our servers' own fds: still ours if a child of one of them holds it."""
        roots = {p.pid for p in self.procs if p.poll() is None}
        return any(_descends_from(pid, roots) for pid in _holders(inode))

    def _taken_message(self, served: Served, sock: TableSocket) -> str:
        holders = _holders(sock.inode)
        who = ("pid " + ", ".join(f"{pid} ({_program_name(pid)})" for pid in holders)) if holders else "pid unknown"
        where = f" in namespace {self.ns}" if self.ns else ""
        return (f"{served.proto.upper()} port {served.port}{where} is held by another process ({who}, bound to "
                f"{sock.address}), not by the server bench started: stop it or choose another base port with --port")

    def _raise_if_taken(self) -> None:
        """A server failed: if another process holds one of our ports, say that (and which)."""
        _missing, foreign = self._survey()
        if foreign:
            raise EnvironmentProblem(self._taken_message(*foreign[0]))

    def _wait_served(self, timeout: float = 5.0) -> None:
        """Up when every socket the servers need is listening (or bound) and is theirs, and no
        other process holds one that would take their traffic (no connection, no traffic)."""
        deadline = time.monotonic() + timeout
        while True:
            missing, foreign = self._survey()
            if foreign:
                raise EnvironmentProblem(self._taken_message(*foreign[0]))
            if not missing:
                return
            gone = next((p for p in self.procs if p.poll() is not None), None)
            if gone is not None:
                raise EnvironmentProblem(f"a benchmark server exited at once: {self._why(gone)}")
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"no server of bench's on {missing[0].describe()} after {timeout:g}s")
            time.sleep(0.05)


def _run(argv: list[str], timeout: float, what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{what} did not finish in {timeout:g}s") from None
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["?"]
        raise EnvironmentProblem(f"{what} failed (exit {out.returncode}): {last[0]}")
    return out.stdout + out.stderr


def sockperf_seconds(seconds: float) -> int:
    """sockperf takes whole seconds and spends the first 0.4 s warming up."""
    import math
    return max(1, math.ceil(seconds + SOCKPERF_WARMUP_S))


def client_argv(mode: str, tool: str, host: str, base: int, seconds: float, log: Path | None = None) -> list[str]:
    """The client of one slice, as `tool` takes it (load_command puts it in its namespace, pins it
    and starts it as nobody). log: sockperf ping-pong's --full-log file."""
    if tool == "sockperf":
        latency = mode in LATENCY_MODES
        size = RR_SIZE if latency else TCP_TP_SIZE if mode == "tcp-tp" else UDP_TP_SIZE
        argv = ["sockperf", "pp" if latency else "tp", *(["--tcp"] if mode in ("tcp-rr", "tcp-tp") else []),
                "-i", host, "-p", str(base + PORT_SOCKPERF), "-m", str(size), "-t", str(sockperf_seconds(seconds))]
        if latency:
            if log is None:
                raise ValueError("sockperf ping-pong needs a --full-log file")
            argv += ["--full-rtt", "--full-log", str(log)]
        return argv
    if tool == "iperf3":
        return ["iperf3", "-c", host, "-p", str(base + PORT_IPERF3), "-t", str(iperf3_seconds(seconds)), "-J"]
    if tool == "python":
        return _python_argv("client", mode, host, str(base), str(seconds))
    raise ValueError(f"no driver for {mode} with {tool}")


def iperf3_seconds(seconds: float) -> int:
    """iperf3 takes whole seconds."""
    import math
    return max(1, math.ceil(seconds))


def measure(mode: str, tool: str, ns: str | None, host: str, base: int, seconds: float,
            pin: Pinning = Pinning()) -> Result:
    """One slice of `mode` driven by `tool`, from namespace `ns` to host."""
    def command(log: Path | None = None) -> list[str]:
        return load_command(ns, pin.client, client_argv(mode, tool, host, base, seconds, log))

    if tool == "sockperf" and mode in LATENCY_MODES:
        with _log_for_load("full.csv") as log:
            _run(command(log), seconds + 60, f"sockperf pp ({mode} to {host})")
            text = log.read_text()
        lat = parse_sockperf_full_log(text)
        values = latency_values(lat)
        summary = parse_sockperf_pp_summary(text)
        return Result(mode, tool, values, lat, summary["valid_s"])
    if tool == "sockperf":
        size = TCP_TP_SIZE if mode == "tcp-tp" else UDP_TP_SIZE
        values = parse_sockperf_tp(_run(command(), seconds + 60, f"sockperf tp ({mode} to {host})"), size)
        return Result(mode, tool, values, duration_s=sockperf_seconds(seconds))
    if tool == "iperf3":
        secs = iperf3_seconds(seconds)
        out = subprocess.run(command(), capture_output=True, text=True, check=False, timeout=secs + 60)
        try:
            values = parse_iperf3_json(out.stdout)
        except (ValueError, KeyError) as exc:
            # no JSON at all: whatever stopped it before iperf3 ran (the drop, a missing program)
            why = exc if out.stdout.strip() else _last_line(out.stderr)
            raise EnvironmentProblem(f"iperf3 to {host} failed: {why}") from None
        return Result(mode, tool, values, duration_s=float(secs))
    if tool == "python":
        text = _run(command(), seconds + 60, f"python client ({mode} to {host})")
        data = json.loads(text.strip().splitlines()[-1])
        lat = data.pop("latencies_us", [])
        values = latency_values(lat) if lat else {}
        values.update(data)
        return Result(mode, tool, values, lat, seconds)
    raise ValueError(f"no driver for {mode} with {tool}")


# ---- the Python servers and clients (run inside a namespace) --------------------------------

_LINGER0 = struct.pack("ii", 1, 0)


def serve(base: int, accept_only: bool = False, bind: str = "0.0.0.0") -> None:
    """accept_only: accept-and-close on P+2; else echo (TCP and UDP) on P+3, sink on P+4.
    bind: the one address to listen on (a wildcard, 0.0.0.0 or ::, only inside a sandbox
    namespace). Once bound, and before any thread starts (credentials are per thread), the
    process is nobody; "ready" says both."""
    family = _socket_family(bind)

    def bound(kind, port):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" must not take IPv4 too: 0.0.0.0 has its own server on the same port
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((bind, port))
        return s

    def listener(port):
        s = bound(socket.SOCK_STREAM, port)
        s.listen(4096)
        return s

    def accept_close(sock):
        accept = sock.accept
        while True:
            conn, _ = accept()
            conn.close()

    def echo_conn(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    def sink_conn(conn):
        with conn:
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(str(total).encode())

    def threaded(sock, handler):
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def udp_echo(sock):
        while True:
            data, peer = sock.recvfrom(65536)
            if data[:1] != b"!":          # "!..." is one-way load (udp-tp): no reply
                sock.sendto(data, peer)

    if accept_only:
        # Its own process: the acceptor must keep up with the connect loop, with no other
        # thread taking the interpreter from it (a full accept queue drops SYNs: 1 s stalls).
        acc = listener(base + PORT_ACCEPT)
        privileges.drop_to_nobody()
        print("ready", flush=True)
        accept_close(acc)
    echo, sink = listener(base + PORT_ECHO), listener(base + PORT_SINK)
    udp = bound(socket.SOCK_DGRAM, base + PORT_ECHO)
    privileges.drop_to_nobody()
    for target, args in ((threaded, (echo, echo_conn)), (threaded, (sink, sink_conn))):
        threading.Thread(target=target, args=args, daemon=True).start()
    print("ready", flush=True)
    udp_echo(udp)


def conn_loop(host: str, port: int, seconds: float, max_count: int = 10_000_000) -> dict:
    """The connection-rate client: connect, close with RST (SO_LINGER 0: no TIME_WAIT, so ports
    never run out and late slices measure what early ones did). Names bound once: what is left
    is the interpreter's dispatch around three system calls."""
    family, kind = _socket_family(host), socket.SOCK_STREAM
    sock, sol, opt, linger, addr = socket.socket, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0, (host, port)
    clock = time.perf_counter
    import resource
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    n, start = 0, clock()
    end = start + seconds
    while n < max_count:
        s = sock(family, kind)
        s.setsockopt(sol, opt, linger)
        s.connect(addr)
        s.close()
        n += 1
        if not n & 15 and clock() >= end:
            break
    elapsed = clock() - start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"per_s": n / elapsed, "connections": n, "user_s": ru1.ru_utime - ru0.ru_utime,
            "sys_s": ru1.ru_stime - ru0.ru_stime, "elapsed_s": elapsed}


def _connected(family: int, host: str, port: int) -> socket.socket:
    """A TCP connection of the target's own family (no name lookup: the target is a literal)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def client(mode: str, host: str, base: int, seconds: float) -> dict:
    """One slice of `mode` to `host` (an IPv4 or IPv6 literal: the socket's family follows it)."""
    family = _socket_family(host)
    clock = time.perf_counter
    end = clock() + seconds
    if mode == "conn":
        return conn_loop(host, base + PORT_ACCEPT, seconds)
    if mode in LATENCY_MODES:
        msg, lat, ns = b"x" * RR_SIZE, [], time.perf_counter_ns
        if mode == "tcp-rr":
            s = _connected(family, host, base + PORT_ECHO)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(1.0)
            s.connect((host, base + PORT_ECHO))
        with s:
            send, recv = s.send, s.recv
            while clock() < end and len(lat) < 5_000_000:
                t0 = ns()
                send(msg)
                got = len(recv(RR_SIZE))
                while got < RR_SIZE:
                    got += len(recv(RR_SIZE - got))
                lat.append((ns() - t0) / 1e3)
        return {"latencies_us": lat}
    if mode in ("tcp-tp", "tcp-bulk"):
        chunk = b"\0" * (TCP_TP_SIZE if mode == "tcp-tp" else 131072)
        with _connected(family, host, base + PORT_SINK) as s:
            start = clock()
            while clock() < end:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            acked = int(s.recv(64))
            elapsed = clock() - start
        return {"mb_per_s": acked / elapsed / 1e6}
    if mode == "udp-tp":
        chunk, sent = b"!" * UDP_TP_SIZE, 0
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, base + PORT_ECHO))
            # Datagrams starting with "!" get no reply, as sockperf's server answers none in tp mode.
            start = clock()
            while clock() < end:
                try:
                    s.send(chunk)
                    sent += 1
                except (ConnectionRefusedError, BlockingIOError):
                    pass
            elapsed = clock() - start
        return {"msg_per_s": sent / elapsed, "mb_per_s": sent * UDP_TP_SIZE / elapsed / 1e6}
    raise ValueError(mode)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="routetrace.loadgen")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("base", type=int)
    s.add_argument("--accept-only", action="store_true")
    s.add_argument("--bind", default="0.0.0.0")
    c = sub.add_parser("client")
    c.add_argument("mode", choices=tuple(MODES))
    c.add_argument("host")
    c.add_argument("base", type=int)
    c.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "serve":
            serve(args.base, args.accept_only, args.bind)
        else:
            privileges.drop_to_nobody()         # a client needs no privilege at all
            print(json.dumps(client(args.mode, args.host, args.base, args.seconds)))
    except RoutetraceError as exc:              # the drop failed: one line, and nothing runs as root
        print(f"routetrace load: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    from routetrace.experiment import run_helper
    run_helper(_main, sys.argv[1:])
