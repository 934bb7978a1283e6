"""IPv6 on the running kernel: ::1 and an own IPv6 address leave on the loopback device like
127.0.0.1 and an own IPv4 address; a peer's leaves on its veth. In namespaces the test makes:
the host's eth0 holds 2001:db8::1/64, the peer is 2001:db8::2 (DAD off, so no waiting)."""
import signal
import subprocess
import sys

import pytest

from conftest import EXPECTED_BACKEND, json_objects

pytestmark = pytest.mark.bpf

OWN6, PEER6 = "2001:db8::1", "2001:db8::2"

ECHO6 = ("import socket\n"
         "s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s.bind(('::', {port})); s.listen(16)\n"
         "print('ready', flush=True)\n"
         "while True:\n"
         "    c, _ = s.accept(); c.sendall(c.recv(100)); c.close()\n")


@pytest.fixture
def sandbox6(sandbox):
    procs = []
    assert (sandbox.own_addr6, sandbox.peer_addr6) == (OWN6, PEER6)     # the sandbox has IPv6 (nodad)
    sandbox.serve6 = lambda ns, port: procs.append(_start(ns, ECHO6.format(port=port)))
    yield sandbox
    for p in procs:
        p.kill()
        p.wait()


def _start(ns, code):
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def client(ns, host, port, family="AF_INET6"):
    code = (f"import socket\ns = socket.socket(socket.{family})\n"
            f"try:\n    s.connect(({host!r}, {port})); s.sendall(b'x'); print('ok' if s.recv(10) == b'x' else 'bad')\n"
            f"except ConnectionRefusedError:\n    print('refused')\n")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def flows_to(summary, daddr, dport):
    return [f for f in summary["flows"] if f["daddr"] == daddr and f["dport"] == dport]


def test_ipv6_loopback_and_own_address_leave_on_lo_and_the_peer_on_its_veth(sandbox6, live):
    sb = sandbox6
    sb.serve6(sb.host, 8888)
    sb.serve6(sb.peer, 8888)
    run = live("watch", "--netns", sb.host, "--port", "8888")
    for target in ("::1", OWN6, PEER6):
        assert client(sb.host, target, 8888) == "ok"
    rc, text, err = run.stop(signal.SIGINT)
    assert rc == 0, err
    assert "[2001:db8::1]:8888" in text and "[::1]:8888" in text
    assert "verdict: same path: 127.0.0.1-range and own-address flows both left on lo" in text

    run = live("watch", "--netns", sb.host, "--port", "8888", "--json")
    for target in ("::1", OWN6, PEER6):
        assert client(sb.host, target, 8888) == "ok"
    rc, out, err = run.stop(signal.SIGINT)
    summary = json_objects(out)[-1]
    for daddr in ("::1", OWN6):
        (flow,) = flows_to(summary, daddr, 8888)
        assert flow["family"] == 6 and flow["route_type"] == "LOCAL" and flow["route_dev"] == "lo"
        assert [(d["name"], d["loopback"]) for d in flow["devices"]] == [("lo", True)]
        assert flow["backend"] == EXPECTED_BACKEND
    assert flows_to(summary, OWN6, 8888)[0]["fib_dev"] == "eth0"   # the FIB names the interface; lo carries it
    (peer,) = flows_to(summary, PEER6, 8888)
    assert peer["route_type"] == "UNICAST" and peer["route_dev"] == "eth0" and set(peer["xmit_devs"]) == {"eth0"}
    kinds = {d["daddr"]: d["kind"] for d in summary["destinations"]}
    assert kinds == {"::1": "loopback", OWN6: "own-address", PEER6: "other"}
    assert summary["verdict"]["holds"] is True and summary["lost"]["total"] == 0


def test_closed_ipv6_port_syn_and_rst_both_on_lo(sandbox6, live):
    sb = sandbox6
    run = live("watch", "--netns", sb.host, "--port", "8887", "--json")
    for target in ("::1", OWN6):
        assert client(sb.host, target, 8887) == "refused"
    rc, out, err = run.stop(signal.SIGTERM)
    assert rc == 0, err
    summary = json_objects(out)[-1]
    for daddr in ("::1", OWN6):
        (syn,) = flows_to(summary, daddr, 8887)
        (rst,) = [f for f in summary["flows"] if f["sport"] == 8887 and f["saddr"] == daddr]
        for flow in (syn, rst):
            assert flow["route_type"] == "LOCAL" and flow["route_dev"] == "lo" and flow["xmit_devs"] == {"lo": 1}


@pytest.mark.parametrize("flag,shown,hidden", [("-6", 6, 4), ("-4", 4, 6)])
def test_family_flags_hide_the_other_family(sandbox6, live, flag, shown, hidden):
    sb = sandbox6
    sb.serve(sb.host, 8888)
    sb.serve6(sb.host, 8889)
    run = live("watch", "--netns", sb.host, flag, "--json")
    assert client(sb.host, "127.0.0.1", 8888, "AF_INET") == "ok"
    assert client(sb.host, "::1", 8889) == "ok"
    rc, out, err = run.stop()
    assert rc == 0, err
    families = {f["family"] for f in json_objects(out)[-1]["flows"]}
    assert families == {shown}
    assert f"family={shown}" in err


def test_a_protocol_routetrace_does_not_decode_is_counted_not_dropped(sandbox, live):
    run = live("watch", "--netns", sandbox.host)
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 253); "
            "[s.sendto(b'experimental', ('127.0.0.1', 0)) for _ in range(7)]")
    subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-c", code], check=True)
    rc, text, err = run.stop()
    assert rc == 0, err
    line = next(line for line in text.splitlines() if line.startswith("other: "))
    assert int(line.split()[1]) >= 7 and "packets not decoded" in line


def test_an_ipv4_mapped_destination_is_shown_as_the_ipv4_route_it_took(sandbox, live):
    sandbox.serve(sandbox.host, 8888)
    run = live("watch", "--netns", sandbox.host, "--port", "8888", "--json")
    assert client(sandbox.host, "::ffff:127.0.0.1", 8888) == "ok"          # a dual-stack AF_INET6 socket
    rc, out, err = run.stop()
    assert rc == 0, err
    (flow,) = flows_to(json_objects(out)[-1], "127.0.0.1", 8888)
    assert flow["family"] == 4 and flow["route_type"] == "LOCAL" and flow["v4_mapped_socket"] is True


def test_an_ipv6_recording_reports_exactly_what_the_live_run_showed(sandbox6, live, tmp_path):
    sb = sandbox6
    sb.serve6(sb.host, 8888)
    sb.serve6(sb.peer, 8888)
    path = tmp_path / "v6.jsonl"
    run = live("watch", "--netns", sb.host, "--port", "8888", "--record", str(path))
    for target in ("::1", OWN6, PEER6):
        assert client(sb.host, target, 8888) == "ok"
    rc, out, err = run.stop()
    assert rc == 0, err
    live_summary = out[out.index("\nPROTO "):]
    report = subprocess.run([sys.executable, "-m", "routetrace", "report", str(path)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert report.stdout.split("\n", 1)[1] == live_summary
    assert "[2001:db8::1]:8888" in live_summary and "own-address" in live_summary
