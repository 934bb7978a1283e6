"""bench's load never runs as root: every server and client it starts (sockperf, iperf3, the
Python ones), in the sandbox's namespace and on a host, is nobody with no capabilities, read from
/proc/PID/status while it runs; and it still measures."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port_base, namespaces, sandbox_namespaces
from routetrace import bench, loadgen, netns, privileges

NOBODY_UID, NOBODY_GID = privileges.nobody()
PYTHON = os.path.realpath(sys.executable)


@pytest.fixture
def tools_in_ci():
    """In CI the external tools must be there (scripts/setup installs them), so that their path,
    through the drop-and-exec wrapper, is what is tested; elsewhere a missing one falls back to
    the Python load, as bench does, and that is tested instead."""
    missing = [t for t in ("sockperf", "iperf3") if not shutil.which(t)]
    if missing and os.environ.get("CI"):
        pytest.fail(f"{', '.join(missing)} missing in CI: scripts/setup installs them")


def _program(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def _socket_inodes(pid: int) -> set[str]:
    fds = f"/proc/{pid}/fd"
    out = set()
    for fd in os.listdir(fds):
        m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"{fds}/{fd}"))
        if m:
            out.add(m.group(1))
    return out


def _holds_inet_socket(pid: int) -> bool:
    """Whether the process holds a socket that is neither AF_UNIX nor netlink (not, say, the unix
    socket glibc opens to ask nscd about 'nobody' before the drop): a load socket. Only sockets
    open before and after reading the unix and netlink tables count, so a short-lived unix socket
    cannot pass for one."""
    before = _socket_inodes(pid)
    if not before:
        return False
    other = set()
    with open(f"/proc/{pid}/net/unix") as fh:
        next(fh)
        other |= {line.split()[6] for line in fh if len(line.split()) > 6}
    with open(f"/proc/{pid}/net/netlink") as fh:
        next(fh)
        other |= {line.split()[9] for line in fh if len(line.split()) > 9}
    return bool((before & _socket_inodes(pid)) - other)


def _expected_program(argv: list[str]) -> str:
    """The program at the end of the chain ip netns exec -> wrapper -> taskset -> tool."""
    for tool in ("sockperf", "iperf3"):
        if tool in argv:
            return os.path.realpath(shutil.which(tool))
    assert "routetrace.loadgen" in argv, argv
    return PYTHON


def _groups(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as fh:
        return [int(g) for g in next(line for line in fh if line.startswith("Groups:")).split()[1:]]


def _assert_unprivileged(pid: int, what, ns_inode: int) -> None:
    st = privileges.status(pid)
    assert st["Uid"] == [NOBODY_UID] * 4 and st["Gid"] == [NOBODY_GID] * 4, (what, st)
    assert _groups(pid) == [NOBODY_GID], what
    assert st["CapEff"] == st["CapPrm"] == st["CapInh"] == st["CapAmb"] == st["CapBnd"] == 0, (what, st)
    assert st["NoNewPrivs"] == 1, what
    # dropped inside the namespace it was started in: the drop came after `ip netns exec`
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode, what


def _free_base() -> int:
    return free_port_base(loadgen.PORTS_USED)


def _listener_pids(ns: str | None, base: int) -> set[int]:
    """Every process holding a TCP or UDP socket bound to bench's ports in the namespace."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    out = subprocess.run([*prefix, "ss", "-Hlntup"], capture_output=True, text=True, check=True).stdout
    pids = set()
    for line in out.splitlines():
        port = int(line.split()[4].rsplit(":", 1)[1])
        if base <= port < base + loadgen.PORTS_USED:
            pids |= {int(p) for p in re.findall(r"pid=(\d+)", line)}
    return pids


def _stage(where: str, sandbox) -> tuple[str | None, list[str] | None, list[str]]:
    """(namespace, addresses to bind, one target per family) as bench sets them: the sandbox binds
    each family's wildcard in its namespace; a host only its targets (here loopback's: no other
    address of this host is used)."""
    if where == "sandbox":
        return sandbox.host, None, [sandbox.own_addr, sandbox.own_addr6]
    return None, ["127.0.0.1", "::1"], ["127.0.0.1", "::1"]


# ---- the servers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["sandbox", "host"])
def test_every_bench_server_runs_as_nobody_without_capabilities(sandbox, tools_in_ci, where):
    ns, binds, _targets = _stage(where, sandbox)
    base = 9100 if ns else _free_base()
    tools = bench.tools_per_family(bench.FAMILIES, bench.MODES, "auto")
    pinning = bench.pinning_for("same", os.cpu_count() or 1)
    inode = netns.inode_of(ns)
    with loadgen.Servers(ns, base, tools, pinning, binds) as servers:
        assert servers.procs
        started = {}
        for proc in servers.procs:
            assert proc.poll() is None, proc.args
            assert _program(proc.pid) == _expected_program(proc.args), proc.args     # the tool, not a wrapper
            _assert_unprivileged(proc.pid, proc.args, inode)
            started[proc.pid] = proc.args
        # every socket on bench's ports belongs to one of them: no root process serves anything
        assert _listener_pids(ns, base) == set(started)
    programs = {os.path.basename(_expected_program(a)) for a in started.values()}
    assert os.path.basename(PYTHON) in programs
    if os.environ.get("CI"):
        assert {"sockperf", "iperf3"} <= programs


# ---- the clients: bench's own measure(), each client inspected while it runs -------------------------

