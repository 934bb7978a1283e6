"""Views of flows: streaming lines (bcc-tool style), the summary table, JSON lines."""
from __future__ import annotations

import array
import dataclasses
import io
import json
from json.encoder import encode_basestring_ascii
import os
import time
from typing import Callable

from tabulate import tabulate

from .events import Flow, LossCounters
from .flows import Aggregate, Verdict, classify
from .sanitize import text

STREAM_FORMAT = "{:<8} {:<7} {:<15} {:<5} {:<21} {:<21} {:<9} {:<6} {:<6} {:<6}"
STREAM_HEADER = STREAM_FORMAT.format("TIME", "PID", "COMM", "PROTO", "SOURCE", "DESTINATION",
                                     "RTYPE", "RDEV", "FIBDEV", "XMIT")


def endpoint(addr: str, port: int, proto: str) -> str:
    """RFC 5952 text, bracketed with a port for IPv6: [2001:db8::1]:8888."""
    if proto in ("icmp", "icmp6"):
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def clock_offset_ns() -> int:
    """Wall clock minus the monotonic clock that bpf_ktime_get_ns() reads."""
    return time.time_ns() - time.monotonic_ns()


_WALL_SECONDS: dict[int, str] = {}         # wall-clock second -> its HH:MM:SS (a storm's lines share a few)


def wall_time(mono_ns: int, offset_ns: int) -> str:
    second = (mono_ns + offset_ns) // 1_000_000_000
    text = _WALL_SECONDS.get(second)
    if text is None:
        if len(_WALL_SECONDS) >= 4096:
            _WALL_SECONDS.clear()
        text = _WALL_SECONDS[second] = time.strftime("%H:%M:%S", time.localtime(second))
    return text


def stream_line(flow: Flow, offset_ns: int) -> str:
    return STREAM_FORMAT.format(
        wall_time(flow.first_ns, offset_ns), flow.pid, text(flow.comm[:15]), flow.proto,
        endpoint(flow.saddr, flow.sport, flow.proto), endpoint(flow.daddr, flow.dport, flow.proto),
        flow.route_type or "-", text(flow.route_dev or "-"), text(flow.fib_dev or "-"),
        text(",".join(sorted(d["name"] for d in flow.devices) or sorted(flow.xmit_devs)) or "-"))


def devices(counts: dict[str, int]) -> str:
    return text(" ".join(f"{dev}:{n}" for dev, n in sorted(counts.items())) or "-")


def flow_table(flows: list[Flow], own_addresses: Callable[[int], set[str]]) -> str:
    rows = [(f.proto, endpoint(f.saddr, f.sport, f.proto), endpoint(f.daddr, f.dport, f.proto),
             classify(f.daddr, own_addresses(f.netns)), f.route_type or "-", text(f.route_dev or "-"),
             text(f.fib_dev or "-"), devices(f.xmit_devs)) for f in flows]
    return tabulate(rows, headers=("PROTO", "SOURCE", "DESTINATION", "DEST", "ROUTE TYPE",
                                   "ROUTE DEV", "FIB DEV", "PACKETS BY XMIT DEV"), disable_numparse=True)


def aggregate_table(aggregates: list[Aggregate], own_addresses: Callable[[int], set[str]]) -> str:
    rows = [(a.key.proto, a.key.daddr, classify(a.key.daddr, own_addresses(a.key.netns)), a.key.route_type,
             text(a.key.route_dev), text(f"{a.key.dev}#{a.key.ifindex}" + (" (loopback)" if a.key.loopback else "")),
             a.flows, a.packets) for a in sorted(aggregates, key=lambda a: a.key)]
    return tabulate(rows, headers=("PROTO", "DESTINATION", "DEST", "ROUTE TYPE", "ROUTE DEV", "XMIT DEV",
                                   "FLOWS", "PACKETS"), disable_numparse=True)


