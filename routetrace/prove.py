"""`routetrace prove`: the 127.0.0.1-versus-own-IP experiment, end to end, judged from the trace.

A listener, a client per destination (127.0.0.1, each own address, a non-local control), the
tracer attached throughout; then a row per destination: the local table's entry, the FIB's
answer, the route the kernel chose, packets per transmit device. Exit 0 when loopback and
own-address traffic left on lo and the control did not, 1 when that failed, 2 on errors.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tabulate import tabulate

from . import netns
from .events import Flow
from .experiment import connect_from, enter_sandbox, host_addresses, start_listener, stop_process
from .flows import LOOPBACK, OWN, is_loopback_device
from .probes import Filters
from .record import TraceWriter
from .render import devices, json_line, losses_line
from .session import Session

CONTROL = "control"


@dataclass(frozen=True)
class Target:
    addr: str
    kind: str                      # loopback | own-address | control
    local_entry: str | None = None  # e.g. "local 198.51.100.1 dev eth0"
    owner_dev: str | None = None    # the device the local table names


@dataclass
class ProveRow:
    target: Target
    outcome: str                    # "ok", "refused", "bad reply": what the client saw
    fib_devs: list[str] = field(default_factory=list)
    route_types: list[str] = field(default_factory=list)
    route_devs: list[str] = field(default_factory=list)
    xmit_devs: dict[str, int] = field(default_factory=dict)
    ok: bool = False
    why: str = ""

    def to_dict(self) -> dict:
        return {"daddr": self.target.addr, "kind": self.target.kind, "local_entry": self.target.local_entry,
                "client": self.outcome, "fib_devs": self.fib_devs, "route_types": self.route_types,
                "route_devs": self.route_devs, "xmit_devs": self.xmit_devs, "ok": self.ok, "why": self.why}


def local_table(ns: str | None) -> list[dict]:
    args = ["ip", "-j", *(["-n", ns] if ns else []), "route", "show", "table", "local"]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


def local_entry(addr: str, table: list[dict]) -> tuple[str | None, str | None]:
    """The local table's entry covering addr, most specific first: ("local 10.1.2.3 dev eth0", "eth0")."""
    ip = ipaddress.ip_address(addr)
    best = None
    for route in table:
        if route.get("type") != "local":
            continue
        net = ipaddress.ip_network(route["dst"] if "/" in route["dst"] else route["dst"] + "/32", strict=False)
        if ip in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, route)
    if best is None:
        return None, None
    route = best[1]
    return f"local {route['dst']} dev {route['dev']}", route["dev"]


def judge(target: Target, outcome: str, flows: list[Flow], port: int) -> ProveRow:
    """One destination's row: both directions of its connection, as the kernel sent them."""
    mine = [f for f in flows if (f.daddr == target.addr and f.dport == port)
            or (f.saddr == target.addr and f.sport == port)]
    row = ProveRow(target, outcome)
    row.fib_devs = sorted({f.fib_dev for f in mine if f.fib_dev and f.daddr == target.addr})
    row.route_types = sorted({f.route_type for f in mine if f.route_type})
    row.route_devs = sorted({f.route_dev for f in mine if f.route_dev})
    for f in mine:
        for dev, n in f.xmit_devs.items():
            row.xmit_devs[dev] = row.xmit_devs.get(dev, 0) + n
    sent = sum(row.xmit_devs.values())
    off_lo = {d: n for d, n in row.xmit_devs.items() if not is_loopback_device(d)}
    if sent == 0:
        row.ok, row.why = False, "no packets were seen for this destination"
    elif target.kind == CONTROL:
        if off_lo and "LOCAL" not in row.route_types:
            row.ok, row.why = True, f"left on {'/'.join(sorted(off_lo))}, as a non-local destination must"
        else:
            row.ok, row.why = False, "the control stayed on lo: the trace cannot tell local from non-local"
    elif off_lo:
        row.ok, row.why = False, f"{sum(off_lo.values())} packets left on {'/'.join(sorted(off_lo))}, not lo"
    elif row.route_types != ["LOCAL"] or row.route_devs != ["lo"]:
        row.ok, row.why = False, (f"route type {'/'.join(row.route_types) or '?'} on "
                                  f"{'/'.join(row.route_devs) or '?'}, not LOCAL on lo")
    else:
        row.ok, row.why = True, "LOCAL route, sent on lo"
    return row


