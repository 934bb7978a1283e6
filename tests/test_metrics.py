"""watch --metrics: the collector over a fake live session, and a real HTTP scrape of it."""
import socket
import urllib.request

import pytest

from routetrace import cli, metrics
from routetrace.errors import EnvironmentProblem, UsageError

# python3-prometheus-client (scripts/setup) or the test extra: a missing one fails, never skips.
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

LO = {"netns": "4026531833", "family": "ipv4", "route_type": "LOCAL", "route_dev": "lo", "xmit_dev": "lo",
      "dest_kind": "loopback"}
OWN = dict(LO, dest_kind="own-address")
PEER = {"netns": "4026531833", "family": "ipv4", "route_type": "UNICAST", "route_dev": "eth0",
        "xmit_dev": "eth0", "dest_kind": "other"}


class FakeSession:
    """What the live session provides: cumulative totals, asked for at every scrape."""

    def __init__(self):
        self.rows = [(LO, 10, 2), (OWN, 7, 2), (PEER, 5, 1)]
        self.losses = {"events_dropped": 0, "flow_map_full": 0, "xmit_map_full": 0, "probes_missed": 3, "total": 3}
        self.calls = 0

    def metric_totals(self):
        self.calls += 1
        return iter(self.rows)

    def loss_totals(self):
        return dict(self.losses)


def samples(families):
    out = {}
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name, labels):
    return (name, tuple(sorted(labels.items())))


def test_collector_counts_per_label_set_and_adds_up_equal_ones():
    source = FakeSession()
    source.rows.append((dict(LO), 4, 1))            # same labels again: added, not a second series
    source.rows.append(({"family": "ipv6", "route_type": None}, 1, 1))   # missing keys -> ""
    registry = metrics.make_registry(source)
    assert source.calls == 0                          # registering does not ask the session
    got = samples(registry.collect())
    assert got[key("routetrace_packets_total", LO)] == 14
    assert got[key("routetrace_flows_total", LO)] == 3
    assert got[key("routetrace_packets_total", OWN)] == 7
    assert got[key("routetrace_flows_total", PEER)] == 1
    bare = {k: "" for k in metrics.LABELS} | {"family": "ipv6"}
    assert got[key("routetrace_packets_total", bare)] == 1
    assert got[key("routetrace_lost_total", {"reason": "probes_missed"})] == 3
    assert got[key("routetrace_lost_total", {"reason": "events_dropped"})] == 0
    assert not any(k[0] == "routetrace_lost_total" and ("reason", "total") in k[1] for k in got)
    info = [k for k in got if k[0] == "routetrace_build_info"]
    assert len(info) == 1 and ("version", cli.__version__) in info[0][1]


def _get(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers.get("Content-Type"), resp.read().decode()


def test_http_scrape_prometheus_and_openmetrics_and_counters_move():
    source = FakeSession()
    server, thread = metrics.start_metrics_server("0", source)      # port 0: any free one
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"                                    # loopback unless asked
        url = f"http://127.0.0.1:{port}/metrics"
        ctype, text = _get(url)
        assert ctype.startswith("text/plain")
        got = samples(parse_prometheus(text))
        assert got[key("routetrace_packets_total", LO)] == 10
        assert got[key("routetrace_flows_total", OWN)] == 2
        assert got[key("routetrace_lost_total", {"reason": "probes_missed"})] == 3

        source.rows[0] = (LO, 25, 3)                                  # the session went on counting
        source.losses["events_dropped"] = 2
        ctype, text = _get(url, "application/openmetrics-text; version=1.0.0")
        assert ctype.startswith("application/openmetrics-text")
        assert text.rstrip().endswith("# EOF")
        got = samples(parse_openmetrics(text))
        assert got[key("routetrace_packets_total", LO)] == 25
        assert got[key("routetrace_flows_total", LO)] == 3
        assert got[key("routetrace_lost_total", {"reason": "events_dropped"})] == 2
        assert source.calls == 2
    finally:
        metrics.stop_metrics_server(server, thread)
    assert not thread.is_alive()


def test_ipv6_loopback_bind():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server, thread = metrics.start_metrics_server("[::1]:0", FakeSession())
    try:
        port = server.server_address[1]
        _ctype, text = _get(f"http://[::1]:{port}/metrics")
        assert "routetrace_packets_total" in text
    finally:
        metrics.stop_metrics_server(server, thread)


@pytest.mark.parametrize("spec,want", [("9100", ("127.0.0.1", 9100)), (":9100", ("127.0.0.1", 9100)),
                                       ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::1]:9100", ("::1", 9100)),
                                       ("localhost:80", ("127.0.0.1", 80))])
def test_spec_parsing(spec, want):
    assert metrics.parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["", "x", "70000", "127.0.0.1", "example.org:9100", "::1:9100", "[::1]9100"])
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(UsageError):
        metrics.parse_spec(spec)


def test_port_taken_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EnvironmentProblem, match=f"cannot listen on 127.0.0.1:{port}"):
            metrics.start_metrics_server(str(port), FakeSession())


def test_watch_rejects_a_bad_metrics_spec_before_tracing(capsys):
    code = cli.main(["watch", "--metrics", "nowhere:x"])
    _out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().splitlines() == ["routetrace: --metrics port must be a number from 0 to 65535, not 'x'"]


def test_serving_context_stops_the_server_and_none_serves_nothing():
    with metrics.serving(None, FakeSession()) as nothing:
        assert nothing is None
    with metrics.serving("127.0.0.1:0", FakeSession(), {"backend": "tracepoint"}) as server:
        where = metrics.url(server)
        assert where.startswith("http://127.0.0.1:") and where.endswith("/metrics")
        _ctype, text = _get(where)
        assert 'backend="tracepoint"' in text           # extra build-info labels from the session
    with pytest.raises(OSError):
        _get(where)                                     # closed with the block
