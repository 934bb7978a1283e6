"""bench over IPv6: which comparisons a run makes (-4/-6/--to, hosts without a global IPv6
address), the tools' families, the family-aware Python servers and clients on real ::1 sockets,
and an end-to-end `bench --sandbox -6`."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import free_port_base, namespaces, sandbox_namespaces
from routetrace import bench, loadgen, netns
from routetrace.errors import UsageError

Comparison = bench.Comparison


# ---- which comparisons ------------------------------------------------------------------------

HOST4, HOST6 = ["192.0.2.7", "192.0.2.9"], ["2001:db8:5::7", "fd00::7"]


def test_both_families_by_default_ipv4_first():
    comps, notes = bench.choose_comparisons(None, [], HOST4, HOST6)
    assert comps == [Comparison(4, "192.0.2.7"), Comparison(6, "2001:db8:5::7")] and notes == []
    assert [c.targets for c in comps] == [["127.0.0.1", "192.0.2.7"], ["::1", "2001:db8:5::7"]]
    assert comps[1].to_dict() == {"family": "IPv6", "loopback": "::1", "own": "2001:db8:5::7"}


@pytest.mark.parametrize("family,want", [(4, [Comparison(4, "192.0.2.7")]), (6, [Comparison(6, "2001:db8:5::7")])])
def test_minus_4_and_minus_6_restrict_the_family(family, want):
    assert bench.choose_comparisons(family, [], HOST4, HOST6) == (want, [])


def test_to_picks_the_own_address_of_its_family_only():
    assert bench.choose_comparisons(None, ["2001:db8::5"], HOST4, HOST6) == ([Comparison(6, "2001:db8::5")], [])
    assert bench.choose_comparisons(6, ["2001:DB8:0::5"], [], []) == ([Comparison(6, "2001:db8::5")], [])
    both, _ = bench.choose_comparisons(None, ["2001:db8::5", "192.0.2.1"], [], [])
    assert both == [Comparison(4, "192.0.2.1"), Comparison(6, "2001:db8::5")]


@pytest.mark.parametrize("family,given,message", [
    (6, ["127.0.0.1"], "--to 127.0.0.1 is an IPv4 address, but -6 measures IPv6 only"),
    (4, ["2001:db8::5"], "--to 2001:db8::5 is an IPv6 address, but -4 measures IPv4 only"),
    (None, ["::1"], "--to ::1 is a loopback address: give an own address to compare with ::1"),
    (None, ["127.0.0.5"], "loopback address: give an own address to compare with 127.0.0.1"),
    (None, ["fe80::1"], "--to fe80::1 is link-local"),
    (None, ["::ffff:192.0.2.1"], "give the IPv4 address 192.0.2.1"),
    (None, ["2001:db8::5", "2001:db8::6"], "one address per family: 2001:db8::5 and 2001:db8::6 are both IPv6"),
    (None, ["ff02::1"], "not a unicast address"),
])
def test_a_to_that_cannot_be_compared_is_a_usage_error(family, given, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        bench.choose_comparisons(family, given, HOST4, HOST6)


def test_a_host_without_a_global_ipv6_address():
    # asked for IPv6: a clear error
    with pytest.raises(UsageError, match=r"no global IPv6 address \(only ::1 and link-local ones\): give one with --to"):
        bench.choose_comparisons(6, [], HOST4, [])
    # not asked: IPv4 alone, and the report says why
    comps, notes = bench.choose_comparisons(None, [], HOST4, [])
    assert comps == [Comparison(4, "192.0.2.7")]
    assert notes == ["this host has no global IPv6 address (only ::1 and link-local ones): IPv6 is not measured "
                     "(give one with --to)"]
    comps, notes = bench.choose_comparisons(None, [], [], HOST6)
    assert comps == [Comparison(6, "2001:db8:5::7")] and "no IPv4 address besides loopback" in notes[0]
    with pytest.raises(UsageError, match="no own address besides loopback"):
        bench.choose_comparisons(None, [], [], [])


def test_host_ipv6_leaves_out_loopback_link_local_and_ipv4(monkeypatch):
    monkeypatch.setattr(netns, "addresses", lambda inode: {
        "127.0.0.1", "192.0.2.7", "::1", "fe80::fc:ff:fe00:1", "fd00::2", "2001:db8::10", "2001:db8::9"})
    assert bench.host_ipv6(inode=1) == ["2001:db8::9", "2001:db8::10", "fd00::2"]


# ---- the tools' families -------------------------------------------------------------------------

def test_sockperf_addresses_ipv6_from_3_8_on(monkeypatch):
    for version, ok in (("sockperf 3.7-no.git", False), ("sockperf 3.8", True), ("sockperf 3.10-0.git", True),
                        ("sockperf", False)):
        monkeypatch.setattr(loadgen, "tool_version", lambda tool, v=version: v)
        assert loadgen.tool_supports("sockperf", 6) is ok, version
        assert loadgen.tool_supports("sockperf", 4) is True
    assert loadgen.tool_supports("iperf3", 6) and loadgen.tool_supports("python", 6)


def test_ipv6_falls_back_to_python_where_sockperf_cannot_and_says_so(monkeypatch):
    monkeypatch.setattr(loadgen, "tool_path", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(loadgen, "tool_version", lambda tool: {"sockperf": "sockperf 3.7-no.git",
                                                              "iperf3": "iperf3 3.12"}.get(tool, "python 3"))
    tools = bench.tools_per_family([4, 6], bench.MODES, "auto")
    assert tools[4] == {"tcp-rr": "sockperf", "udp-rr": "sockperf", "tcp-tp": "sockperf", "udp-tp": "sockperf",
                        "tcp-bulk": "iperf3", "conn": "python"}
    assert tools[6] == {**tools[4], "tcp-rr": "python", "udp-rr": "python", "tcp-tp": "python", "udp-tp": "python"}
    (note,) = bench.tool_notes(tools, "auto")
    assert note.startswith("sockperf 3.7-no.git cannot address IPv6")
    assert "the IPv6 rows of tcp-rr, udp-rr, tcp-tp, udp-tp come from the Python clients" in note
    python = bench.tools_per_family([4, 6], bench.MODES, "python")
    assert bench.tool_notes(python, "python") == []            # asked for, not a fallback
    described = bench._describe_tools(tools, bench.MODES)
    assert described["tcp-rr"] == "sockperf 3.7-no.git (IPv4) / python 3 (IPv6)"
    assert described["tcp-bulk"] == "iperf3 3.12"


def test_this_machines_sockperf_really_refuses_ipv6_when_we_say_it_does():
    """The version rule against the installed binary: a sockperf said to lack IPv6 rejects ::1
    while parsing its arguments (nothing is sent)."""
    if not shutil.which("sockperf"):
        if os.environ.get("CI"):
            pytest.fail("sockperf missing in CI: scripts/setup installs it")
        pytest.skip("needs sockperf")
    out = subprocess.run(["sockperf", "pp", "-i", "::1", "-p", "9", "-t", "1"], capture_output=True, text=True,
                         timeout=30)
    refused = "Invalid address: ::1" in out.stdout + out.stderr
    assert refused is (not loadgen.tool_supports("sockperf", 6)), out.stdout + out.stderr


# ---- the Python servers and clients, on real ::1 sockets ------------------------------------------

def _free_base() -> int:
    return free_port_base(loadgen.PORTS_USED)


@pytest.fixture
def ipv6_python_servers():
    base = _free_base()
    tools = {6: {m: "python" for m in loadgen.MODES}}
    with loadgen.Servers(None, base, tools, loadgen.Pinning(), ["::1"]) as servers:
        yield base, servers


@pytest.mark.parametrize("mode", list(loadgen.MODES))
def test_python_clients_measure_over_ipv6(ipv6_python_servers, mode):
    base, _ = ipv6_python_servers
    result = loadgen.measure(mode, "python", None, "::1", base, 0.2)
    assert result.tool == "python" and result.mode == mode
    if mode in loadgen.LATENCY_MODES:
        assert result.values["samples"] > 10 and 0 < result.values["p50"] <= result.values["p99.9"]
    elif mode == "conn":
        assert result.values["connections"] > 10 and result.values["per_s"] > 0
    else:
        assert result.values["mb_per_s"] > 0


def test_ipv6_servers_bind_only_the_ipv6_target(ipv6_python_servers):
    base, _ = ipv6_python_servers
    for port in (base + loadgen.PORT_ACCEPT, base + loadgen.PORT_ECHO, base + loadgen.PORT_SINK):
        with socket.socket(socket.AF_INET6) as s:
            s.connect(("::1", port))
        with socket.socket(socket.AF_INET) as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


def test_connection_loop_uses_the_targets_family(ipv6_python_servers):
    base, _ = ipv6_python_servers
    stats = loadgen.conn_loop("::1", base + loadgen.PORT_ACCEPT, 0.1)
    assert stats["connections"] > 0 and stats["per_s"] > 0
    with pytest.raises(ConnectionRefusedError):           # nothing was served on IPv4
        loadgen.conn_loop("127.0.0.1", base + loadgen.PORT_ACCEPT, 0.1, max_count=1)


# ---- the command line -------------------------------------------------------------------------------

def _routetrace(*args, ns=None):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, sys.executable, "-m", "routetrace", *args], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(out, message):
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert message in out.stderr, out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize("args,message", [
    (("-6", "--to", "127.0.0.1"), "--to 127.0.0.1 is an IPv4 address, but -6 measures IPv6 only"),
    (("-4", "--to", "2001:db8::1"), "--to 2001:db8::1 is an IPv6 address, but -4 measures IPv4 only"),
    (("-4", "-6"), "-4 and -6 exclude each other"),
    (("--to", "::1"), "--to ::1 is a loopback address"),
    (("--to", "2001:db8::1", "--to", "2001:db8::2"), "--to takes one address per family"),
    (("--sandbox", "--to", "2001:db8::1"), "--sandbox chooses its own addresses"),
])
def test_bench_usage_errors(args, message):
    _one_line_error(_routetrace("bench", *args), message)


@pytest.fixture
def bare_namespace(bpf_ready):
    """A namespace with nothing but lo (up, so ::1 exists): a host without own addresses."""
    name = f"rt-{secrets.token_hex(3)}-bare"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_bench_on_a_host_without_a_global_ipv6_address(bare_namespace):
    _one_line_error(_routetrace("bench", "-6", ns=bare_namespace),
                    "this host has no global IPv6 address (only ::1 and link-local ones): give one with --to, "
                    "or use --sandbox")
    _one_line_error(_routetrace("bench", ns=bare_namespace), "this host has no own address besides loopback")


# ---- end to end, in the sandbox --------------------------------------------------------------------

@pytest.mark.bpf
def test_bench_sandbox_ipv6(bpf_ready):
    out = subprocess.run([sys.executable, "-m", "routetrace", "bench", "--sandbox", "-6", "-d", "0.2", "-r", "2",
                          "--json"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "Measuring ::1 against 2001:db8::1" in out.stderr and "[round 2/2]" in out.stderr
    assert not set(sandbox_namespaces(out.stderr)) & set(namespaces())
    report = json.loads(out.stdout)
    assert report["targets"] == ["::1", "2001:db8::1"]
    assert report["comparisons"] == [{"family": "IPv6", "loopback": "::1", "own": "2001:db8::1"}]
    rows = report["comparison"]
    assert {r["family"] for r in rows} == {"IPv6"}
    assert [f"{r['mode']} {r['metric']}" for r in rows] == [m.name for m in bench.METRICS]
    expected = loadgen.tools_available(bench.MODES, 6)
    for row in rows:
        assert row["tool"] == expected[row["mode"]], row
        assert len(row["rounds_loopback"]) == len(row["rounds_own"]) == 2
        assert row["loopback"] > 0 and row["own"] > 0 and row["ratio"]["mean"] > 0
    assert not any(key.split("|")[1] in ("127.0.0.1", "198.51.100.1") for key in report["samples"])
    if shutil.which("sockperf") and not loadgen.tool_supports("sockperf", 6):
        assert {r["tool"] for r in rows if r["mode"] in ("tcp-rr", "udp-rr", "tcp-tp", "udp-tp")} == {"python"}
        assert any("cannot address IPv6" in n for n in report["notes"])
    # the text form of the same report: one IPv6 table named by its two addresses
    text = bench.render(report)
    header = next(line for line in text.splitlines() if line.startswith("FAMILY"))
    assert "::1" in header and "2001:db8::1 / ::1 [95% CI]" in header
    body = [line for line in text.splitlines() if " (us)" in line or " (MB/s)" in line or " (conn/s)" in line]
    assert len(body) == len(bench.METRICS) and all(line.startswith("IPv6 ") for line in body)


@pytest.mark.bpf
def test_bench_on_a_host_finds_both_own_addresses(sandbox):
    """The host path (no --sandbox), run inside the sandbox's namespace, whose eth0 holds
    198.51.100.1 and 2001:db8::1: both are found and each family compared."""
    out = _routetrace("bench", "-d", "0.2", "-r", "2", "--mode", "tcp-rr", "--mode", "tcp-bulk", "--mode", "conn",
                      "--json", ns=sandbox.host)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["comparisons"] == [{"family": "IPv4", "loopback": "127.0.0.1", "own": "198.51.100.1"},
                                     {"family": "IPv6", "loopback": "::1", "own": "2001:db8::1"}]
    rows = {(r["family"], r["mode"], r["metric"]): r for r in report["comparison"]}
    for family in ("IPv4", "IPv6"):
        for mode, metric in (("tcp-rr", "TCP round trip p50"), ("tcp-bulk", "TCP bulk throughput"),
                             ("conn", "connection rate")):
            row = rows[(family, mode, metric)]
            assert row["loopback"] > 0 and row["own"] > 0
            assert row["tool"] == loadgen.tools_available(["tcp-rr", "tcp-bulk", "conn"], int(family[-1]))[mode]


def _listening(ns: str) -> dict[int, set[str]]:
    """port -> the local addresses TCP listeners hold in namespace ns."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn"], capture_output=True, text=True, check=True)
    found: dict[int, set[str]] = {}
    for line in out.stdout.splitlines():
        local = line.split()[3]
        addr, port = local.rsplit(":", 1)
        found.setdefault(int(port), set()).add(addr.strip("[]").split("%")[0])
    return found


