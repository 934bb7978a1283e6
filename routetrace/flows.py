"""Flows: merge snapshots, classify destinations, and reach the verdict.

The verdict is evidence, not a constant: it compares the devices that loopback-range and
own-address flows were transmitted on, and shows any other flow leaving on its real device.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .events import Flow, FlowKey

LOOPBACK, OWN, OTHER = "loopback", "own-address", "other"


def classify(daddr: str, own_addresses: set[str]) -> str:
    """Which kind of destination: the loopback range wins over an own address (127.0.0.1 is both)."""
    if ipaddress.ip_address(daddr).is_loopback:
        return LOOPBACK
    return OWN if daddr in own_addresses else OTHER


class FlowTable:
    """Latest snapshot of every flow, by key. Later snapshots of a flow replace earlier ones,
    except that counters never go backwards (an evicted-and-recreated map entry restarts at 0)."""

    def __init__(self):
        self._flows: dict[FlowKey, Flow] = {}

    def update(self, flow: Flow) -> bool:
        """Store a snapshot; True when the flow is new."""
        old = self._flows.get(flow.key)
        if old is not None and flow.packets < old.packets:
            return False
        self._flows[flow.key] = flow
        return old is None

    def __iter__(self):
        return iter(sorted(self._flows.values(), key=lambda f: (f.first_ns, f.key)))

    def __len__(self) -> int:
        return len(self._flows)


def is_loopback_device(dev: str) -> bool:
    return dev == "lo"


@dataclass
class DestinationSummary:
    daddr: str
    kind: str
    route_types: set[str] = field(default_factory=set)
    route_devs: set[str] = field(default_factory=set)
    fib_devs: set[str] = field(default_factory=set)
    xmit_devs: dict[str, int] = field(default_factory=dict)

    def add(self, flow: Flow) -> None:
        if flow.route_type:
            self.route_types.add(flow.route_type)
        if flow.route_dev:
            self.route_devs.add(flow.route_dev)
        if flow.fib_dev:
            self.fib_devs.add(flow.fib_dev)
        for dev, n in flow.xmit_devs.items():
            self.xmit_devs[dev] = self.xmit_devs.get(dev, 0) + n

    @property
    def only_loopback(self) -> bool:
        return bool(self.xmit_devs) and all(is_loopback_device(d) for d in self.xmit_devs)


@dataclass
class Verdict:
    holds: bool | None              # None: not enough evidence (a class of flow was not seen)
    text: str
    destinations: list[DestinationSummary]


def verdict(flows: Iterable[Flow], own_addresses: Callable[[int], set[str]]) -> Verdict:
    """Did 127.0.0.1 flows and own-address flows leave on the same (loopback) device?"""
    dests: dict[tuple[str, str], DestinationSummary] = {}
    for flow in flows:
        kind = classify(flow.daddr, own_addresses(flow.netns))
        dests.setdefault((kind, flow.daddr), DestinationSummary(flow.daddr, kind)).add(flow)
    ordered = sorted(dests.values(), key=lambda d: ([LOOPBACK, OWN, OTHER].index(d.kind),
                                                    ipaddress.ip_address(d.daddr)))
    loop = [d for d in ordered if d.kind == LOOPBACK]
    own = [d for d in ordered if d.kind == OWN]
    wrong = [d for d in loop + own if not d.only_loopback]
    if wrong:
        names = "; ".join(f"{d.daddr} ({d.kind}) sent on " +
                          (" ".join(f"{dev}:{n}" for dev, n in sorted(d.xmit_devs.items())) or "no device")
                          for d in wrong)
        return Verdict(False, f"NOT the same path: {names}", ordered)
    if loop and own:
        devs = sorted({dev for d in loop + own for dev in d.xmit_devs})
        return Verdict(True, f"same path: 127.0.0.1-range and own-address flows both left on {'/'.join(devs)}",
                       ordered)
    missing = "loopback-range" if not loop else "own-address"
    if not loop and not own:
        missing = "loopback-range or own-address"
    return Verdict(None, f"no verdict: no {missing} flow was seen", ordered)
