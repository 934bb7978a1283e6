"""Flows, classification, verdict and views, fed with a real trace recorded on this machine."""
import dataclasses
import json
import pytest

from conftest import FIXTURES
from routetrace.events import (KEY_STRUCT, VALUE_STRUCT, Flow, LossCounters, decode_entry, merge_into,
                               route_type_name)
from routetrace.flows import LOOPBACK, OTHER, OWN, FlowTable, classify, verdict
from routetrace.render import (STREAM_HEADER, endpoint, flow_table, losses_line, stream_line,
                               summary_object, summary_text)

OWN_ADDR = "198.51.100.1"
OWN_ADDR6 = "2001:db8::1"


def own(_netns):
    return {OWN_ADDR, OWN_ADDR6}


# Recorded on this machine (kernel 6.18, tracepoint plan) by `watch --netns NS --port 8888 --json`
# while clients in NS (eth0 = 198.51.100.1/24, 2001:db8::1/64; peer .2 / ::2) connected to
# 127.0.0.1, the own address and the peer, over IPv4 and IPv6.
@pytest.fixture
def recorded():
    lines = (FIXTURES / "watch-json-tracepoint-6.18-1.1.jsonl").read_text().splitlines()
    objs = [json.loads(line) for line in lines]
    flows = [Flow(**{k: v for k, v in o.items() if k != "type"}) for o in objs[-1]["flows"]]
    return objs, flows


def kernel_entry(*, family=4, saddr=b"\x7f\0\0\x01", daddr=b"\xc6\x33\x64\x01", ifindex=1, packets=5,
                 route_src=1, flags=0x01 | 0x02 | 0x04, dev=b"lo", route_dev=b"lo", fib_dev=b"eth0"):
    key = KEY_STRUCT.pack(7, ifindex, saddr.ljust(16, b"\0"), daddr.ljust(16, b"\0"), 40000, 8888, 6, family, 0)
    value = VALUE_STRUCT.pack(packets, packets * 60, packets, 0, 10, 42, 254, 1, 2, 2, route_src, flags, 0,
                              b"curl\0\0", dev, route_dev, fib_dev)
    return key, value


def test_classify_loopback_wins_over_own_address():
    assert classify("127.0.0.1", {"127.0.0.1", OWN_ADDR}) == LOOPBACK
    assert classify("127.3.4.5", set()) == LOOPBACK
    assert classify(OWN_ADDR, {OWN_ADDR}) == OWN
    assert classify("198.51.100.2", {OWN_ADDR}) == OTHER


def test_decode_from_kernel_structs():
    flow, continued = decode_entry(*kernel_entry(), "tracepoint")
    assert not continued
    assert (flow.saddr, flow.daddr, flow.family) == ("127.0.0.1", "198.51.100.1", 4)
    assert (flow.proto, flow.route_type, flow.route_dev, flow.fib_dev, flow.comm, flow.route_src) == \
        ("tcp", "LOCAL", "lo", "eth0", "curl", "packet")
    assert flow.devices == [{"ifindex": 1, "name": "lo", "loopback": True, "packets": 5, "segments": 5, "bytes": 300}]
    assert flow.xmit_devs == {"lo": 5} and flow.route_loopback is True
    flow, _ = decode_entry(*kernel_entry(route_src=0, flags=0x10), "tracepoint")
    assert flow.route_type is flow.route_dev is flow.fib_dev is flow.fib_table is None
    assert route_type_name(1) == "UNICAST" and route_type_name(99) == "TYPE99"
    v6, _ = decode_entry(*kernel_entry(family=6, saddr=bytes(15) + b"\1",
                                       daddr=bytes.fromhex("20010db8000000000000000000000001")), "tracepoint")
    assert (v6.saddr, v6.daddr) == ("::1", "2001:db8::1")
    assert endpoint(v6.daddr, 8888, "tcp") == "[2001:db8::1]:8888" and endpoint("::1", 0, "icmp6") == "::1"


