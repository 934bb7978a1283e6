"""Typed records: what the kernel aggregated for one flow, in one schema for live, recorded
and replayed data. Decoding from the BPF maps' structs happens here, once."""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

from .sanitize import kernel_string

PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}

# include/uapi/linux/rtnetlink.h
ROUTE_TYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST",
               "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")


def route_type_name(value: int) -> str:
    return ROUTE_TYPES[value] if 0 <= value < len(ROUTE_TYPES) else f"TYPE{value}"


def ipv4(be_u32: int) -> str:
    """An address as the BPF code stored it: network byte order in a native u32."""
    return str(ipaddress.IPv4Address(struct.pack("=I", be_u32)))




class FlowKey(NamedTuple):
    """A flow's identity (a tuple: cheap to build and hash, a storm builds many)."""
    netns: int
    proto: str
    saddr: str
    sport: int
    daddr: str
    dport: int


@dataclass
class Flow:
    """One direction of one connection (or datagram stream), as the kernel saw it.

    Fields after `backend` were added in format 1.1 (IPv6, device identity, exact accounting);
    a reader fills their defaults for older recordings."""
    proto: str
    saddr: str                      # RFC 5952 text for IPv6
    sport: int
    daddr: str
    dport: int
    netns: int
    pid: int
    comm: str
    route_type: str | None          # rt_type of the route the packets carried, e.g. LOCAL
    route_dev: str | None           # that route's dst.dev
    fib_dev: str | None             # the FIB's nexthop device for daddr
    fib_table: int | None
    xmit_devs: dict[str, int] = field(default_factory=dict)   # device name -> packets (names may repeat: see devices)
    packets: int = 0                # skbs handed to a device (what the devices' tx_packets count)
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    backend: str = "tracepoint"
    family: int = 4                 # 4 or 6
    segments: int = 0               # packets as the wire sees them: GSO segments of those skbs
    route_src: str | None = None    # where the route came from: "packet", "socket" or "lookup"
    route_ifindex: int | None = None
    route_loopback: bool | None = None   # the route device has IFF_LOOPBACK (identity, not the name "lo")
    fib_ifindex: int | None = None
    # Per transmit device, by identity: [{"ifindex", "name", "loopback", "packets", "segments", "bytes"}]
    devices: list[dict] = field(default_factory=list)
    fragments: int = 0              # non-first IPv4/IPv6 fragments counted to this flow (in packets too)
    # Fields a newer routetrace wrote that this one does not know: kept and written back as they
    # were, so an older reader passes a newer minor format through unchanged.
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> FlowKey:
        # Computed once: the identifying fields never change after a flow is made.
        key = self.__dict__.get("_key")
        if key is None:
            key = self.__dict__["_key"] = FlowKey(self.netns, self.proto, self.saddr, self.sport, self.daddr,
                                                  self.dport)
        return key

    def to_dict(self) -> dict:
        # From the instance's own dict rather than asdict(), which deep-copies field by field:
        # a storm streams hundreds of thousands of these. (A dataclass's __dict__ holds its
        # fields in declaration order, then the cached key.)
        out = self.shallow_dict()
        out["xmit_devs"] = dict(self.xmit_devs)
        out["devices"] = [dict(d) for d in self.devices]
        return out

    def shallow_dict(self) -> dict:
        """to_dict without copying the nested device dicts: for a view made and dropped at once."""
        out = {"type": "flow", **self.__dict__}
        out.pop("_key", None)
        extra = out.pop("extra")
        for k, v in extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def field_types(cls) -> dict[str, str]:
        return {f.name: f.type for f in fields(cls) if f.name != "extra"}


# struct flow_key / flow_value / new_flow_event in bpf/common.c, decoded with struct (not ctypes
# objects): a drain can return tens of thousands of entries.
KEY_STRUCT = struct.Struct("=II16s16sHHBBH")
VALUE_STRUCT = struct.Struct("=QQQQQIIIIHBBI16s16s16s16s")
ROUTE_SOURCES = {0: None, 1: "packet", 2: "socket", 3: "lookup"}
FLOW_HAS_FIB, FLOW_ROUTE_LOOPBACK, FLOW_DEV_LOOPBACK, FLOW_V4_MAPPED_SOCKET, FLOW_CONTINUED = 1, 2, 4, 8, 16
PROTOCOLS_BY_FAMILY = {**PROTOCOLS, socket.IPPROTO_ICMPV6: "icmp6"}




