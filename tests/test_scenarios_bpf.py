"""The scenarios of issue 11 under a real trace on this kernel: the plan is loaded ONCE for the
module (one `routetrace watch --json`, every namespace, one port) while every scenario's client
runs in the scenarios' network; each scenario is then its own test, asserting the route type,
route device and transmit devices of each of its client's flows. And `prove --sandbox
--scenarios` end to end: exit code, rows, --json, the sandbox removed."""
import json
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from conftest import EXPECTED_BACKEND, LiveRoutetrace, namespaces, require_bpf, sandbox_namespaces
from routetrace.scenarios import NO_VRF, SCENARIOS, vrf_driver_present

PORT = 8894


@dataclass
class Played:
    net: object
    outcomes: dict
    predictions: dict
    flows: list
    summary: dict


@pytest.fixture(scope="module")
def played():
    require_bpf()
    from routetrace.experiment import Sandbox
    from routetrace.record import _flow_from
    from routetrace.scenarios import ScenarioNet
    with ExitStack() as stack:
        net = ScenarioNet.build(stack.enter_context(Sandbox()), PORT)
        predictions = net.predict_all()
        run = LiveRoutetrace("watch", "--json", "-P", str(PORT), "--backend", EXPECTED_BACKEND)
        stack.callback(run.kill)
        outcomes = net.play_all(PORT)
        rc, out, err = run.stop(signal.SIGINT)
        assert rc == 0, err
        summary = json.loads(out.splitlines()[-1])
        assert summary["type"] == "summary"
        yield Played(net, outcomes, predictions, [_flow_from(f) for f in summary["flows"]], summary)


@pytest.mark.bpf
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_each_scenario_per_flow(played, name):
    from routetrace import netns
    from routetrace.scenarios import BY_NAME, client_flows, row_for
    scenario = BY_NAME[name]
    row = row_for(played.net, scenario, played.flows, PORT, played.outcomes.get(name, ""),
                  played.predictions.get(name))
    if row.unavailable:
        assert scenario.needs == "vrf" and row.unavailable.startswith(NO_VRF)
        assert not vrf_driver_present(), row.unavailable
        return
    mine = client_flows(played.flows, scenario, netns.inode_of(played.net.ns(scenario.client_ns)), PORT)
    assert mine, f"no flow for {name} among {played.flows}"
    for flow in mine:
        assert (flow.route_type, flow.route_dev, flow.route_loopback) == \
            (scenario.route_type, scenario.route_dev, scenario.route_loopback), flow
        assert set(flow.xmit_devs) == scenario.xmit_devs and all(flow.xmit_devs.values()), flow
    assert played.outcomes[name] == scenario.client_sees
    assert row.agrees is True and row.problems == [], row.to_dict()


@pytest.mark.bpf
def test_the_trace_of_the_scenarios_lost_nothing(played):
    assert played.summary["lost"]["total"] == 0, played.summary["lost"]


def _prove(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "routetrace", "prove", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.bpf
def test_prove_scenarios_json_end_to_end(bpf_ready):
    out = _prove("--sandbox", "--scenarios", "--json", "-P", "8895")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["type"] == "scenarios" and result["verdict"]["exit"] == 0
    rows = {r["scenario"]: r for r in result["rows"]}
    assert list(rows) == [s.name for s in SCENARIOS]
    for scenario in SCENARIOS:
        r = rows[scenario.name]
        if r["status"] == "not available":
            assert r["unavailable"].startswith(NO_VRF) and not vrf_driver_present()
            assert r["unavailable"] in result["verdict"]["text"]      # said, never silently skipped
            continue
        assert r["status"] == "ok" and r["problems"] == [], r
        assert (r["route_types"], r["route_devs"], set(r["xmit_devs"])) == \
            ([scenario.route_type], [scenario.route_dev], set(scenario.xmit_devs)), r
        assert r["prediction"]["route_type"] == scenario.route_type and r["prediction_agrees"] is True
        assert r["explanation"]
    assert rows["bound-device"]["prediction"]["command"] == "ip route get 198.51.100.1 oif eth1"
    assert rows["policy-mark"]["prediction"]["command"] == "ip route get 198.51.100.2 mark 7"
    assert rows["policy-mark"]["fib_tables"] == [100] and "table 100" in rows["policy-mark"]["explanation"]
    assert not set(sandbox_namespaces(out.stderr)) & set(namespaces())


@pytest.mark.bpf
def test_prove_scenarios_table_end_to_end(bpf_ready):
    out = _prove("--sandbox", "--scenarios", "-P", "8896")
    print(out.stderr + out.stdout)       # shown by pytest -rA: the README quotes a VM's run
    assert out.returncode == 0, out.stdout + out.stderr
    head, *lines = out.stdout.splitlines()
    assert head.split() == ["SCENARIO", "A", "USER", "MIGHT", "EXPECT", "IP", "ROUTE", "GET", "PREDICTS",
                            "KERNEL", "DID", "AGREE", "CLIENT", "RESULT"]
    bound = next(line for line in lines if line.startswith("bound-device "))
    assert "UNICAST dev eth1 via 203.0.113.2" in bound and "UNICAST on eth1, sent on eth1:" in bound
    assert "verdict: all " in out.stdout and "why (the verdict engine):" in out.stdout


def test_prove_scenarios_usage_errors():
    for args, message in ((["--scenarios"], "--scenarios builds its own namespaces: add --sandbox"),
                          (["--sandbox", "--scenarios", "--closed"], "--scenarios chooses its own destinations")):
        out = _prove(*args, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
