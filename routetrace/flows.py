"""Flows: merge snapshots, classify destinations, and reach the verdict.

The verdict is evidence, not a constant: it compares the devices that loopback-range and
own-address flows were transmitted on, and shows any other flow leaving on its real device.
"""
from __future__ import annotations

import ipaddress
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

from .events import Flow, FlowKey, add_device_counts, device_of, devices_of, merge_into

LOOPBACK, OWN, OTHER = "loopback", "own-address", "other"


def classify(daddr: str, own_addresses: set[str]) -> str:
    """Which kind of destination: the loopback range wins over an own address (127.0.0.1 is both)."""
    if ipaddress.ip_address(daddr).is_loopback:
        return LOOPBACK
    return OWN if daddr in own_addresses else OTHER


class AggregateKey(NamedTuple):
    """What a folded flow is remembered by: (namespace, protocol, destination, route type,
    route device, transmit device by identity)."""
    netns: int
    family: int
    proto: str
    daddr: str
    route_type: str
    route_dev: str
    dev: str
    ifindex: int
    loopback: bool


@dataclass
class Aggregate:
    key: AggregateKey
    flows: int = 0
    packets: int = 0
    segments: int = 0
    bytes: int = 0
    fib_dev: str | None = None

    def to_dict(self) -> dict:
        return {"type": "aggregate", **self.key._asdict(), "flows": self.flows, "packets": self.packets,
                "segments": self.segments, "bytes": self.bytes, "fib_dev": self.fib_dev}

    @classmethod
    def from_dict(cls, d: dict) -> "Aggregate":
        key = AggregateKey(**{f: d[f] for f in AggregateKey._fields})
        return cls(key, d["flows"], d["packets"], d["segments"], d["bytes"], d.get("fib_dev"))


DEFAULT_KEEP_FLOWS = 20000


class RecentFolds:
    """The last `size` folded flows, for membership: each flow key's hash, with the aggregate
    its device's counts were folded into (or None). A dict and a ring of the same hashes: a few
    hundred thousand cost about 90 bytes each (the aggregate keys are the aggregates' own, shared)."""

    def __init__(self, size: int):
        self._ring = array("q", bytes(8 * size)) if size else array("q")
        self._next = 0
        self._filled = False
        self._members: dict[int, AggregateKey | None] = {}

    def add(self, h: int, aggregate: AggregateKey | None = None) -> None:
        if not self._ring:
            return
        if self._filled:
            self._members.pop(self._ring[self._next], None)
        self._ring[self._next] = h
        self._members[h] = aggregate
        self._next += 1
        if self._next == len(self._ring):
            self._next, self._filled = 0, True

    def aggregate(self, h: int) -> AggregateKey | None:
        return self._members.get(h)

    def __contains__(self, h: int) -> bool:
        return h in self._members

    def __len__(self) -> int:
        return len(self._members)


_new_tuple = tuple.__new__      # an AggregateKey from a tuple, without the namedtuple's Python-level __new__