def test_devices_are_merged_by_ifindex_not_by_name():
    """A namespace may rename lo, or call a veth "lo": the kernel's flag decides, not the name."""
    fake_lo, _ = decode_entry(*kernel_entry(ifindex=5, dev=b"lo", flags=0x01), "tracepoint")      # a veth named lo
    real_lo, _ = decode_entry(*kernel_entry(ifindex=1, dev=b"lo0", flags=0x01 | 0x04), "tracepoint")  # lo renamed
    merge_into(fake_lo, real_lo)
    assert [(d["ifindex"], d["name"], d["loopback"]) for d in fake_lo.devices] == [(5, "lo", False), (1, "lo0", True)]
    v = verdict([fake_lo], lambda _ns: {"198.51.100.1"})
    (dest,) = v.destinations
    assert (dest.loopback_packets, dest.other_packets) == (5, 5)
    assert v.holds is False and "not loopback: lo" in v.text


def test_table_folds_past_its_limit_and_the_counts_still_add_up():
    table = FlowTable(limit=3)
    total = 0
    for port in range(10):
        key, value = kernel_entry(packets=port + 1)
        key = key[:40] + (40000 + port).to_bytes(2, "little") + key[42:]
        part, _ = decode_entry(key, value, "tracepoint")
        assert table.add(part, continued=False, now_ns=port) is part          # new: streamed once
        total += port + 1
    assert len(table) == 3 and table.folded == 7 and table.seen == 10
    (agg,) = table.aggregates.values()
    assert agg.flows == 7 and agg.packets == sum(range(1, 8))
    assert table.packets == total
    # A folded flow that keeps sending (the kernel marks it continued) adds to its aggregate.
    key, value = kernel_entry(packets=4)
    part, _ = decode_entry(key[:40] + (40000).to_bytes(2, "little") + key[42:], value, "tracepoint")
    assert table.add(part, continued=True, now_ns=11) is None
    assert agg.packets == sum(range(1, 8)) + 4 and agg.flows == 7
    v = verdict(list(table), lambda _ns: {"198.51.100.1"}, table.aggregates.values())
    assert v.holds is None and v.destinations[0].loopback_packets == total + 4


def _port_entry(port, **kw):
    key, value = kernel_entry(**kw)
    return key[:40] + (40000 + port).to_bytes(2, "little") + key[42:], value


def test_counts_of_folded_flows_reach_the_aggregate_their_device_was_folded_into():
    """A storm's order: notices (no counts) fill the table past its limit, then the drain brings
    the counts. Those of a remembered flow on its folded device take the fast path; another
    device, or a flow folded before it had a route, is decoded; the totals are the same as if
    every entry were decoded."""
    def run(fast: bool) -> tuple[FlowTable, int]:
        table = FlowTable(limit=2)
        taken = 0
        notices = [_port_entry(p, packets=0, **({"route_src": 0, "flags": 0x04} if p == 1 else {})) for p in range(6)]
        for key, value in notices:
            part, _ = decode_entry(key, value, "tracepoint")
            assert table.notice(part)
        assert table.folded == 4 and len(table) == 2
        drained = [_port_entry(p, packets=p + 1) for p in range(6)] + [_port_entry(0, packets=7, ifindex=3, dev=b"veth0",
                                                                                  flags=0x01)]
        for key, value in drained:
            part, continued = decode_entry(key, value, "tracepoint")
            counts = (part.packets, part.bytes, part.segments, part.fragments)
            if fast and table.add_folded_counts(part.key, part.devices[0]["ifindex"], counts):
                taken += 1
                continue
            if not table.add_counts(part.key, part.devices[0]["ifindex"], counts, 0):
                assert table.add(part, continued, 0) is None         # nothing is new: no second stream
        return table, taken

    slow, _ = run(fast=False)
    fast, taken = run(fast=True)
    assert taken == 3                      # ports 0, 2, 3 on lo; not port 1 (no route then), not veth0
    def summary(table):
        return sorted((a.key, a.flows, a.packets, a.bytes, a.segments) for a in table.aggregates.values())
    assert summary(fast) == summary(slow)
    assert fast.packets == slow.packets == sum(range(1, 7)) + 7
    lo = next(a for a in fast.aggregates.values() if a.key.dev == "lo" and a.key.route_type == "LOCAL")
    assert (lo.flows, lo.packets) == (3, 1 + 2 + 3 + 4)    # port 1 folded with no route: its counts, decoded, too
    assert fast.take_changed_aggregates() and not fast.take_changed_aggregates()
    # A later epoch's entry of a folded flow that reports another route adds to the aggregate the
    # flow was folded with, as merge_into keeps a tabled flow's first route.
    key, _ = _port_entry(2)
    value = VALUE_STRUCT.pack(5, 300, 5, 0, 10, 42, 254, 2, 2, 1, 2, 0x01 | 0x10, 0, b"curl", b"lo", b"eth0", b"eth0")
    part, continued = decode_entry(key, value, "tracepoint")
    assert continued and (part.route_type, part.route_dev) == ("UNICAST", "eth0")
    before = lo.packets
    assert fast.add_folded_counts(part.key, 1, (5, 300, 5, 0)) and lo.packets == before + 5
    # A key that only hashes like a remembered one (another destination) is not taken for it.
    other, _ = decode_entry(*_port_entry(2, daddr=b"\xc6\x33\x64\x02"), "tracepoint")
    fast._recent_folds.add(hash(other.key), lo.key)
    assert not fast.add_folded_counts(other.key, 1, (1, 60, 1, 0)) and lo.packets == before + 5


