"""Real BPF on the running kernel, in namespaces the test creates: the article's experiment.

Namespace "host" has eth0 = 198.51.100.1/24 (its own address); "peer" is 198.51.100.2.
"""
import signal
import subprocess
import sys

import pytest

from conftest import EXPECTED_BACKEND, json_objects

pytestmark = pytest.mark.bpf


def flows_to(summary, daddr, dport):
    return [f for f in summary["flows"] if f["daddr"] == daddr and f["dport"] == dport]


def test_loopback_and_own_address_both_leave_on_lo_and_the_peer_on_eth0(sandbox, live):
    sandbox.serve(sandbox.host, 8888, 9999)
    sandbox.serve(sandbox.peer, 8888)
    run = live("watch", "--netns", sandbox.host, "--port", "8888", "--json")
    for target in ("127.0.0.1", sandbox.own_addr, sandbox.peer_addr):
        assert sandbox.connect(sandbox.host, target, 8888) == "ok"
    assert sandbox.connect(sandbox.host, "127.0.0.1", 9999) == "ok"
    assert sandbox.connect(sandbox.host, sandbox.own_addr, 9999) == "ok"
    rc, out, err = run.stop(signal.SIGINT)
    assert rc == 0, err
    objects = json_objects(out)
    streamed = [o for o in objects if o["type"] == "flow"]
    summary = objects[-1]
    assert summary["type"] == "summary"

    for daddr in ("127.0.0.1", sandbox.own_addr):
        (flow,) = flows_to(summary, daddr, 8888)
        assert flow["route_type"] == "LOCAL"
        assert flow["route_dev"] == "lo"
        assert set(flow["xmit_devs"]) == {"lo"} and flow["xmit_devs"]["lo"] >= 3   # SYN, ACK, data, FIN...
        assert flow["backend"] == EXPECTED_BACKEND
    # The FIB's answer differs: the own address is "local ... dev eth0" in the local table.
    assert flows_to(summary, sandbox.own_addr, 8888)[0]["fib_dev"] == "eth0"
    assert flows_to(summary, "127.0.0.1", 8888)[0]["fib_dev"] == "lo"

    (peer,) = flows_to(summary, sandbox.peer_addr, 8888)
    assert peer["route_type"] == "UNICAST"
    assert peer["route_dev"] == "eth0"
    assert set(peer["xmit_devs"]) == {"eth0"}

    # Replies from the listener (source port 8888) match the port filter too, and stay on lo.
    replies = [f for f in summary["flows"] if f["sport"] == 8888]
    assert {f["daddr"] for f in replies} == {"127.0.0.1", sandbox.own_addr}
    assert all(set(f["xmit_devs"]) == {"lo"} for f in replies)

    assert all(8888 in (f["sport"], f["dport"]) for f in summary["flows"])
    assert not [f for f in summary["flows"] if 9999 in (f["sport"], f["dport"])]
    assert {(f["daddr"], f["dport"]) for f in streamed} == {(f["daddr"], f["dport"]) for f in summary["flows"]}

    kinds = {d["daddr"]: d["kind"] for d in summary["destinations"]}
    assert kinds == {"127.0.0.1": "loopback", sandbox.own_addr: "own-address", sandbox.peer_addr: "other"}
    assert summary["verdict"]["holds"] is True
    assert summary["lost"]["total"] == 0


def test_connection_refused_syn_and_rst_both_on_lo(sandbox, live):
    run = live("watch", "--netns", sandbox.host, "--port", "8887", "--json")
    assert sandbox.connect(sandbox.host, "127.0.0.1", 8887) == "refused"
    assert sandbox.connect(sandbox.host, sandbox.own_addr, 8887) == "refused"
    rc, out, err = run.stop(signal.SIGTERM)
    assert rc == 0, err
    summary = json_objects(out)[-1]
    for daddr in ("127.0.0.1", sandbox.own_addr):
        (syn,) = flows_to(summary, daddr, 8887)
        (rst,) = [f for f in summary["flows"] if f["sport"] == 8887 and f["saddr"] == daddr]
        for flow in (syn, rst):
            assert flow["route_type"] == "LOCAL" and flow["route_dev"] == "lo"
            assert flow["xmit_devs"] == {"lo": 1}


def test_human_output_streams_lines_and_ends_with_the_verdict(sandbox, live):
    sandbox.serve(sandbox.host, 8888)
    run = live("watch", "--netns", sandbox.host, "--port", "8888")
    for target in ("127.0.0.1", sandbox.own_addr):
        assert sandbox.connect(sandbox.host, target, 8888) == "ok"
    rc, out, err = run.stop(signal.SIGINT)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Tracing route decisions")
    assert lines[1].startswith("TIME") and "RTYPE" in lines[1]
    stream = [line for line in lines[2:] if " tcp " in line and "LOCAL" in line]
    assert any("127.0.0.1:8888" in line for line in stream)
    assert any(f"{sandbox.own_addr}:8888" in line for line in stream)
    assert "verdict: same path: 127.0.0.1-range and own-address flows both left on lo" in out
    assert "lost: nothing" in out


def _waiting_client(ns, host, port):
    """A client in `ns` that connects when told to: its pid is known before its first packet."""
    code = ("import socket, sys; sys.stdin.readline(); "
            f"s = socket.create_connection(({host!r}, {port})); s.sendall(b'x'); s.recv(1); s.close()")
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            stdin=subprocess.PIPE, text=True)


def test_pid_filter_keeps_only_flows_that_process_started(sandbox, live):
    sandbox.serve(sandbox.host, 8888)
    chosen = _waiting_client(sandbox.host, "127.0.0.1", 8888)
    other = _waiting_client(sandbox.host, "127.0.0.1", 8888)
    try:
        run = live("watch", "--pid", str(chosen.pid), "--json")
        for proc in (other, chosen):
            proc.communicate("go\n", timeout=30)
            assert proc.returncode == 0
        rc, out, err = run.stop()
    finally:
        for proc in (chosen, other):
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, err
    flows = json_objects(out)[-1]["flows"]
    assert flows and {f["pid"] for f in flows} == {chosen.pid}
    assert any(f["dport"] == 8888 and f["daddr"] == "127.0.0.1" for f in flows)


def test_host_filter_matches_source_or_destination(sandbox, live):
    sandbox.serve(sandbox.host, 8888)
    run = live("watch", "--netns", sandbox.host, "--host", sandbox.own_addr, "--json")
    for target in ("127.0.0.1", sandbox.own_addr):
        assert sandbox.connect(sandbox.host, target, 8888) == "ok"
    rc, out, err = run.stop()
    assert rc == 0, err
    flows = json_objects(out)[-1]["flows"]
    assert len(flows) == 2
    assert all(sandbox.own_addr in (f["saddr"], f["daddr"]) for f in flows)
    assert not [f for f in flows if "127.0.0.1" in (f["saddr"], f["daddr"])]
