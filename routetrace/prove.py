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
from .flows import LOOPBACK, OWN, DestinationSummary
from .probes import Filters
from .record import TraceWriter
from .render import devices, json_line, losses_line
from .sanitize import text as safe_text
from .scenarios import Prediction, predict
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
    prediction: Prediction | None = None     # what `ip route get` said before the traffic ran

    @property
    def prediction_agrees(self) -> bool | None:
        """Whether the kernel's route per packet is the one ip route get predicted."""
        if self.prediction is None or not self.route_types:
            return None
        return self.route_types == [self.prediction.route_type] and self.route_devs == [self.prediction.dev]

    def to_dict(self) -> dict:
        return {"daddr": self.target.addr, "kind": self.target.kind, "local_entry": self.target.local_entry,
                "client": self.outcome, "fib_devs": self.fib_devs, "route_types": self.route_types,
                "route_devs": self.route_devs, "xmit_devs": self.xmit_devs,
                "prediction": self.prediction.to_dict() if self.prediction else None,
                "prediction_agrees": self.prediction_agrees, "ok": self.ok, "why": self.why}


def local_table(ns: str | None) -> list[dict]:
    """The local routing table of both families: every own address is a `local` route there."""
    routes = []
    for family in ("-4", "-6"):
        args = ["ip", "-j", family, *(["-n", ns] if ns else []), "route", "show", "table", "local"]
        out = subprocess.run(args, capture_output=True, text=True, check=False)
        routes += json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []
    return routes


def local_entry(addr: str, table: list[dict]) -> tuple[str | None, str | None]:
    """The local table's entry covering addr, most specific first: ("local 10.1.2.3 dev eth0", "eth0")."""
    ip = ipaddress.ip_address(addr)
    best = None
    for route in table:
        if route.get("type") != "local":
            continue
        dst = route["dst"]
        net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/{ipaddress.ip_address(dst).max_prefixlen}",
                                   strict=False)
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, route)
    if best is None:
        return None, None
    route = best[1]
    return f"local {route['dst']} dev {route['dev']}", route["dev"]


def judge(target: Target, outcome: str, flows: list[Flow], port: int,
          prediction: Prediction | None = None) -> ProveRow:
    """One destination's row: both directions of its connection, as the kernel sent them, judged
    by device identity (IFF_LOOPBACK) and explained by the verdict engine (flows.DestinationSummary),
    as watch's verdict is."""
    mine = [f for f in flows if (f.daddr == target.addr and f.dport == port)
            or (f.saddr == target.addr and f.sport == port)]
    seen = DestinationSummary(target.addr, target.kind)
    for f in mine:
        seen.add(f)
    row = ProveRow(target, outcome, prediction=prediction)
    row.fib_devs = sorted({f.fib_dev for f in mine if f.fib_dev and f.daddr == target.addr})
    row.route_types = sorted(seen.route_types)
    row.route_devs = sorted(seen.route_devs)
    row.xmit_devs = dict(seen.xmit_devs)
    route_on_loopback = all(f.route_loopback if f.route_loopback is not None else f.route_dev == "lo"
                            for f in mine if f.route_type)
    off_lo = sorted(dev for dev, n in seen.xmit_devs.items() if n and dev in seen.other_devs)
    explanation = seen.explanation
    if seen.loopback_packets + seen.other_packets == 0:
        row.ok, row.why = False, explanation
    elif target.kind == CONTROL:
        if off_lo and "LOCAL" not in row.route_types:
            row.ok, row.why = True, explanation
        else:
            row.ok, row.why = False, f"the control stayed on lo, so the trace cannot tell local from non-local: {explanation}"
    elif off_lo:
        row.ok, row.why = False, (f"{seen.other_packets} packets left on {'/'.join(off_lo)}, not the loopback "
                                  f"device: {explanation}")
    elif row.route_types != ["LOCAL"] or not route_on_loopback:
        row.ok, row.why = False, (f"route type {'/'.join(row.route_types) or '?'} on "
                                  f"{'/'.join(row.route_devs) or '?'}, not LOCAL on the loopback device: {explanation}")
    else:
        row.ok, row.why = True, explanation
    return row