def test_servers_of_both_families_bind_only_the_targets_or_each_familys_wildcard(sandbox):
    tools = {f: loadgen.tools_available(loadgen.MODES, f) for f in (4, 6)}
    targets = ["127.0.0.1", "198.51.100.1", "::1", "2001:db8::1"]
    base = 9100
    with loadgen.Servers(sandbox.host, base, tools, loadgen.Pinning(), targets):
        held = _listening(sandbox.host)
    assert held[base + loadgen.PORT_ACCEPT] == set(targets), held      # connection rate: every target
    # echo and sink: for the targets of a family whose other modes fall back to Python (IPv6 here)
    fallback = {t for t in targets if "python" in (tool for m, tool in tools[loadgen.family_of(t)].items() if m != "conn")}
    for port in (base + loadgen.PORT_ECHO, base + loadgen.PORT_SINK):
        assert held.get(port, set()) == fallback, (port, held)
    if tools[4]["tcp-bulk"] == "iperf3":
        assert held[base + loadgen.PORT_IPERF3] == set(targets)
    if tools[4]["tcp-rr"] == "sockperf":                           # IPv4 targets only, with sockperf 3.7
        assert held[base + loadgen.PORT_SOCKPERF] == {t for t in targets if loadgen.tool_supports("sockperf",
                                                                                                  loadgen.family_of(t))}
    # the sandbox's wildcards: 0.0.0.0 and :: (IPv6-only) side by side on the same ports
    with loadgen.Servers(sandbox.host, base, tools, loadgen.Pinning(), None):
        held = _listening(sandbox.host)
    assert held[base + loadgen.PORT_ACCEPT] == {"0.0.0.0", "::"}, held
    if tools[4]["tcp-bulk"] == "iperf3":
        assert held[base + loadgen.PORT_IPERF3] == {"*"}, held        # one iperf3, both families