def verdict_table(v: Verdict) -> str:
    rows = [(d.daddr, d.kind, text("/".join(sorted(d.fib_devs)) or "-"),
             "/".join(sorted(d.route_types)) or "-", text("/".join(sorted(d.route_devs)) or "-"),
             devices(d.xmit_devs)) for d in v.destinations]
    table = tabulate(rows, headers=("DESTINATION", "KIND", "FIB SAYS", "ROUTE TYPE", "ROUTE DEV", "SENT ON"),
                     disable_numparse=True)
    # The verdict engine's reason for each destination (flows.explain), under the evidence.
    return table + "\n\nwhy:\n" + "\n".join(f"  {d.daddr}: {text(d.explanation)}" for d in v.destinations)


def losses_line(losses: LossCounters | None) -> str:
    if losses is None:
        return "lost: unknown (the recording has no trailer: it was cut off)"
    if not losses.total:
        line = ("lost: nothing (0 packets: flow map never full, transmit probe never missed; "
                "0 notices dropped, 0 route or FIB lookups missed)")
    else:
        line = (f"lost: {losses.packets_lost} packets not counted ({losses.flow_map_full} flow map full, "
                f"{losses.xmit_missed} missed by the transmit probe); {losses.events_dropped} new-flow notices "
                f"dropped (those flows were streamed late, their packets counted); "
                f"{losses.probes_missed} route answers and {losses.fib_missed} FIB lookups missed")
        if losses.route_unpaired:
            line += (f"; {losses.route_unpaired} route lookups whose entry and return could not be paired "
                     "(their answers dropped)")
    if losses.undecoded:
        line += f"\nother: {losses.undecoded} packets not decoded (not IPv4/IPv6 TCP, UDP, ICMP)"
    for statement in losses.uncountable:
        line += f"\nnot countable here: {text(statement)}"
    return line


def accounting_line(table) -> str:
    if table is None:
        return ""
    line = f"accounted: {table.packets} packets in {table.seen} flows"
    if table.folded:
        line += (f" ({table.folded} flows beyond the table limit of {table.limit} folded into "
                 f"{len(table.aggregates)} aggregates, below)")
    return line


def summary_text(flows: list[Flow], v: Verdict, losses: LossCounters | None,
                 own_addresses: Callable[[int], set[str]], table=None) -> str:
    aggregates = list(table.aggregates.values()) if table is not None else []
    if not flows and not aggregates:
        return f"\nNo flows matched.\n{losses_line(losses)}"
    parts = ["", flow_table(flows, own_addresses)]
    if aggregates:
        parts += ["", "folded flows, by destination and device:", aggregate_table(aggregates, own_addresses)]
    mapped = [f for f in flows if f.extra.get("v4_mapped_socket")]
    if mapped:
        parts += ["", f"note: {len(mapped)} flows came from IPv6 sockets to IPv4-mapped addresses "
                      f"(::ffff:a.b.c.d); the kernel routed them as IPv4, and they are shown as it did."]
    parts += ["", verdict_table(v), "", f"verdict: {text(v.text)}"]
    if table is not None:
        parts.append(accounting_line(table))
    parts.append(losses_line(losses))
    return "\n".join(parts)


def summary_object(flows: list[Flow], v: Verdict, losses: LossCounters, table=None, programs=()) -> dict:
    out = {
        "type": "summary",
        "flows": [f.to_dict() for f in flows],
        "destinations": [{"daddr": d.daddr, "kind": d.kind, "fib_devs": sorted(d.fib_devs),
                          "route_types": sorted(d.route_types), "route_devs": sorted(d.route_devs),
                          "xmit_devs": d.xmit_devs, "loopback_packets": d.loopback_packets,
                          "other_packets": d.other_packets, "explanation": d.explanation} for d in v.destinations],
        "verdict": {"holds": v.holds, "text": v.text},
        "lost": losses.to_dict(),
    }
    if table is not None:
        out["accounted"] = {"packets": table.packets, "flows": table.seen, "folded": table.folded,
                            "table_limit": table.limit}
        out["aggregates"] = [a.to_dict() for a in table.aggregates.values()]
    if programs:
        # The kernel's own accounting (run_time_ns needs sysctl kernel.bpf_stats_enabled=1).
        out["programs"] = [{"name": p.name, "run_cnt": p.run_cnt, "run_time_ns": p.run_time_ns,
                            "recursion_misses": p.recursion_misses} for p in programs]
    return out


def loss_object(losses: LossCounters) -> dict:
    return {"type": "loss", "lost": losses.to_dict()}


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


