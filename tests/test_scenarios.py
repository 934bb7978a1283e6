"""The scenarios of `prove --scenarios` without root: ip route get's answers parsed, and every
scenario judged and explained by the verdict engine from a trace recorded on this machine."""
import dataclasses
import json

import pytest

from conftest import FIXTURES
from routetrace.events import Flow
from routetrace.flows import LOOPBACK, OTHER, OWN, DestinationSummary, classify, explain
from routetrace.record import read_trace
from routetrace.scenarios import (BY_NAME, HOST, NO_VRF, SCENARIOS, Prediction, ScenarioRow, client_flows,
                                  judge, parse_route_get, render, route_get_args, unavailable_row, verdict)
from routetrace.experiment import SocketOptions

# Recorded on this machine (6.18, tracepoint plan) by
#   routetrace prove --sandbox --scenarios -P 8893 -w tests/fixtures/trace-tracepoint-6.18-scenarios.jsonl
# (the live session's recorder, the one `watch --record` uses). No VRF here: 7 scenarios ran.
RECORDING = FIXTURES / "trace-tracepoint-6.18-scenarios.jsonl"
PORT = 8893

# `ip -j route get ...` in the scenarios' host namespace, as iproute2 printed it.
ROUTE_GET = {
    "bound": '[{"dst":"198.51.100.1","gateway":"203.0.113.2","dev":"eth1","prefsrc":"203.0.113.1","flags":[],'
             '"uid":0,"cache":[]}]',
    "local": '[{"type":"local","dst":"198.51.100.1","dev":"lo","table":"local","prefsrc":"198.51.100.1",'
             '"flags":[],"uid":0,"cache":["local"]}]',
    "mark": '[{"dst":"198.51.100.2","gateway":"203.0.113.2","dev":"eth1","table":"100","prefsrc":"203.0.113.1",'
            '"flags":[],"mark":7,"uid":0,"cache":[]}]',
}


def test_route_get_arguments_follow_the_socket_options():
    assert route_get_args("198.51.100.1", SocketOptions(device="eth1")) == ["route", "get", "198.51.100.1",
                                                                             "oif", "eth1"]
    assert route_get_args("198.51.100.2", SocketOptions(mark=7, source="203.0.113.1")) == [
        "route", "get", "198.51.100.2", "mark", "7", "from", "203.0.113.1"]
    assert route_get_args("127.0.0.2") == ["route", "get", "127.0.0.2"]


def test_route_get_answers_are_parsed_unicast_when_no_type_is_given():
    bound = parse_route_get("ip route get 198.51.100.1 oif eth1", ROUTE_GET["bound"])
    assert (bound.route_type, bound.dev, bound.gateway, bound.table) == ("UNICAST", "eth1", "203.0.113.2", None)
    assert bound.describe() == "UNICAST dev eth1 via 203.0.113.2"
    local = parse_route_get("ip route get 198.51.100.1", ROUTE_GET["local"])
    assert (local.route_type, local.dev, local.table) == ("LOCAL", "lo", "local")
    mark = parse_route_get("ip route get 198.51.100.2 mark 7", ROUTE_GET["mark"])
    assert (mark.route_type, mark.dev, mark.table) == ("UNICAST", "eth1", "100")
    failed = parse_route_get("ip route get 203.0.113.9", "", 2, "RTNETLINK answers: Network is unreachable\n")
    assert failed.route_type is None and failed.describe() == "error: RTNETLINK answers: Network is unreachable"
    assert parse_route_get("x", "not json").error.startswith("unreadable answer")


@pytest.fixture(scope="module")
def recorded():
    trace = read_trace(RECORDING)
    names = {o["name"].rsplit("-", 1)[1]: o["netns"] for o in map(json.loads, RECORDING.read_text().splitlines())
             if o["type"] == "netns"}
    return trace, names


def _row(recorded, scenario, prediction=None, client=None):
    trace, names = recorded
    inode = names[scenario.client_ns]
    flows = client_flows(trace.flows, scenario, inode, PORT)
    return judge(scenario, flows, kind=classify(scenario.daddr, trace.own_addresses(inode)),
                 prediction=prediction, client=scenario.client_sees if client is None else client)


def test_the_recording_holds_every_scenario_but_vrf(recorded):
    trace, names = recorded
    assert trace.complete and set(names) == {"host", "peer"}
    rows = {s.name: _row(recorded, s) for s in SCENARIOS if s.needs is None}
    assert {name: row.problems for name, row in rows.items()} == {name: [] for name in rows}
    assert rows["bound-device"].xmit_devs == {"eth1": 2}          # the SYN and its retransmission
    assert rows["container"].route_devs == ["p0"] and rows["policy-mark"].fib_tables == [100]


# What the engine must say for each scenario, from the recorded evidence alone.
EXPLAINED = {
    "bound-device": ["UNICAST route via eth1, not LOCAL", "tied to eth1", "SO_BINDTODEVICE", "sent on eth1:2"],
    "container": ["UNICAST route via p0", "not an address of this namespace"],
    "anyip": ["LOCAL route on lo", "no interface holds this address", "AnyIP"],
    "policy-mark": ["UNICAST route via eth1", "policy rule", "chose table 100"],
    "loopback-range": ["LOCAL route on lo", "127.0.0.0/8 is a local route", "loopback device"],
    "secondary": ["LOCAL route on lo", "an address of this namespace (the local table names eth0)"],
    "down-device": ["LOCAL route on lo", "the local table names eth2"],
}