def verdict(rows: list[ProveRow]) -> tuple[int, str]:
    """Exit code and the sentence that goes with it."""
    bad = [r for r in rows if not r.ok]
    if bad:
        return 1, "the claim did NOT hold: " + "; ".join(f"{r.target.addr} ({r.target.kind}): {r.why}" for r in bad)
    kinds = {r.target.kind for r in rows}
    if LOOPBACK not in kinds or OWN not in kinds:
        return 1, "the claim was not tested: need both a 127.0.0.1 and an own-address destination"
    text = ("the claim holds: 127.0.0.1 and own-address traffic both took a LOCAL route and left on lo "
            "(nothing on the interface that holds the address)")
    if CONTROL in kinds:
        text += "; the non-local control left on its real device"
    else:
        text += "; no non-local control was available (give one with --control)"
    return 0, text


def render(rows: list[ProveRow], code: int, text: str, losses) -> str:
    table = []
    for r in rows:
        devs = dict(r.xmit_devs)
        for dev in filter(None, (r.target.owner_dev, "lo")):
            devs.setdefault(dev, 0)           # the zero is the evidence: show it
        table.append((r.target.addr, r.target.kind, r.target.local_entry or "-", "/".join(r.fib_devs) or "-",
                      "/".join(r.route_types) or "-", "/".join(r.route_devs) or "-", devices(devs),
                      ("ok: " if r.ok else "FAILED: ") + r.why))
    body = tabulate(table, headers=("DESTINATION", "KIND", "LOCAL TABLE", "FIB SAYS", "ROUTE TYPE",
                                    "ROUTE DEV", "PACKETS BY XMIT DEV", "RESULT"))
    return f"{body}\n\nverdict: {text}\n{losses_line(losses)}"


def run(plan, headers_path, *, ns: str | None, targets: list[Target], port: int, proto: str = "tcp",
        closed: bool = False, record: str | None = None, as_json: bool = False, out=None, err=None) -> int:
    """Trace while a client reaches each target; print the rows and the verdict; return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    expected = "refused" if closed else "ok"
    recorder = TraceWriter(record) if record else None
    with Session(plan, headers_path, recorder) as session:
        print(f"Tracing ({plan.backend} plan) while a {proto.upper()} client reaches "
              f"{', '.join(t.addr for t in targets)} on port {port}"
              f"{' (closed: nothing listens)' if closed else ''}...", file=err, flush=True)
        outcomes = {}
        for target in targets:
            outcomes[target.addr] = connect_from(ns, target.addr, port, proto)
            session.pump(20)
        time.sleep(0.2)                  # the last ACKs of each close
        result = session.finish()
    rows = []
    for target in targets:
        row = judge(target, outcomes[target.addr], result.flows, port)
        if outcomes[target.addr] != expected:
            row.ok, row.why = False, f"the client got {outcomes[target.addr]!r}, expected {expected!r}"
        rows.append(row)
    code, text = verdict(rows)
    if as_json:
        print(json_line({"type": "prove", "proto": proto, "port": port, "closed": closed,
                         "rows": [r.to_dict() for r in rows], "verdict": {"exit": code, "text": text},
                         "lost": result.losses.to_dict()}), file=out)
    else:
        print(render(rows, code, text, result.losses), file=out)
    return code


def experiment(prepare, *, sandbox: bool, own: list[str], controls: list[str], port: int, proto: str,
               closed: bool, record: str | None, as_json: bool) -> int:
    """Set the stage (sandbox namespaces or this host, listeners, targets), then run().
    prepare(filters) -> (plan, headers) does the checks a live trace needs."""
    with contextlib.ExitStack() as stack:
        if sandbox:
            sb = enter_sandbox(stack)
            ns, own, controls = sb.host, [sb.own_addr], [sb.peer_addr]
            if not closed:
                sb.serve(sb.peer, port)
        else:
            ns, own = None, host_addresses(own)
        if not closed:
            stack.callback(stop_process, start_listener(ns, [port], addresses=["127.0.0.1", *own]))
        table = local_table(ns)
        targets = [Target("127.0.0.1", LOOPBACK, *local_entry("127.0.0.1", table))]
        targets += [Target(a, OWN, *local_entry(a, table)) for a in own]
        targets += [Target(a, CONTROL) for a in controls]
        plan, headers = prepare(Filters(port=port, netns=netns.inode_of(ns)))
        return run(plan, headers, ns=ns, targets=targets, port=port, proto=proto, closed=closed,
                   record=record, as_json=as_json)