class FlowTable:
    """The flows of a trace, by key, in a bounded table: past `limit` rows the least recently
    active flow is folded into an Aggregate (its counts are kept, its row is not). Live drains
    add counts (`add`); recordings replace snapshots (`update`); both fold the same way."""

    def __init__(self, limit: int | None = DEFAULT_KEEP_FLOWS, remember_folds: int = 0):
        """remember_folds: how many folded flows to recognise when the kernel reports them again
        (at least 4x the limit). A live session sizes it to what can arrive between a flow's
        notice and the drain of its entry (the maps' and the ring's capacity), so a flow folded
        meanwhile is not mistaken for a new one and streamed twice."""
        self.limit = limit
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        self.aggregates: dict[AggregateKey, Aggregate] = {}
        self.folded = 0                  # flows folded into aggregates
        self.seen = 0                    # flows ever in the table
        self.on_fold = None              # callback(flow): the recorder writes it down
        # Keys of recently folded flows (hashes, a few times the limit): a folded flow that
        # sends again adds to its aggregate instead of coming back as a new row.
        self._recent_folds = RecentFolds(max(4 * limit, remember_folds) if limit else 0)
        self._changed_aggregates: set[AggregateKey] = set()   # since take_changed_aggregates()

    def update(self, flow: Flow) -> bool:
        """Store a snapshot; True when the flow is new. Counters never go backwards."""
        key = flow.key
        flows = self._flows
        old = flows.get(key)
        if old is not None and flow.packets < old.packets:
            return False
        flows[key] = flow
        if old is None:
            self.seen += 1
            if self.limit is not None and len(flows) > self.limit:
                self._fold_overflow()
            return True
        flows.move_to_end(key)
        return False

    def notice(self, flow: Flow) -> bool:
        """A new-flow notice: True (stream it) when the flow was not known yet."""
        key = flow.key
        if key in self._flows or (self.folded and hash(key) in self._recent_folds):
            return False
        return self.update(flow)

    def add_counts(self, key: FlowKey, ifindex: int, counts: tuple[int, int, int, int], now_ns: int) -> bool:
        """The fast path of a drain: counts for a device the flow already has. False when the
        flow or the device is new to the table (then `add` with the decoded entry)."""
        flow = self._flows.get(key)
        dev = device_of(flow, ifindex) if flow is not None else None
        if dev is None:
            return False
        add_device_counts(flow, dev, *counts, now_ns)
        if counts[0]:
            self._flows.move_to_end(key)
        return True

    def add_folded_counts(self, key: FlowKey, ifindex: int, counts: tuple[int, int, int, int]) -> bool:
        """The drain's fast path for a flow folded before its counts came (in a storm, most
        flows: the table passes its limit before the next drain): the counts go to the
        aggregate its device was folded into, with nothing decoded. False when the flow is not
        remembered with that device (then `add` with the decoded entry). The route is the one
        the flow was folded with, as for a flow still in the table (merge_into keeps its first
        route): a later epoch's entry that reports another route adds to the same aggregate."""
        aggregate_key = self._recent_folds.aggregate(hash(key)) if self.folded else None
        # The same device, namespace, protocol and destination: a flow whose key merely hashes
        # alike goes the decoded way, never into another destination's aggregate.
        if (aggregate_key is None or aggregate_key[7] != ifindex or aggregate_key[0] != key[0]
                or aggregate_key[2] != key[1] or aggregate_key[3] != key[4]):
            return False
        agg = self.aggregates.get(aggregate_key)
        if agg is None:
            return False
        packets, nbytes, segments, _fragments = counts
        agg.packets += packets
        agg.segments += segments
        agg.bytes += nbytes
        self._changed_aggregates.add(aggregate_key)
        return True

    def add(self, part: Flow, continued: bool, now_ns: int) -> Flow | None:
        """Counts of one drained (flow, device) entry. Returns the flow when it is new to the
        table (its notice was late or lost: stream it now). A continued entry whose flow was
        folded adds to its aggregate, not as a new flow."""
        key = part.key
        flow = self._flows.get(key)
        if flow is not None:
            merge_into(flow, part, now_ns)
            if part.packets:
                self._flows.move_to_end(key)
            return None
        if self.folded and (continued or hash(key) in self._recent_folds):
            self._fold_counts(part, new_flow=False)
            return None
        part.last_ns = max(part.last_ns, now_ns) if part.packets else part.last_ns
        self.update(part)
        return part

    def _fold_overflow(self) -> None:
        while self.limit is not None and len(self._flows) > self.limit:
            key, flow = self._flows.popitem(last=False)
            first = self._fold_counts(flow, new_flow=True)
            self.folded += 1
            # Counts drained later for its device go straight to that aggregate -- unless the
            # flow had no route yet (a later entry may bring one: `add` decodes it).
            self._recent_folds.add(hash(key), first if flow.route_type is not None else None)
            if self.on_fold:
                self.on_fold(flow)

    def _fold_counts(self, flow: Flow, new_flow: bool) -> AggregateKey | None:
        """Add the flow's counts to the aggregates of its devices; the first device's aggregate
        key, or None when the flow has more than one device or none."""
        devices = devices_of(flow)
        for dev in devices or [{"ifindex": 0, "name": "", "loopback": False, "packets": 0,
                                "segments": 0, "bytes": 0}]:
            key = _new_tuple(AggregateKey, (flow.netns, flow.family, flow.proto, flow.daddr, flow.route_type or "-",
                                            flow.route_dev or "-", dev["name"], dev["ifindex"] or 0,
                                            bool(dev["loopback"])))
            agg = self.aggregates.get(key)
            if agg is None:
                agg = self.aggregates[key] = Aggregate(key, fib_dev=flow.fib_dev)
            self._changed_aggregates.add(key)
            agg.flows += 1 if new_flow else 0
            agg.packets += dev["packets"]
            agg.segments += dev["segments"]
            agg.bytes += dev["bytes"]
        # The aggregate's own key: remembered folds share it instead of keeping a copy each.
        return agg.key if len(devices) == 1 else None

    def take_changed_aggregates(self) -> list[Aggregate]:
        """Aggregates changed since the last call (the recorder writes them down)."""
        changed = [self.aggregates[k] for k in self._changed_aggregates]
        self._changed_aggregates.clear()
        return changed

    def set_aggregate(self, agg: Aggregate) -> None:
        self.aggregates[agg.key] = agg

    def drop(self, key: FlowKey) -> None:
        """A recorded fold: the live table let this flow go (its aggregate records follow)."""
        if self._flows.pop(key, None) is not None:
            self.folded += 1

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def __iter__(self):
        return iter(sorted(self._flows.values(), key=lambda f: (f.first_ns, f.key)))

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def packets(self) -> int:
        return sum(f.packets for f in self._flows.values()) + sum(a.packets for a in self.aggregates.values())