def test_recorded_trace_gives_the_same_verdict_offline(recorded):
    objs, flows = recorded
    v = verdict(flows, own)
    assert v.holds is True
    assert v.text == objs[-1]["verdict"]["text"]
    assert [(d.daddr, d.kind) for d in v.destinations] == \
        [("127.0.0.1", LOOPBACK), ("::1", LOOPBACK), (OWN_ADDR, OWN), (OWN_ADDR6, OWN),
         ("198.51.100.2", OTHER), ("2001:db8::2", OTHER)]
    table = FlowTable()
    for flow in flows:
        table.update(flow)
    again = summary_object(flows, v, LossCounters.from_dict(objs[-1]["lost"]), table)
    # The recording predates the engine's explanations: everything else is the same.
    assert [d.pop("explanation") for d in again["destinations"]] == [d.explanation for d in v.destinations]
    assert again == objs[-1]


def test_verdict_fails_and_names_the_destination_that_left_on_a_real_device(recorded):
    _, flows = recorded
    bad = next(f for f in flows if f.daddr == OWN_ADDR)
    bad.devices = [{"ifindex": 2, "name": "eth0", "loopback": False, "packets": 3, "segments": 3, "bytes": 180}]
    v = verdict(flows, own)
    assert v.holds is False
    assert v.text == ("NOT the same path: 198.51.100.1 (own-address) sent on eth0:3 lo:5 (not loopback: eth0) "
                      "[LOCAL route on lo, yet sent on eth0:3 lo:5: a LOCAL route's packets go through the loopback "
                      "device, so eth0 contradicts it]")


def test_the_verdict_explains_each_destination_from_a_recorded_trace(recorded):
    _, flows = recorded
    v = verdict(flows, own)
    why = {d.daddr: d.explanation for d in v.destinations}
    assert why["127.0.0.1"].startswith("LOCAL route on lo: 127.0.0.0/8 is a local route")
    assert why["::1"].startswith("LOCAL route on lo: ::1 is a local route")
    assert why[OWN_ADDR].startswith("LOCAL route on lo: an address of this namespace (the local table names eth0); "
                                    "the kernel outputs local routes through the loopback device")
    assert why["198.51.100.2"].startswith("UNICAST route via eth0: not an address of this namespace")
    assert why["198.51.100.2"].endswith("sent on eth0:6")


def test_watch_and_report_explain_an_own_address_that_left_on_another_device():
    """The scenarios' recording (prove --sandbox --scenarios -w): in the host namespace the own
    address 198.51.100.1 was reached only by a socket bound to eth1, so the claim fails for it,
    and the verdict says why instead of only that."""
    from routetrace.record import read_trace
    trace = read_trace(FIXTURES / "trace-tracepoint-6.18-scenarios.jsonl")
    v = verdict(trace.flows, trace.own_addresses, trace.table.aggregates.values())
    assert v.holds is False
    assert v.text.startswith("NOT the same path: 198.51.100.1 (own-address) sent on eth1:2 (not loopback: eth1) "
                             "[UNICAST route via eth1, not LOCAL: the lookup was tied to eth1 (a socket bound with "
                             "SO_BINDTODEVICE, or an oif)")
    why = {(d.daddr, d.kind): d.explanation for d in v.destinations}
    assert "a policy rule (ip rule, e.g. a fwmark) chose table 100" in why[("198.51.100.2", OTHER)]
    assert "AnyIP" in why[("203.0.113.70", OTHER)]