def address(family: int, raw: bytes) -> str:
    """An address as the BPF key holds it (16 bytes, IPv4 in the first 4), in RFC 5952 form
    (inet_ntop: the same text as ipaddress, several times faster in a storm)."""
    return socket.inet_ntop(socket.AF_INET, raw[:4]) if family == 4 else socket.inet_ntop(socket.AF_INET6, raw)


def decode_entry(key: bytes, value: bytes, backend: str) -> tuple[Flow, bool]:
    """One kernel entry (a flow on one transmit device) as a Flow with one device, and whether
    the kernel marked it as continuing from the previous epoch."""
    return decode_fields(KEY_STRUCT.unpack(key), VALUE_STRUCT.unpack(value), backend)


def decode_fields(key: tuple, value: tuple, backend: str, flow_key: FlowKey | None = None) -> tuple[Flow, bool]:
    """decode_entry, from the structs already unpacked (KEY_STRUCT, VALUE_STRUCT); flow_key
    when the caller has it already (flow_key_of)."""
    netns, ifindex, saddr, daddr, sport, dport, proto, family, _ = key
    (packets, nbytes, segments, fragments, first_ns, pid, fib_table, route_ifindex, fib_ifindex,
     route_type, route_src, flags, _, comm, dev, route_dev, fib_dev) = value
    if flow_key is None:
        flow_key = FlowKey(netns, PROTOCOLS_BY_FAMILY.get(proto, str(proto)), address(family, saddr), sport,
                           address(family, daddr), dport)
    has_route = route_src != 0
    has_fib = flags & FLOW_HAS_FIB
    dev_name = kernel_string(dev)
    # The instance's dict built directly, in field order: the same object Flow(...) makes,
    # without a 27-argument __init__ per flow (the hot path of a storm).
    flow = object.__new__(Flow)
    flow.__dict__ = {
        "proto": flow_key.proto, "saddr": flow_key.saddr, "sport": sport,
        "daddr": flow_key.daddr, "dport": dport, "netns": netns, "pid": pid, "comm": kernel_string(comm),
        "route_type": route_type_name(route_type) if has_route else None,
        "route_dev": (kernel_string(route_dev) or None) if has_route else None,
        "fib_dev": (kernel_string(fib_dev) or None) if has_fib else None,
        "fib_table": fib_table if has_fib else None,
        "xmit_devs": {dev_name: packets},       # a notice carries the device, with no counts yet
        "packets": packets, "bytes": nbytes, "first_ns": first_ns, "last_ns": first_ns, "backend": backend,
        "family": family, "segments": segments, "route_src": ROUTE_SOURCES.get(route_src),
        "route_ifindex": route_ifindex if has_route else None,
        "route_loopback": bool(flags & FLOW_ROUTE_LOOPBACK) if has_route else None,
        "fib_ifindex": fib_ifindex if has_fib else None,
        "devices": [{"ifindex": ifindex, "name": dev_name, "loopback": bool(flags & FLOW_DEV_LOOPBACK),
                     "packets": packets, "segments": segments, "bytes": nbytes}],
        "fragments": fragments,
        "extra": {"v4_mapped_socket": True} if flags & FLOW_V4_MAPPED_SOCKET else {},
        "_key": flow_key,
    }
    return flow, bool(flags & FLOW_CONTINUED)


COUNTS_STRUCT = struct.Struct("=QQQQ")     # the first four members of struct flow_value


def flow_key_of(key: tuple) -> FlowKey:
    """Just the identity of an unpacked kernel key (KEY_STRUCT): cheaper than decode_fields for
    the common case of a flow already known."""
    netns, _ifindex, saddr, daddr, sport, dport, proto, family, _ = key
    return FlowKey(netns, PROTOCOLS_BY_FAMILY.get(proto, str(proto)), address(family, saddr), sport,
                   address(family, daddr), dport)


