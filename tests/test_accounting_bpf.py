"""Exact under load: every packet a device transmitted is in the summary, or counted as lost.

Each test traces one namespace the test makes (IPv6 off, the peer's neighbour entry warmed up,
so nothing else talks there) and compares routetrace's numbers with the devices' own tx_packets.
"""
import json
import signal
import subprocess
import sys

import pytest

from conftest import json_objects
from routetrace.record import read_trace

pytestmark = pytest.mark.bpf


def tx_packets(ns: str) -> dict[str, int]:
    """Packets each device was handed: transmitted, or dropped by the device. A loopback device
    that cannot queue a packet for its own receive side (backlog full) counts it in rx_dropped,
    not in tx_packets -- tcpdump and routetrace both saw it handed over."""
    data = json.loads(subprocess.run(["ip", "-n", ns, "-j", "-s", "link"], capture_output=True, text=True,
                                     check=True).stdout)
    return {link["ifname"]: link["stats64"]["tx"]["packets"] + link["stats64"]["tx"]["dropped"]
            + (link["stats64"]["rx"]["dropped"] if link.get("link_type") == "loopback" else 0) for link in data}


def storm(ns: str, dest: str, flows: int, packets: int = 1, **kw) -> dict:
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "routetrace.storm", dest, str(flows),
                          "--packets", str(packets), *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def in_ns(ns: str, code: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def quiet(sandbox):
    """The sandbox with nothing but the test's traffic in the host namespace."""
    subprocess.run(["ip", "netns", "exec", sandbox.host, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                   check=True)
    warm_neighbour(sandbox.host, sandbox.peer_addr)
    return sandbox


def warm_neighbour(ns: str, addr: str) -> None:
    """Resolve the peer's link-layer address now, so no ARP runs inside a measured window."""
    in_ns(ns, f"import socket, time; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'w', ('{addr}', 9)); "
              "time.sleep(0.3)")


class Traced:
    """watch --json on the quiet namespace, with the devices' counters read around the traffic."""

    def __init__(self, live, sandbox, *args):
        self.ns = sandbox.host
        # The devices' counters are read just before and after attaching, and just before and
        # after stopping: what routetrace saw lies between the inner and the outer window.
        self.before_start = tx_packets(self.ns)
        self.run = live("watch", "--netns", sandbox.host, "--json", *args)
        self.before = tx_packets(self.ns)

    def stop(self):
        after = tx_packets(self.ns)
        rc, out, err = self.run.stop(signal.SIGINT, timeout=300)
        assert rc == 0, err
        after_stop = tx_packets(self.ns)
        self.transmitted = sum(after[d] - self.before[d] for d in after)
        self.transmitted_at_most = sum(after_stop[d] - self.before_start[d] for d in after_stop)
        self.objects = json_objects(out)
        self.summary = self.objects[-1]
        assert self.summary["type"] == "summary"
        self.streamed = [o for o in self.objects if o["type"] == "flow"]
        self.loss_lines = [o for o in self.objects if o["type"] == "loss"]
        return self

    @property
    def explained(self) -> int:
        lost = self.summary["lost"]
        return self.summary["accounted"]["packets"] + lost["packets_lost"] + lost["undecoded"]

    def assert_every_packet_explained(self):
        assert self.transmitted <= self.explained <= self.transmitted_at_most, \
            (self.transmitted, self.explained, self.transmitted_at_most, self.summary["accounted"], self.summary["lost"])


def keys(flows):
    return [(f["proto"], f["saddr"], f["sport"], f["daddr"], f["dport"]) for f in flows]


def test_a_storm_larger_than_the_default_map_is_accounted_packet_for_packet(quiet, live):
    traced = Traced(live, quiet)
    to_own = storm(quiet.host, quiet.own_addr, 70000)            # over lo; each answered by ICMP on lo
    to_peer = storm(quiet.host, quiet.peer_addr, 3000, packets=3)  # over eth0 (the veth)
    t = traced.stop()
    assert to_own["errors"] == to_peer["errors"] == 0
    assert t.transmitted >= 70000 + 9000
    t.assert_every_packet_explained()
    udp = sum(f["packets"] for f in t.summary["flows"] if f["proto"] == "udp")
    udp += sum(a["packets"] for a in t.summary["aggregates"] if a["proto"] == "udp")
    # On a loaded machine user space may fall behind and the map fill: then those packets are
    # counted as lost, never missing.
    assert udp <= 70000 + 9000 <= udp + t.summary["lost"]["packets_lost"]
    # Every new flow streamed once (the summary keeps only --keep-flows of them as rows).
    assert len(keys(t.streamed)) == len(set(keys(t.streamed))) >= 73000


def test_a_full_flow_map_counts_its_packets_as_lost_in_stream_summary_and_recording(quiet, live, tmp_path):
    path = tmp_path / "trace.jsonl"
    traced = Traced(live, quiet, "--max-flows", "64", "--record", str(path))
    storm(quiet.host, quiet.peer_addr, 5000)
    t = traced.stop()
    lost = t.summary["lost"]
    assert lost["flow_map_full"] > 0 and lost["packets_lost"] == lost["flow_map_full"]
    t.assert_every_packet_explained()
    assert t.loss_lines and t.loss_lines[-1]["lost"]["flow_map_full"] == lost["flow_map_full"]
    trace = read_trace(path)
    assert trace.losses.flow_map_full == lost["flow_map_full"]
    report = subprocess.run([sys.executable, "-m", "routetrace", "report", str(path)], capture_output=True, text=True)
    assert f"lost: {lost['flow_map_full']} packets not counted ({lost['flow_map_full']} flow map full" in report.stdout


def test_a_full_notice_ring_delays_streaming_but_every_flow_is_streamed_once(quiet, live, tmp_path):
    path = tmp_path / "trace.jsonl"
    traced = Traced(live, quiet, "--ring-pages", "1", "--record", str(path))
    storm(quiet.host, quiet.own_addr, 5000, packets=2)
    t = traced.stop()
    assert t.summary["lost"]["events_dropped"] > 0                # the ring really overflowed
    assert t.loss_lines and t.loss_lines[0]["lost"]["events_dropped"] > 0
    assert t.summary["lost"]["packets_lost"] == 0                  # notices are hints: counts are exact
    t.assert_every_packet_explained()
    streamed = keys(t.streamed)
    assert len(streamed) == len(set(streamed)) == t.summary["accounted"]["flows"] >= 5000
    assert set(streamed) == set(keys(t.summary["flows"]))
    assert read_trace(path).trailer["flows"] == len(streamed)


def test_the_flow_table_stays_within_its_limit_and_the_aggregates_add_up(quiet, live):
    traced = Traced(live, quiet, "--keep-flows", "100")
    storm(quiet.host, quiet.own_addr, 3000, packets=2)
    t = traced.stop()
    accounted = t.summary["accounted"]
    assert len(t.summary["flows"]) <= 100
    assert accounted["folded"] >= 2900 and accounted["table_limit"] == 100
    rows = sum(f["packets"] for f in t.summary["flows"])
    folded = sum(a["packets"] for a in t.summary["aggregates"])
    assert rows + folded == accounted["packets"]
    t.assert_every_packet_explained()
    assert t.summary["verdict"]["holds"] is None or t.summary["verdict"]["holds"] is True


def test_loopback_is_known_by_its_flag_not_by_its_name(quiet, live):
    """lo renamed lo0, and the veth (holding the own address) renamed "lo"."""
    ns = quiet.host
    for args in (("lo", "down"), ("lo", "name", "lo0"), ("lo0", "up"), ("eth0", "down"), ("eth0", "name", "lo"),
                 ("lo", "up")):
        subprocess.run(["ip", "-n", ns, "link", "set", "dev", args[0], *args[1:]], check=True)
    warm_neighbour(ns, quiet.peer_addr)
    quiet.serve(ns, 8888)
    quiet.serve(quiet.peer, 8888)
    traced = Traced(live, quiet, "--port", "8888")
    for target in (quiet.own_addr, quiet.peer_addr):
        assert quiet.connect(ns, target, 8888) == "ok"
    t = traced.stop()
    flows = {(f["daddr"], f["dport"]): f for f in t.summary["flows"]}
    own = flows[(quiet.own_addr, 8888)]
    assert [(d["name"], d["loopback"]) for d in own["devices"]] == [("lo0", True)]
    assert own["route_type"] == "LOCAL" and own["route_dev"] == "lo0" and own["route_loopback"] is True
    peer = flows[(quiet.peer_addr, 8888)]
    assert [(d["name"], d["loopback"]) for d in peer["devices"]] == [("lo", False)]
    assert peer["route_type"] == "UNICAST" and peer["route_loopback"] is False
    assert t.summary["verdict"]["holds"] is None           # no 127.0.0.1 flow, but nothing off loopback:
    kinds = {d["daddr"]: d for d in t.summary["destinations"]}
    assert kinds[quiet.own_addr]["other_packets"] == 0 and kinds[quiet.own_addr]["loopback_packets"] > 0
    assert kinds[quiet.peer_addr]["loopback_packets"] == 0 and kinds[quiet.peer_addr]["other_packets"] > 0


def test_fragments_keep_their_flow_and_gso_counts_segments(quiet, live):
    ns = quiet.host
    # lo's MTU at 1500 makes TCP build GSO super-packets of many segments on lo.
    subprocess.run(["ip", "-n", ns, "link", "set", "dev", "lo", "mtu", "1500"], check=True)
    sink = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                             "import socket; s = socket.create_server(('0.0.0.0', 8888)); print('ready', flush=True); "
                             "c, _ = s.accept(); n = 0\nwhile (d := c.recv(1 << 20)): n += len(d)\nc.sendall(b'ok')"],
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    traced = Traced(live, quiet)
    in_ns(ns, f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              f"s.sendto(b'f' * 4000, ('{quiet.peer_addr}', 7001))")
    in_ns(ns, f"import socket; s = socket.create_connection(('{quiet.own_addr}', 8888)); "
              f"s.sendall(b'g' * 2_000_000); s.shutdown(socket.SHUT_WR); s.recv(10); s.close()")
    sink.wait(timeout=30)
    t = traced.stop()
    (frag,) = [f for f in t.summary["flows"] if f["proto"] == "udp" and f["dport"] == 7001]
    assert frag["packets"] == 3 and frag["fragments"] == 2 and frag["sport"] > 0
    assert frag["bytes"] == 4000 + 8 + 3 * 20
    (bulk,) = [f for f in t.summary["flows"] if f["proto"] == "tcp" and f["dport"] == 8888]
    assert bulk["segments"] > bulk["packets"]                  # TSO/GSO skbs are many packets on the wire
    assert bulk["bytes"] >= 2_000_000
    t.assert_every_packet_explained()