class InspectingRun:
    """Stands in for subprocess.run during loadgen.measure(): starts the same command, waits
    until the tool it ends in holds a TCP or UDP socket (the whole exec chain is done, and a
    Python client makes its sockets only after its drop), records the
    process's status, and returns what run() would have."""

    def __init__(self, real_popen):
        self.popen = real_popen
        self.seen: list[tuple[list[str], int]] = []
        self.failures: list[str] = []
        self.ns_inode = None

    def __call__(self, argv, capture_output=True, text=True, check=False, timeout=None, **kw):
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
        result = {}
        reader = threading.Thread(target=lambda: result.update(zip(("out", "err"), proc.communicate(timeout=timeout))))
        reader.start()
        expected, inspected = _expected_program(argv), False
        while reader.is_alive() and not inspected:
            try:
                if _program(proc.pid) == expected and _holds_inet_socket(proc.pid):
                    try:
                        _assert_unprivileged(proc.pid, argv, self.ns_inode)
                    except AssertionError as exc:
                        self.failures.append(str(exc))
                    inspected = True
            except OSError:             # between two execs, or already gone
                pass
            time.sleep(0.002)
        reader.join()
        if inspected:
            self.seen.append((argv, proc.returncode))
        else:
            self.failures.append(f"never saw the client running: {argv}")
        return subprocess.CompletedProcess(argv, proc.returncode, result.get("out", ""), result.get("err", ""))


@pytest.mark.parametrize("where", ["sandbox", "host"])
def test_every_bench_client_runs_as_nobody_and_still_measures(sandbox, tools_in_ci, monkeypatch, where):
    ns, binds, targets = _stage(where, sandbox)
    base = 9100 if ns else _free_base()
    tools = bench.tools_per_family(bench.FAMILIES, bench.MODES, "auto")
    pinning = bench.pinning_for("same", os.cpu_count() or 1)
    inspect = InspectingRun(subprocess.Popen)
    inspect.ns_inode = netns.inode_of(ns)
    with loadgen.Servers(ns, base, tools, pinning, binds):
        monkeypatch.setattr(subprocess, "run", inspect)
        results = [loadgen.measure(mode, tools[loadgen.family_of(target)][mode], ns, target, base, 0.3, pinning)
                   for target in targets for mode in bench.MODES]
        monkeypatch.undo()
    assert not inspect.failures, inspect.failures
    assert len(inspect.seen) == len(results) == len(targets) * len(bench.MODES)
    for result in results:
        metric = next(m for m in bench.METRICS if m.mode == result.mode)
        assert result.values[metric.key] > 0, result
    used = {os.path.basename(_expected_program(argv)) for argv, _ in inspect.seen}
    if os.environ.get("CI"):
        assert {"sockperf", "iperf3", os.path.basename(PYTHON)} <= used


# ---- when the drop cannot be done ------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_the_wrapper_runs_nothing_when_it_cannot_drop(tmp_path):
    """No unprivileged user (here: 'nobody' is uid 0): one line, exit 2, the program never runs."""
    marker = tmp_path / "ran"
    code = ("import sys\nfrom routetrace import privileges\nprivileges.nobody = lambda: (0, 0)\n"
            f"sys.exit(privileges._exec_as_nobody(['touch', {str(marker)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == "routetrace: user 'nobody' is root here: there is no unprivileged user to run the load as\n"
    assert not marker.exists()
    # the same wrapper, as bench starts it, runs the program as nobody
    out = subprocess.run(privileges.unprivileged(["id", "-u"]), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(NOBODY_UID)


# ---- end to end ------------------------------------------------------------------------------------

def _descendants_of(root: int) -> set[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - out
        out |= frontier
    return out


@pytest.mark.bpf
def test_bench_sandbox_measures_both_families_with_its_clients_unprivileged(bpf_ready):
    """`routetrace bench --sandbox` as a user runs it; meanwhile every load client it starts
    (a tool or the Python client, once it holds a TCP or UDP socket) is looked at and must be
    nobody."""
    proc = subprocess.Popen([sys.executable, "-m", "routetrace", "bench", "--sandbox", "-d", "0.2", "-r", "2",
                             "--mode", "tcp-rr", "--mode", "conn", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, privileged = {}, []
    out = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate(timeout=300))))
    reader.start()
    while reader.is_alive():
        for pid in _descendants_of(proc.pid):
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read().split("\0")
                exe = os.path.basename(_program(pid))
                client = exe in ("sockperf", "iperf3") and "sr" not in cmdline and "-s" not in cmdline
                client = client or (exe == os.path.basename(PYTHON) and "routetrace.loadgen" in cmdline
                                    and "client" in cmdline)
                if client and pid not in seen and _holds_inet_socket(pid):
                    st = privileges.status(pid)
                    seen[pid] = (exe, cmdline)
                    if st["Uid"] != [NOBODY_UID] * 4 or st["CapEff"] or st["CapBnd"] or not st["NoNewPrivs"]:
                        privileged.append((cmdline, st))
            except OSError:
                pass
        time.sleep(0.01)
    reader.join()
    assert proc.returncode == 0, out["stderr"]
    assert not set(sandbox_namespaces(out["stderr"])) & set(namespaces())
    assert not privileged, privileged
    assert seen, "no load client was caught running"
    report = json.loads(out["stdout"])
    rows = {(r["family"], r["mode"], r["metric"]): r for r in report["comparison"]}
    for family in ("IPv4", "IPv6"):
        for key in ((family, "tcp-rr", "TCP round trip p50"), (family, "conn", "connection rate")):
            assert rows[key]["loopback"] > 0 and rows[key]["own"] > 0, rows[key]
            assert len(rows[key]["rounds_loopback"]) == len(rows[key]["rounds_own"]) == 2