# One encoder, made once: json.dumps with separators builds a new encoder per call.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_string = encode_basestring_ascii          # what that encoder does to a str (ensure_ascii)


def json_line(obj: dict) -> str:
    return _ENCODE(obj)


# The instance dict of a Flow as the session decodes it: its fields in order, then its cached key.
_FLOW_DICT_KEYS = (*(f.name for f in dataclasses.fields(Flow)), "key")
_DEVICE_KEYS = ("ifindex", "name", "loopback", "packets", "segments", "bytes")


def _optional(value) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is str:
        return _string(value)
    return str(value) if type(value) is int else _ENCODE(value)


class _JsonStrings(dict):
    """str (or None) -> its JSON text, made once: a stream repeats the same few protocols,
    addresses, process and device names line after line. Only str keys are kept (1 and True
    are one dict key); emptied past TEXT_LIMIT entries."""
    TEXT_LIMIT = 1 << 16

    def __missing__(self, value) -> str:
        if type(value) is not str:
            return _optional(value)
        if len(self) >= self.TEXT_LIMIT:
            self.clear()
            self[None] = "null"
        out = self[value] = _string(value)
        return out


_JSON_STRINGS = _JsonStrings({None: "null"})


_FLOW_TEMPLATE = (
    '{"type":"flow","proto":%s,"saddr":%s,"sport":%d,"daddr":%s,"dport":%d,"netns":%d,"pid":%d,"comm":%s,'
    '"route_type":%s,"route_dev":%s,"fib_dev":%s,"fib_table":%s,"xmit_devs":{%s},"packets":%d,"bytes":%d,'
    '"first_ns":%d,"last_ns":%d,"backend":%s,"family":%d,"segments":%d,"route_src":%s,"route_ifindex":%s,'
    '"route_loopback":%s,"fib_ifindex":%s,"devices":[%s],"fragments":%d}')
_integers = array.array
_DEVICE_TEMPLATE = '{"ifindex":%s,"name":%s,"loopback":%s,"packets":%d,"segments":%d,"bytes":%d}'


def _device_json(dev: dict, s=_JSON_STRINGS) -> str:
    if tuple(dev) != _DEVICE_KEYS:
        raise ValueError("a device of another shape")
    ifindex, name, loopback, packets, segments, nbytes = dev.values()
    _integers("q", (ifindex or 0, packets, segments, nbytes))
    return _DEVICE_TEMPLATE % (
        "null" if ifindex is None else "%d" % ifindex, s[name],
        "true" if loopback is True else "false" if loopback is False else _optional(loopback), packets, segments, nbytes)


def flow_json_fast(flow: Flow, s=_JSON_STRINGS, keys=_FLOW_DICT_KEYS) -> str | None:
    """The line json_line(flow.to_dict()) makes, from one template (strings' JSON text cached):
    several times faster than the encoder walking a fresh dict, for the one shape a live flow
    has. None for any other shape (extra fields, a field added to Flow): the encoder does
    those. A count that is not an integer raises, and so does a device of another shape."""
    d = flow.__dict__
    if tuple(d) != keys or d["extra"]:
        return None
    (proto, saddr, sport, daddr, dport, netns, pid, comm, route_type, route_dev, fib_dev, fib_table, xmit_devs,
     packets, nbytes, first_ns, last_ns, backend, family, segments, route_src, route_ifindex, route_loopback,
     fib_ifindex, devices, fragments, _extra, _key) = d.values()
    # "%d" would truncate a float and print None as an error: an integer array refuses both
    # (one C call for all; a bool passes as 1, as the ":d" format it replaces printed it).
    _integers("q", (sport, dport, netns, pid, packets, nbytes, first_ns, last_ns, family, segments, fragments,
                    fib_table or 0, route_ifindex or 0, fib_ifindex or 0))
    if len(devices) == 1:
        devices_text = _device_json(devices[0])
    else:
        devices_text = ",".join(_device_json(dev) for dev in devices)
    if len(xmit_devs) == 1:
        (name, n), = xmit_devs.items()
        xmit = "%s:%d" % (s[name], n)
    else:
        xmit = ",".join("%s:%d" % (s[name], n) for name, n in xmit_devs.items())
    return _FLOW_TEMPLATE % (
        s[proto], s[saddr], sport, s[daddr], dport, netns, pid, s[comm], s[route_type], s[route_dev], s[fib_dev],
        "null" if fib_table is None else "%d" % fib_table, xmit, packets, nbytes, first_ns, last_ns, s[backend],
        family, segments, s[route_src], "null" if route_ifindex is None else "%d" % route_ifindex,
        "true" if route_loopback is True else "false" if route_loopback is False else _optional(route_loopback),
        "null" if fib_ifindex is None else "%d" % fib_ifindex, devices_text, fragments)