def test_verdict_needs_both_kinds_of_flow(recorded):
    _, flows = recorded
    only_loopback = [f for f in flows if f.daddr == "127.0.0.1"]
    v = verdict(only_loopback, own)
    assert v.holds is None and "no own-address flow" in v.text
    assert verdict([], own).text == "no verdict: no loopback-range or own-address flow was seen"


def test_flow_table_keeps_the_newest_snapshot_and_never_goes_backwards(recorded):
    _, flows = recorded
    table = FlowTable()
    first = flows[0]
    assert table.update(first) is True
    later = dataclasses.replace(first, packets=first.packets + 3, xmit_devs={"lo": first.packets + 3}, devices=[])
    assert table.update(later) is False
    stale = dataclasses.replace(first, packets=0, xmit_devs={})
    table.update(stale)
    (only,) = list(table)
    assert only.packets == first.packets + 3


def test_stream_line_is_aligned_under_the_header(recorded):
    _, flows = recorded
    line = stream_line(flows[0], offset_ns=0)
    assert len(line) == len(STREAM_HEADER)
    assert "127.0.0.1:" in line and "LOCAL" in line and line.split()[-1] == "lo"


def test_summary_text_has_table_verdict_and_losses(recorded):
    _, flows = recorded
    text = summary_text(flows, verdict(flows, own), LossCounters(), own)
    assert "PACKETS BY XMIT DEV" in text and "FIB SAYS" in text
    assert "verdict: same path: 127.0.0.1-range and own-address flows both left on lo" in text
    assert text.rstrip().endswith("lost: nothing (0 packets: flow map never full, transmit probe never missed; "
                                  "0 notices dropped, 0 route or FIB lookups missed)")
    row = next(line for line in flow_table(flows, own).splitlines() if "198.51.100.2:8888" in line)
    assert "UNICAST" in row and "eth0:" in row and "other" in row
    row6 = next(line for line in flow_table(flows, own).splitlines() if "[2001:db8::1]:8888" in line)
    assert "own-address" in row6 and "LOCAL" in row6 and "lo:5" in row6


def test_losses_are_reported_not_hidden():
    text = losses_line(LossCounters(events_dropped=2, flow_map_full=3, xmit_missed=1, probes_missed=4, undecoded=9))
    assert text == ("lost: 4 packets not counted (3 flow map full, 1 missed by the transmit probe); 2 new-flow "
                    "notices dropped (those flows were streamed late, their packets counted); 4 route answers "
                    "and 0 FIB lookups missed\nother: 9 packets not decoded (not IPv4/IPv6 TCP, UDP, ICMP)")
    assert "No flows matched." in summary_text([], verdict([], own), LossCounters(), own)


def test_a_recorded_ipv6_trace_reads_back_with_its_classification():
    """Recorded on this machine (6.18, tracepoint plan): watch --netns NS --port 8888 --record, with
    clients to 127.0.0.1, ::1, the own addresses 198.51.100.1 / 2001:db8::1 and the peer's."""
    from routetrace.record import read_trace
    trace = read_trace(FIXTURES / "trace-tracepoint-6.18-ipv6.jsonl")
    assert trace.complete and trace.header["minor"] == 1
    v = verdict(trace.flows, trace.own_addresses, trace.table.aggregates.values())
    kinds = {(d.daddr, d.kind) for d in v.destinations}
    assert {("::1", LOOPBACK), (OWN_ADDR6, OWN), ("2001:db8::2", OTHER)} <= kinds
    assert v.holds is True
    six = [f for f in trace.flows if f.family == 6 and f.dport == 8888]
    assert {(f.daddr, f.route_type, f.route_dev) for f in six} == {
        ("::1", "LOCAL", "lo"), (OWN_ADDR6, "LOCAL", "lo"), ("2001:db8::2", "UNICAST", "eth0")}