def verdict(rows: list[ProveRow]) -> tuple[int, str]:
    """Exit code and the sentence that goes with it."""
    bad = [r for r in rows if not r.ok]
    if bad:
        return 1, "the claim did NOT hold: " + "; ".join(f"{r.target.addr} ({r.target.kind}): {r.why}" for r in bad)
    kinds = {r.target.kind for r in rows}
    if LOOPBACK not in kinds or OWN not in kinds:
        return 1, "the claim was not tested: need both a 127.0.0.1 and an own-address destination"
    families = sorted({"IPv6" if ":" in r.target.addr else "IPv4" for r in rows})
    text = ("the claim holds: loopback-range (127.0.0.1" + (", ::1" if "IPv6" in families else "") +
            ") and own-address traffic both took a LOCAL route and left on lo "
            f"(nothing on the interface that holds the address; {' and '.join(families)})")
    if CONTROL in kinds:
        text += "; the non-local control left on its real device"
    else:
        text += "; no non-local control was available (give one with --control)"
    return 0, text


def _predicted(row: ProveRow) -> str:
    if row.prediction is None:
        return "-"
    said = f"{row.prediction.route_type} {row.prediction.dev}" if not row.prediction.error else row.prediction.describe()
    return safe_text(said + (" (differs)" if row.prediction_agrees is False else ""))


def render(rows: list[ProveRow], code: int, text: str, losses) -> str:
    table = []
    for r in rows:
        devs = dict(r.xmit_devs)
        for dev in filter(None, (r.target.owner_dev, "lo")):
            devs.setdefault(dev, 0)           # the zero is the evidence: show it
        table.append((r.target.addr, r.target.kind, safe_text(r.target.local_entry or "-"),
                      safe_text("/".join(r.fib_devs) or "-"), _predicted(r), "/".join(r.route_types) or "-",
                      safe_text("/".join(r.route_devs) or "-"), devices(devs),
                      safe_text(("ok: " if r.ok else "FAILED: ") + r.why)))
    body = tabulate(table, headers=("DESTINATION", "KIND", "LOCAL TABLE", "FIB SAYS", "IP ROUTE GET", "ROUTE TYPE",
                                    "ROUTE DEV", "PACKETS BY XMIT DEV", "RESULT"))
    return f"{body}\n\nverdict: {text}\n{losses_line(losses)}"


def run(plan, headers_path, *, ns: str | None, targets: list[Target], port: int, proto: str = "tcp",
        closed: bool = False, record: str | None = None, as_json: bool = False, force: bool = False,
        out=None, err=None) -> int:
    """Trace while a client reaches each target; print the rows and the verdict; return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    expected = "refused" if closed else "ok"
    # Asked before the traffic: the kernel's answer for a plain socket, beside what it then did.
    predictions = {t.addr: predict(ns, t.addr) for t in targets}
    recorder = TraceWriter(record, force=force) if record else None
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
        row = judge(target, outcomes[target.addr], result.flows, port, predictions[target.addr])
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
               closed: bool, record: str | None, as_json: bool, force: bool = False) -> int:
    """Set the stage (sandbox namespaces or this host, listeners, targets), then run().
    prepare(filters) -> (plan, headers) does the checks a live trace needs."""
    with contextlib.ExitStack() as stack:
        if sandbox:
            sb = enter_sandbox(stack)
            ns, own, controls = sb.host, [sb.own_addr, sb.own_addr6], [sb.peer_addr, sb.peer_addr6]
            if not closed:
                sb.serve(sb.peer, port, addresses=controls)
        else:
            ns, own = None, host_addresses(own)
        loopbacks = ["127.0.0.1"] + (["::1"] if sandbox or any(":" in a for a in own) else [])
        if not closed:
            stack.callback(stop_process, start_listener(ns, [port], addresses=[*loopbacks, *own]))
        table = local_table(ns)
        targets = [Target(a, LOOPBACK, *local_entry(a, table)) for a in loopbacks]
        targets += [Target(a, OWN, *local_entry(a, table)) for a in own]
        targets += [Target(a, CONTROL) for a in controls]
        plan, headers = prepare(Filters(port=port, netns=netns.inode_of(ns)))
        return run(plan, headers, ns=ns, targets=targets, port=port, proto=proto, closed=closed,
                   record=record, as_json=as_json, force=force)