_LIVE_DEVICE_TEMPLATE = '{"ifindex":%d,"name":%s,"loopback":%s,"packets":%d,"segments":%d,"bytes":%d}'
_LIVE_FLOW_TEMPLATE = _FLOW_TEMPLATE.replace('"xmit_devs":{%s}', '"xmit_devs":{%s:%d}').replace(
    '"devices":[%s]', '"devices":[' + _LIVE_DEVICE_TEMPLATE + ']')
# Both replacements took (a changed _FLOW_TEMPLATE must change this one too).
assert _LIVE_FLOW_TEMPLATE.count("%") == _FLOW_TEMPLATE.count("%") + 1 + _LIVE_DEVICE_TEMPLATE.count("%") - 1


def live_flow_json_line(flow: Flow, s=_JSON_STRINGS) -> str:
    """flow_json_line for a flow of the live session (events.decode_flows made it from the
    kernel's structs; later drains only add integer counts): its types are known, so the
    common shape -- one device, nothing extra -- is filled in with no check of its values (a
    third of the stream's time in a storm). Any other shape: flow_json_line. Never for a flow
    read from a file (there a count can be anything: flow_json_line checks)."""
    d = flow.__dict__
    if len(d) != len(_FLOW_DICT_KEYS) or len(d["devices"]) != 1 or len(d["xmit_devs"]) != 1 or d["extra"]:
        return flow_json_line(flow)
    (proto, saddr, sport, daddr, dport, netns, pid, comm, route_type, route_dev, fib_dev, fib_table, xmit_devs,
     packets, nbytes, first_ns, last_ns, backend, family, segments, route_src, route_ifindex, route_loopback,
     fib_ifindex, devices, fragments, _extra, _key) = d.values()
    ifindex, name, loopback, dev_packets, dev_segments, dev_bytes = devices[0].values()
    (xmit_name, xmit_packets), = xmit_devs.items()
    return _LIVE_FLOW_TEMPLATE % (
        s[proto], s[saddr], sport, s[daddr], dport, netns, pid, s[comm], s[route_type], s[route_dev], s[fib_dev],
        "null" if fib_table is None else "%d" % fib_table, s[xmit_name], xmit_packets, packets, nbytes, first_ns,
        last_ns, s[backend], family, segments, s[route_src], "null" if route_ifindex is None else "%d" % route_ifindex,
        "null" if route_loopback is None else "true" if route_loopback else "false",
        "null" if fib_ifindex is None else "%d" % fib_ifindex, ifindex, s[name], "true" if loopback else "false",
        dev_packets, dev_segments, dev_bytes, fragments)


def flow_json_line(flow: Flow) -> str:
    """json_line(flow.to_dict()), without copying the flow's dicts: the stream's hot path."""
    try:
        line = flow_json_fast(flow)
    except (TypeError, ValueError, OverflowError):   # a count that is not an int, another shape
        line = None
    return line or _ENCODE(flow.shallow_dict())


def write_stream(out, text: str) -> None:
    """Write live output now, whole and once. To a file descriptor this loops on os.write
    itself: CPython's buffered writers, when a signal (Ctrl-C, which watch catches to finish)
    interrupts a partly written pipe write, write the interrupted part again -- a stream line
    duplicated into the middle of another."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        out.write(text)
        out.flush()
        return
    out.flush()                        # whatever print() left in the text layer goes first
    data = memoryview(text.encode(getattr(out, "encoding", None) or "utf-8", getattr(out, "errors", None) or "strict"))
    while data:
        data = data[os.write(fd, data):]
