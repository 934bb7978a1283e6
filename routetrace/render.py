"""Views of flows: streaming lines (bcc-tool style), the summary table, JSON lines."""
from __future__ import annotations

import json
import time
from typing import Callable

from tabulate import tabulate

from .events import Flow, LossCounters
from .flows import Verdict, classify

STREAM_FORMAT = "{:<8} {:<7} {:<15} {:<5} {:<21} {:<21} {:<9} {:<6} {:<6} {:<6}"
STREAM_HEADER = STREAM_FORMAT.format("TIME", "PID", "COMM", "PROTO", "SOURCE", "DESTINATION",
                                     "RTYPE", "RDEV", "FIBDEV", "XMIT")


def endpoint(addr: str, port: int, proto: str) -> str:
    return addr if proto == "icmp" else f"{addr}:{port}"


def clock_offset_ns() -> int:
    """Wall clock minus the monotonic clock that bpf_ktime_get_ns() reads."""
    return time.time_ns() - time.monotonic_ns()


def wall_time(mono_ns: int, offset_ns: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime((mono_ns + offset_ns) / 1e9))


def stream_line(flow: Flow, offset_ns: int) -> str:
    return STREAM_FORMAT.format(
        wall_time(flow.first_ns, offset_ns), flow.pid, flow.comm[:15], flow.proto,
        endpoint(flow.saddr, flow.sport, flow.proto), endpoint(flow.daddr, flow.dport, flow.proto),
        flow.route_type or "-", flow.route_dev or "-", flow.fib_dev or "-",
        ",".join(sorted(flow.xmit_devs)) or "-")


def devices(counts: dict[str, int]) -> str:
    return " ".join(f"{dev}:{n}" for dev, n in sorted(counts.items())) or "-"


def flow_table(flows: list[Flow], own_addresses: Callable[[int], set[str]]) -> str:
    rows = [(f.proto, endpoint(f.saddr, f.sport, f.proto), endpoint(f.daddr, f.dport, f.proto),
             classify(f.daddr, own_addresses(f.netns)), f.route_type or "-", f.route_dev or "-",
             f.fib_dev or "-", devices(f.xmit_devs)) for f in flows]
    return tabulate(rows, headers=("PROTO", "SOURCE", "DESTINATION", "DEST", "ROUTE TYPE",
                                   "ROUTE DEV", "FIB DEV", "PACKETS BY XMIT DEV"))


def verdict_table(v: Verdict) -> str:
    rows = [(d.daddr, d.kind, "/".join(sorted(d.fib_devs)) or "-",
             "/".join(sorted(d.route_types)) or "-", "/".join(sorted(d.route_devs)) or "-",
             devices(d.xmit_devs)) for d in v.destinations]
    return tabulate(rows, headers=("DESTINATION", "KIND", "FIB SAYS", "ROUTE TYPE", "ROUTE DEV", "SENT ON"))


def losses_line(losses: LossCounters | None) -> str:
    if losses is None:
        return "lost: unknown (the recording has no trailer: it was cut off)"
    if not losses.total:
        return "lost: nothing (0 dropped notices, 0 map overflows, 0 missed probes)"
    return (f"lost: {losses.events_dropped} new-flow notices dropped, "
            f"{losses.flow_map_full + losses.xmit_map_full} packets not counted (map full), "
            f"{losses.probes_missed} missed probes")


def summary_text(flows: list[Flow], v: Verdict, losses: LossCounters | None,
                 own_addresses: Callable[[int], set[str]]) -> str:
    if not flows:
        return f"\nNo flows matched.\n{losses_line(losses)}"
    return "\n".join(["", flow_table(flows, own_addresses), "", verdict_table(v), "",
                      f"verdict: {v.text}", losses_line(losses)])


def summary_object(flows: list[Flow], v: Verdict, losses: LossCounters) -> dict:
    return {
        "type": "summary",
        "flows": [f.to_dict() for f in flows],
        "destinations": [{"daddr": d.daddr, "kind": d.kind, "fib_devs": sorted(d.fib_devs),
                          "route_types": sorted(d.route_types), "route_devs": sorted(d.route_devs),
                          "xmit_devs": d.xmit_devs} for d in v.destinations],
        "verdict": {"holds": v.holds, "text": v.text},
        "lost": losses.to_dict(),
    }


CSV_COLUMNS = ("proto", "saddr", "sport", "daddr", "dport", "netns", "pid", "comm", "route_type",
               "route_dev", "fib_dev", "fib_table", "xmit_dev", "xmit_packets", "packets", "bytes",
               "first_ns", "last_ns", "backend")


def csv_rows(flows: list[Flow]):
    """One row per flow and transmit device (a flow seen on no device still gets one row)."""
    for f in flows:
        base = f.to_dict()
        for dev, n in sorted(f.xmit_devs.items()) or [("", 0)]:
            row = {**base, "xmit_dev": dev, "xmit_packets": n}
            yield ["" if row[c] is None else row[c] for c in CSV_COLUMNS]


def json_line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=False, separators=(",", ":"))