# RT_TABLE_MAIN and RT_TABLE_LOCAL (include/uapi/linux/rtnetlink.h): without policy rules the
# kernel merges them and reports main (254) for local routes too; any other table was chosen by
# a rule (ip rule, the l3mdev rule of a VRF).
MAIN_TABLES = frozenset({254, 255})


class RouteKey(NamedTuple):
    """One route the kernel gave a destination's packets: sockets with different options can
    get different routes to one address."""
    route_type: str | None
    route_dev: str | None
    route_loopback: bool | None     # IFF_LOOPBACK of the route's device; None: not recorded


@dataclass
class RouteSeen:
    """The evidence for one route: the FIB's answers and where its packets were transmitted."""
    fib_devs: set[str] = field(default_factory=set)
    fib_tables: set[int] = field(default_factory=set)
    xmit_devs: dict[str, int] = field(default_factory=dict)
    other_devs: set[str] = field(default_factory=set)      # transmit devices without IFF_LOOPBACK


@dataclass
class DestinationSummary:
    daddr: str
    kind: str
    route_types: set[str] = field(default_factory=set)
    route_devs: set[str] = field(default_factory=set)
    fib_devs: set[str] = field(default_factory=set)
    xmit_devs: dict[str, int] = field(default_factory=dict)     # by name, for display
    loopback_packets: int = 0           # decided by IFF_LOOPBACK, not by a device's name
    other_packets: int = 0
    other_devs: set[str] = field(default_factory=set)
    routes: dict[RouteKey, RouteSeen] = field(default_factory=dict)

    def _count(self, route: RouteSeen, name: str, loopback: bool, packets: int) -> None:
        self.xmit_devs[name] = self.xmit_devs.get(name, 0) + packets
        route.xmit_devs[name] = route.xmit_devs.get(name, 0) + packets
        if loopback:
            self.loopback_packets += packets
        else:
            self.other_packets += packets
            self.other_devs.add(name)
            if packets:
                route.other_devs.add(name)

    def _route(self, route_type: str | None, route_dev: str | None, loopback: bool | None,
               fib_dev: str | None, fib_table: int | None) -> RouteSeen:
        if route_type:
            self.route_types.add(route_type)
        if route_dev:
            self.route_devs.add(route_dev)
        if fib_dev:
            self.fib_devs.add(fib_dev)
        seen = self.routes.setdefault(RouteKey(route_type, route_dev, loopback), RouteSeen())
        if fib_dev:
            seen.fib_devs.add(fib_dev)
        if fib_table is not None:
            seen.fib_tables.add(fib_table)
        return seen

    def add(self, flow: Flow) -> None:
        route = self._route(flow.route_type, flow.route_dev, flow.route_loopback, flow.fib_dev, flow.fib_table)
        for dev in devices_of(flow):
            self._count(route, dev["name"], bool(dev["loopback"]), dev["packets"])

    def add_aggregate(self, agg: "Aggregate") -> None:
        k = agg.key
        route = self._route(None if k.route_type == "-" else k.route_type,
                            None if k.route_dev == "-" else k.route_dev, None, agg.fib_dev, None)
        self._count(route, k.dev, k.loopback, agg.packets)

    @property
    def only_loopback(self) -> bool:
        return self.loopback_packets > 0 and self.other_packets == 0

    @property
    def explanation(self) -> str:
        return explain(self)


def _sent_on(xmit_devs: dict[str, int]) -> str:
    return " ".join(f"{dev}:{n}" for dev, n in sorted(xmit_devs.items())) or "no device"


def _on_loopback(key: RouteKey) -> bool:
    # Recordings made before device identity carry no flag: then the name is all there is.
    return key.route_loopback if key.route_loopback is not None else key.route_dev == "lo"


