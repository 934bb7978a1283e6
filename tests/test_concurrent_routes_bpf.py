"""Many sockets to one destination, bound to different devices, connecting at once from both CPUs
in one traced run: each flow gets its own route (tests/concurrent_routes.py builds the case).

Natively this is the tracepoint plan (routes from the packet or the sending socket); the VM
matrix runs the same case under the kprobe plan, where the route function's answers are paired
per call (tests/test_vm_matrix.py).
"""
import signal

import pytest

import concurrent_routes
from conftest import EXPECTED_BACKEND, json_objects

pytestmark = pytest.mark.bpf


def test_concurrent_connects_to_one_address_each_get_their_bound_devices_route(sandbox, live):
    concurrent_routes.prepare(sandbox)
    run = live("watch", "--netns", sandbox.host, "--port", str(concurrent_routes.PORT), "--json")
    ports = concurrent_routes.connect_concurrently(sandbox, count=40)
    rc, out, err = run.stop(signal.SIGINT)
    assert rc == 0, err
    summary = json_objects(out)[-1]
    assert summary["type"] == "summary"
    flows = concurrent_routes.check_each_flow_took_its_own_route(summary["flows"], ports, sandbox)
    assert len(flows) == 2 * 2 * 40
    assert {f["backend"] for f in flows} == {EXPECTED_BACKEND}
    # veth drops the skb's route before the tracepoint: the connected socket's cached route is
    # the decision here (the kprobe plan, at __dev_queue_xmit's entry, sees the packet's own).
    assert {f["route_src"] for f in flows} <= {"packet", "socket"}, {f["route_src"] for f in flows}
    assert summary["lost"]["total"] == 0, summary["lost"]
