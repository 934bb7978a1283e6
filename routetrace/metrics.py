"""Fleet metrics: `routetrace watch --metrics [ADDR:]PORT` serves the live session's counters
over HTTP in the Prometheus text format, or OpenMetrics when the scraper asks for it.

The numbers come from a *source* (the live session) with two methods, both cumulative and
monotonic, and both called from the HTTP server's thread at each scrape:

  source.metric_totals() -> iterable of (labels: dict[str, str], packets: int, flows: int)
      labels keys: see LABELS; a missing key or None is exported as "".
  source.loss_totals()   -> dict[str, int], counter name -> value, e.g. {"events_dropped": 0, ...};
      a "total" entry is left out (it is the sum of the others: sum() gives it back).

Exported (one series per distinct label set; equal label sets from the source are added up):

  routetrace_packets_total{netns,family,route_type,route_dev,xmit_dev,dest_kind}
  routetrace_flows_total{netns,family,route_type,route_dev,xmit_dev,dest_kind}
  routetrace_lost_total{reason}          what the tracer knows it missed, per reason
  routetrace_build_info{version,python,kernel,bcc_version,...}  always 1

prometheus_client (Debian: python3-prometheus-client) is imported only when metrics are served.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import platform
import socket
import threading
from typing import Iterable, Protocol

from . import __version__
from .errors import EnvironmentProblem, UsageError

DEFAULT_ADDR = "127.0.0.1"
LABELS = ("netns", "family", "route_type", "route_dev", "xmit_dev", "dest_kind")
PROMETHEUS_MISSING = ("--metrics needs the Python package prometheus_client: "
                      "apt install python3-prometheus-client (or pip install prometheus-client)")


class MetricsSource(Protocol):
    def metric_totals(self) -> Iterable[tuple[dict, int, int]]: ...

    def loss_totals(self) -> dict[str, int]: ...


def parse_spec(spec: str) -> tuple[str, int]:
    """"9100" -> ("127.0.0.1", 9100); "0.0.0.0:9100", "[::1]:9100", ":9100" (default address).
    The address must be an IP literal (or "localhost"); port 0 takes any free port."""
    text = spec.strip()
    if text.isdigit():
        addr, port = DEFAULT_ADDR, text
    elif text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"--metrics must be [ADDR:]PORT (IPv6 as [ADDR]:PORT), not {spec!r}")
        addr = host
    else:
        addr, sep, port = text.rpartition(":")
        if not sep or ":" in addr:
            raise UsageError(f"--metrics must be [ADDR:]PORT (IPv6 as [ADDR]:PORT), not {spec!r}")
        addr = addr or DEFAULT_ADDR
    if addr == "localhost":
        addr = DEFAULT_ADDR
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--metrics port must be a number from 0 to 65535, not {port!r}")
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        raise UsageError(f"--metrics address must be an IP address, not {addr!r}") from None
    return addr, int(port)


def require_prometheus_client() -> None:
    """Fail early (before BPF is compiled) when the exporter library is missing."""
    import importlib.util
    if importlib.util.find_spec("prometheus_client") is None:
        raise EnvironmentProblem(PROMETHEUS_MISSING)


def build_info(extra: dict | None = None) -> dict[str, str]:
    info = {"version": __version__, "python": platform.python_version(), "kernel": os.uname().release}
    try:
        from .kernel import bcc_version
        info["bcc_version"] = str(bcc_version() or "")
    except Exception:   # build info must never break a scrape
        info["bcc_version"] = ""
    info.update({k: str(v) for k, v in (extra or {}).items()})
    return info


class RoutetraceCollector:
    """A prometheus_client custom collector over a MetricsSource."""

    def __init__(self, source: MetricsSource, info: dict | None = None):
        self.source = source
        self.info = build_info(info)

    def _families(self):
        from prometheus_client.core import CounterMetricFamily, InfoMetricFamily
        packets = CounterMetricFamily("routetrace_packets", "Packets transmitted, by route decision and device",
                                      labels=LABELS)
        flows = CounterMetricFamily("routetrace_flows", "Flows seen (one direction of a connection), "
                                    "by route decision and device", labels=LABELS)
        lost = CounterMetricFamily("routetrace_lost", "Events the tracer knows it missed, by reason "
                                   "(ring-buffer drops, map overflows, missed probes)", labels=("reason",))
        info = InfoMetricFamily("routetrace_build", "routetrace build and environment")
        return packets, flows, lost, info

    def describe(self):
        # Without samples: registering must not call the source.
        return list(self._families())

    def collect(self):
        packets, flows, lost, info = self._families()
        sums: dict[tuple[str, ...], list[int]] = {}
        for labels, n_packets, n_flows in list(self.source.metric_totals()):
            key = tuple("" if labels.get(k) is None else str(labels.get(k)) for k in LABELS)
            acc = sums.setdefault(key, [0, 0])
            acc[0] += int(n_packets)
            acc[1] += int(n_flows)
        for key in sorted(sums):
            packets.add_metric(list(key), sums[key][0])
            flows.add_metric(list(key), sums[key][1])
        for reason, value in sorted(dict(self.source.loss_totals()).items()):
            if reason != "total":
                lost.add_metric([reason], int(value))
        info.add_metric([], self.info)
        return [packets, flows, lost, info]


def make_registry(source: MetricsSource, info: dict | None = None):
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RoutetraceCollector(source, info))
    return registry


def start_metrics_server(spec: str, source: MetricsSource, info: dict | None = None):
    """Serve the source's metrics on [ADDR:]PORT (127.0.0.1 unless ADDR is given) from a daemon
    thread. Returns (server, thread); stop with stop_metrics_server(server, thread).
    `server.server_address[1]` is the port actually bound (useful with port 0)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
    addr, port = parse_spec(spec)
    try:
        from prometheus_client import make_wsgi_app
    except ImportError:
        raise EnvironmentProblem(PROMETHEUS_MISSING) from None

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *_args):     # scrapes must not write into the trace output
            pass

    app = make_wsgi_app(make_registry(source, info))
    try:
        server = make_server(addr, port, app, Server, handler_class=QuietHandler)
    except OSError as exc:
        raise EnvironmentProblem(f"--metrics {spec}: cannot listen on {addr}:{port}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, name="routetrace-metrics", daemon=True)
    thread.start()
    return server, thread


def stop_metrics_server(server, thread, timeout: float = 5.0) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout)


def url(server) -> str:
    """Where a started server answers, e.g. http://127.0.0.1:9464/metrics (for the "Tracing" line)."""
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


@contextlib.contextmanager
def serving(spec: str | None, source: MetricsSource, info: dict | None = None):
    """`with serving(spec, session) as server:` serves for the block's duration; spec None: nothing
    (server is None)."""
    if not spec:
        yield None
        return
    server, thread = start_metrics_server(spec, source, info)
    try:
        yield server
    finally:
        stop_metrics_server(server, thread)