def device_of(flow: Flow, ifindex: int) -> dict | None:
    """The flow's entry for the transmit device with this ifindex (identity, never the name)."""
    for dev in flow.devices:
        if dev["ifindex"] == ifindex:
            return dev
    return None


def add_device_counts(flow: Flow, dev: dict, packets: int, nbytes: int, segments: int, fragments: int,
                      now_ns: int | None = None) -> None:
    """Counts drained for one of the flow's devices, added to that device and to the flow."""
    dev["packets"] += packets
    dev["bytes"] += nbytes
    dev["segments"] += segments
    flow.packets += packets
    flow.bytes += nbytes
    flow.segments += segments
    flow.fragments += fragments
    flow.xmit_devs[dev["name"]] = flow.xmit_devs.get(dev["name"], 0) + packets
    if packets and now_ns is not None:
        flow.last_ns = max(flow.last_ns, now_ns)


def merge_into(flow: Flow, part: Flow, now_ns: int | None = None) -> None:
    """Add a drained entry's counts to the flow it belongs to. Devices are told apart by
    ifindex, never by name: a renamed device stays one, two that held one name stay two."""
    for d in part.devices:                 # one: a kernel entry is a (flow, device)
        mine = device_of(flow, d["ifindex"])
        if mine is None:
            mine = {**d, "packets": 0, "segments": 0, "bytes": 0}
            flow.devices.append(mine)
        add_device_counts(flow, mine, d["packets"], d["bytes"], d["segments"], 0, now_ns)
    flow.fragments += part.fragments
    if flow.route_type is None and part.route_type is not None:
        for name in ("route_type", "route_dev", "route_src", "route_ifindex", "route_loopback"):
            setattr(flow, name, getattr(part, name))
    if flow.fib_dev is None and part.fib_dev is not None:
        flow.fib_dev, flow.fib_table, flow.fib_ifindex = part.fib_dev, part.fib_table, part.fib_ifindex


def devices_of(flow: Flow) -> list[dict]:
    """The flow's devices by identity; a recording from before format 1.1 has names only, and
    there the loopback device is the one named "lo" (the best such a file can tell)."""
    if flow.devices:
        return flow.devices
    return [{"ifindex": None, "name": name, "loopback": name == "lo", "packets": n, "segments": n, "bytes": 0}
            for name, n in flow.xmit_devs.items()]


@dataclass(frozen=True)
class LossCounters:
    """Everything the tracer knows it did not see, each kind on its own; shown live, in every
    summary, in --json and in recordings. "lost: nothing" is a measured statement."""
    events_dropped: int = 0      # new-flow notices the ring buffer had no room for: streamed late, not lost
    flow_map_full: int = 0       # packets not counted: the flow map was full
    xmit_map_full: int = 0       # (format 1.0: per-device map full; no longer exists, always 0)
    probes_missed: int = 0       # route-function answers missed (kretprobe maxactive, recursion)
    xmit_missed: int = 0         # packets the transmit probe missed (kprobe nmissed, BPF recursion)
    fib_missed: int = 0          # FIB lookups missed (BPF recursion)
    flow_map_full_bytes: int = 0
    undecoded: int = 0           # packets of families/protocols routetrace does not decode (counted, not lost)
    # kprobe plan: route lookups whose entry and return could not be paired (a return with no entry
    # in its frame, or an entry whose return never came): their answers are dropped, not guessed
    route_unpaired: int = 0

    @property
    def packets_lost(self) -> int:
        return self.flow_map_full + self.xmit_map_full + self.xmit_missed

    @property
    def total(self) -> int:
        """Everything missed; undecoded packets are counted, so they are not in it."""
        return self.packets_lost + self.events_dropped + self.probes_missed + self.fib_missed + self.route_unpaired

    def to_dict(self) -> dict:
        return {**asdict(self), "packets_lost": self.packets_lost, "total": self.total}

    @classmethod
    def from_dict(cls, data: dict) -> "LossCounters":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
