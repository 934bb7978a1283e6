"""Flows, classification, verdict and views, fed with a real trace recorded on this machine."""
import json
from types import SimpleNamespace

import pytest

from conftest import FIXTURES
from routetrace.events import Flow, LossCounters, decode_flow, ipv4, route_type_name
from routetrace.flows import LOOPBACK, OTHER, OWN, FlowTable, classify, verdict
from routetrace.render import (STREAM_HEADER, flow_table, losses_line, stream_line, summary_object,
                               summary_text)

OWN_ADDR = "198.51.100.1"


def own(_netns):
    return {OWN_ADDR}


@pytest.fixture
def recorded():
    lines = (FIXTURES / "watch-json-tracepoint-6.18.jsonl").read_text().splitlines()
    objs = [json.loads(line) for line in lines]
    flows = [Flow(**{k: v for k, v in o.items() if k != "type"}) for o in objs[-1]["flows"]]
    return objs, flows


def test_classify_loopback_wins_over_own_address():
    assert classify("127.0.0.1", {"127.0.0.1", OWN_ADDR}) == LOOPBACK
    assert classify("127.3.4.5", set()) == LOOPBACK
    assert classify(OWN_ADDR, {OWN_ADDR}) == OWN
    assert classify("198.51.100.2", {OWN_ADDR}) == OTHER


def test_decode_from_kernel_structs():
    key = SimpleNamespace(proto=6, saddr=0x0100007F, daddr=0x0164_33C6, sport=40000, dport=8888, netns=7)
    value = SimpleNamespace(pid=42, comm=b"curl\0\0", route_type=2, has_route=1, route_dev=b"lo\0xx",
                            has_fib=1, fib_dev=b"eth0\0", fib_table=254, packets=5, bytes=300,
                            first_ns=10, last_ns=20)
    flow = decode_flow(key, value, {"lo": 5}, "tracepoint")
    assert (flow.saddr, flow.daddr) == ("127.0.0.1", "198.51.100.1")
    assert (flow.proto, flow.route_type, flow.route_dev, flow.fib_dev, flow.comm) == \
        ("tcp", "LOCAL", "lo", "eth0", "curl")
    value.has_route = value.has_fib = 0
    flow = decode_flow(key, value, {}, "tracepoint")
    assert flow.route_type is flow.route_dev is flow.fib_dev is flow.fib_table is None
    assert route_type_name(1) == "UNICAST" and route_type_name(99) == "TYPE99"
    assert ipv4(0x0100007F) == "127.0.0.1"


def test_recorded_trace_gives_the_same_verdict_offline(recorded):
    objs, flows = recorded
    v = verdict(flows, own)
    assert v.holds is True
    assert v.text == objs[-1]["verdict"]["text"]
    assert [(d.daddr, d.kind) for d in v.destinations] == \
        [("127.0.0.1", LOOPBACK), (OWN_ADDR, OWN), ("198.51.100.2", OTHER)]
    again = summary_object(flows, v, LossCounters(**{k: v for k, v in objs[-1]["lost"].items() if k != "total"}))
    assert again == objs[-1]


def test_verdict_fails_and_names_the_destination_that_left_on_a_real_device(recorded):
    _, flows = recorded
    bad = next(f for f in flows if f.daddr == OWN_ADDR)
    bad.xmit_devs = {"eth0": 3}
    v = verdict(flows, own)
    assert v.holds is False
    assert v.text == "NOT the same path: 198.51.100.1 (own-address) sent on eth0:3 lo:7"


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
    later = Flow(**{**first.__dict__, "packets": first.packets + 3, "xmit_devs": {"lo": first.packets + 3}})
    assert table.update(later) is False
    stale = Flow(**{**first.__dict__, "packets": 0, "xmit_devs": {}})
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
    assert text.rstrip().endswith("lost: nothing (0 dropped notices, 0 map overflows, 0 missed probes)")
    row = next(line for line in flow_table(flows, own).splitlines() if "198.51.100.2:8888" in line)
    assert "UNICAST" in row and "eth0:" in row and "other" in row


def test_losses_are_reported_not_hidden():
    text = losses_line(LossCounters(events_dropped=2, flow_map_full=3, xmit_map_full=1, probes_missed=4))
    assert text == "lost: 2 new-flow notices dropped, 4 packets not counted (map full), 4 missed probes"
    assert "No flows matched." in summary_text([], verdict([], own), LossCounters(), own)