@pytest.mark.parametrize("name", sorted(EXPLAINED))
def test_the_engine_explains_each_recorded_scenario(recorded, name):
    row = _row(recorded, BY_NAME[name])
    for phrase in EXPLAINED[name]:
        assert phrase in row.explanation, (phrase, row.explanation)


def test_kinds_decide_the_reason_not_the_address(recorded):
    """The same LOCAL-on-lo evidence explains differently for 127/8, an own address and AnyIP."""
    trace, names = recorded
    kinds = {name: _row(recorded, BY_NAME[name]).explanation.split(": ", 1)[1].split(";")[0]
             for name in ("loopback-range", "secondary", "anyip")}
    assert len(set(kinds.values())) == 3
    assert classify("203.0.113.70", trace.own_addresses(names["host"])) == OTHER
    assert classify("198.51.100.3", trace.own_addresses(names["host"])) == OWN
    assert classify("127.0.0.2", set()) == LOOPBACK


def test_a_vrf_local_route_is_explained_by_its_master_device():
    """No VRF on this kernel (the VM matrix plays it): the evidence a VM trace carries, by hand."""
    flow = Flow("tcp", "198.51.100.65", 40000, "198.51.100.65", 8888, 1, 1, "python", "LOCAL", "vrf-blue",
                "eth3", 10, route_loopback=False,
                devices=[{"ifindex": 9, "name": "vrf-blue", "loopback": False, "packets": 3, "segments": 3,
                          "bytes": 180}], xmit_devs={"vrf-blue": 3})
    seen = DestinationSummary("198.51.100.65", OWN)
    seen.add(flow)
    text = explain(seen)
    assert text.startswith("LOCAL route on vrf-blue, not the loopback device: vrf-blue is the VRF (L3 master)")
    assert judge(BY_NAME["vrf"], [flow], kind=OWN, prediction=None, client="ok").problems == []


def test_a_local_route_sent_on_a_real_device_is_called_a_contradiction(recorded):
    trace, names = recorded
    (flow,) = client_flows(trace.flows, BY_NAME["secondary"], names[HOST], PORT)
    bad = dataclasses.replace(flow, devices=[{"ifindex": 2, "name": "eth0", "loopback": False, "packets": 4,
                                               "segments": 4, "bytes": 240}], xmit_devs={"eth0": 4})
    row = judge(BY_NAME["secondary"], [bad], kind=OWN, prediction=None, client="ok")
    assert "yet sent on eth0:4" in row.explanation and "eth0 contradicts it" in row.explanation
    assert row.problems == ["sent on eth0, documented: lo"]


def test_rows_fail_on_the_wrong_route_a_wrong_prediction_or_the_wrong_client_outcome(recorded):
    scenario = BY_NAME["bound-device"]
    lo = Prediction("ip route get 198.51.100.1 oif eth1", "LOCAL", "lo")
    row = _row(recorded, scenario, prediction=lo, client="ok")
    assert row.agrees is False and row.status == "FAILED"
    assert row.problems == ["the client got 'ok', documented: 'timeout'",
                            "ip route get predicted LOCAL dev lo, the kernel used UNICAST on eth1"]
    right = Prediction("ip route get 198.51.100.1 oif eth1", "UNICAST", "eth1", gateway="203.0.113.2")
    assert _row(recorded, scenario, prediction=right).agrees is True
    wrong = dataclasses.replace(BY_NAME["container"], route_dev="eth0", xmit_devs=frozenset({"eth0"}))
    assert _row(recorded, wrong).problems == ["route UNICAST on p0, documented: UNICAST on eth0",
                                              "sent on p0, documented: eth0"]
    empty = judge(BY_NAME["anyip"], [], kind=OTHER, prediction=None, client="ok")
    assert empty.problems == ["no packets were seen for this scenario's client"]


def test_verdict_names_failing_rows_and_states_what_could_not_run(recorded):
    rows = [_row(recorded, s) for s in SCENARIOS if s.needs is None]
    missing = unavailable_row(BY_NAME["vrf"], NO_VRF + " (Error: Unknown device type.)")
    code, text = verdict(rows + [missing])
    assert code == 0 and text.startswith("all 7 scenarios that ran did what the kernel's code documents")
    assert text.endswith("vrf: not available on this kernel: no vrf device (Error: Unknown device type.)")
    assert missing.status == "not available" and missing.to_dict()["unavailable"].startswith(NO_VRF)
    rows[0].problems.append("sent on lo, documented: eth1")
    code, text = verdict(rows + [missing])
    assert code == 1 and "bound-device (sent on lo, documented: eth1)" in text
    assert verdict([missing]) == (1, "no scenario could run; vrf: " + missing.unavailable)
    table = render(rows + [missing], code, text, None)
    assert "not available on this kernel: no vrf device" in table and "FAILED: sent on lo" in table
    assert isinstance(rows[1], ScenarioRow) and rows[1].to_dict()["documented"]["xmit_devs"] == ["p0"]