def explain_route(daddr: str, kind: str, key: RouteKey, seen: RouteSeen) -> str:
    """The kernel's behaviour for one route to daddr, and why, from the evidence alone: the route
    type and device the packets carried, the FIB's answer (device, table) and the transmit devices.
    The reasons are the kernel's code paths (README: "When own-address traffic does not take lo")."""
    sent = f"sent on {_sent_on(seen.xmit_devs)}"
    fib = "/".join(sorted(seen.fib_devs)) or "?"
    tables = sorted(seen.fib_tables - MAIN_TABLES)
    if key.route_type is None:
        return f"{sent}; no route was seen on these packets (sent without a socket's route)"
    if key.route_type == "LOCAL" and _on_loopback(key):
        if kind == LOOPBACK:
            why = (f"{'::1' if ':' in daddr else '127.0.0.0/8'} is a local route, and the kernel outputs local "
                   f"routes through the loopback device")
        elif kind == OWN:
            why = (f"an address of this namespace (the local table names {fib}); the kernel outputs local "
                   f"routes through the loopback device, not the device that holds the address")
        else:
            why = ("no interface holds this address, but a local route covers it (AnyIP: ip route add local "
                   "PREFIX dev lo); the kernel outputs local routes through the loopback device")
        if seen.other_devs:
            # Not what the kernel does: the trace and the route disagree, and the reader must know.
            return (f"LOCAL route on {key.route_dev}, yet {sent}: a LOCAL route's packets go through the loopback "
                    f"device, so {'/'.join(sorted(seen.other_devs))} contradicts it")
        return f"LOCAL route on {key.route_dev}: {why}; {sent}"
    if key.route_type == "LOCAL":
        return (f"LOCAL route on {key.route_dev}, not the loopback device: {key.route_dev} is the VRF (L3 master) "
                f"of the device that holds the address, and stands in for lo in its VRF; {sent}")
    route = f"{key.route_type} route via {key.route_dev or fib}"
    if tables:
        names = "/".join(str(t) for t in tables)
        why = f"a policy rule (ip rule, e.g. a fwmark) chose table {names}, which routes it via {fib}"
        if kind in (LOOPBACK, OWN):
            why += ", so the local table never answered for this own address"
        return f"{route}: {why}; {sent}"
    if kind in (LOOPBACK, OWN):
        return (f"{route}, not LOCAL: the lookup was tied to {fib} (a socket bound with SO_BINDTODEVICE, or an "
                f"oif), so the local route on another device did not match and the own address is routed "
                f"out like a remote one; {sent}")
    return f"{route}: not an address of this namespace, so it leaves on its route's device; {sent}"


def explain(d: DestinationSummary) -> str:
    """Every route a destination's packets took, explained (one clause per route)."""
    if d.loopback_packets + d.other_packets == 0:
        return "no packets were seen for this destination"
    return "; and ".join(explain_route(d.daddr, d.kind, key, seen) for key, seen in
                         sorted(d.routes.items(), key=lambda kv: tuple(str(x) for x in kv[0])) if
                         sum(seen.xmit_devs.values()) or len(d.routes) == 1)


@dataclass
class Verdict:
    holds: bool | None              # None: not enough evidence (a class of flow was not seen)
    text: str
    destinations: list[DestinationSummary]


def verdict(flows: Iterable[Flow], own_addresses: Callable[[int], set[str]],
            aggregates: Iterable[Aggregate] = ()) -> Verdict:
    """Did 127.0.0.1 flows and own-address flows leave on the same (loopback) device? The
    device is judged by its IFF_LOOPBACK flag: a namespace can rename lo, or call a veth "lo"."""
    dests: dict[tuple[str, str], DestinationSummary] = {}
    for flow in flows:
        kind = classify(flow.daddr, own_addresses(flow.netns))
        dests.setdefault((kind, flow.daddr), DestinationSummary(flow.daddr, kind)).add(flow)
    for agg in aggregates:
        kind = classify(agg.key.daddr, own_addresses(agg.key.netns))
        dests.setdefault((kind, agg.key.daddr), DestinationSummary(agg.key.daddr, kind)).add_aggregate(agg)
    ordered = sorted(dests.values(), key=lambda d: ([LOOPBACK, OWN, OTHER].index(d.kind),
                                                    ipaddress.ip_address(d.daddr).version,
                                                    ipaddress.ip_address(d.daddr).packed))
    loop = [d for d in ordered if d.kind == LOOPBACK]
    own = [d for d in ordered if d.kind == OWN]
    wrong = [d for d in loop + own if not d.only_loopback]
    if wrong:
        names = "; ".join(f"{d.daddr} ({d.kind}) sent on {_sent_on(d.xmit_devs)}" +
                          (f" (not loopback: {'/'.join(sorted(d.other_devs))})" if d.other_devs else "") +
                          f" [{d.explanation}]" for d in wrong)
        return Verdict(False, f"NOT the same path: {names}", ordered)
    if loop and own:
        devs = sorted({dev for d in loop + own for dev, n in d.xmit_devs.items() if n})
        return Verdict(True, f"same path: 127.0.0.1-range and own-address flows both left on "
                             f"{'/'.join(devs)} (the loopback device)", ordered)
    missing = "loopback-range" if not loop else "own-address"
    if not loop and not own:
        missing = "loopback-range or own-address"
    return Verdict(None, f"no verdict: no {missing} flow was seen", ordered)
