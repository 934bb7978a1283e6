"""watch --metrics, scraped while tracing real traffic: the counters are the flows' own numbers."""
import os
import re
import signal
import time
import urllib.request

import pytest

from conftest import json_objects

pytestmark = pytest.mark.bpf


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(routetrace_\w+)\{(.*)\} ([0-9.e+]+)$', line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_a_scrape_counts_what_the_trace_counted(sandbox, live):
    port = 19000 + os.getpid() % 1000
    sandbox.serve(sandbox.host, 8888)
    run = live("watch", "--netns", sandbox.host, "-P", "8888", "--json", "--metrics", str(port))
    assert f"Serving metrics at http://127.0.0.1:{port}/metrics" in run.head
    for target in ("127.0.0.1", sandbox.own_addr):
        assert sandbox.connect(sandbox.host, target, 8888) == "ok"
    time.sleep(2.5)                       # two drains: every count has reached user space
    metrics = scrape(port)
    rc, out, err = run.stop(signal.SIGINT)
    assert rc == 0, err
    summary = json_objects(out)[-1]
    netns = str(summary["flows"][0]["netns"])
    for kind, daddr in (("loopback", "127.0.0.1"), ("own-address", sandbox.own_addr)):
        labels = tuple(sorted({"netns": netns, "family": "4", "route_type": "LOCAL", "route_dev": "lo",
                               "xmit_dev": "lo", "dest_kind": kind}.items()))
        flows = [f for f in summary["flows"] if f["daddr"] == daddr]
        assert metrics[("routetrace_packets_total", labels)] == sum(f["packets"] for f in flows) > 0
        assert metrics[("routetrace_flows_total", labels)] == len(flows)
    lost = {dict(k[1]).get("reason"): v for k, v in metrics.items() if k[0] == "routetrace_lost_total"}
    assert lost and all(v == 0 for v in lost.values())
