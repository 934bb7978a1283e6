"""Typed records: what the kernel aggregated for one flow, in one schema for live, recorded
and replayed data. Decoding from the BPF maps' structs happens here, once."""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import asdict, dataclass, field, fields

PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}

# include/uapi/linux/rtnetlink.h
ROUTE_TYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST",
               "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")


def route_type_name(value: int) -> str:
    return ROUTE_TYPES[value] if 0 <= value < len(ROUTE_TYPES) else f"TYPE{value}"


def ipv4(be_u32: int) -> str:
    """An address as the BPF code stored it: network byte order in a native u32."""
    return str(ipaddress.IPv4Address(struct.pack("=I", be_u32)))


def devname(raw) -> str:
    data = bytes(raw)
    return data.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True, order=True)
class FlowKey:
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
        return FlowKey(self.netns, self.proto, self.saddr, self.sport, self.daddr, self.dport)

    def to_dict(self) -> dict:
        out = {"type": "flow", **asdict(self)}
        extra = out.pop("extra")
        return {**out, **{k: v for k, v in extra.items() if k not in out}}

    @classmethod
    def field_types(cls) -> dict[str, str]:
        return {f.name: f.type for f in fields(cls) if f.name != "extra"}


def decode_flow(key, value, xmit_devs: dict[str, int], backend: str) -> Flow:
    """Build a Flow from the BPF `flow_key`/`flow_value` structs (any objects with those attributes)."""
    return Flow(
        proto=PROTOCOLS.get(key.proto, str(key.proto)),
        saddr=ipv4(key.saddr), sport=key.sport,
        daddr=ipv4(key.daddr), dport=key.dport,
        netns=key.netns,
        pid=value.pid, comm=devname(value.comm),
        route_type=route_type_name(value.route_type) if value.has_route else None,
        route_dev=(devname(value.route_dev) or None) if value.has_route else None,
        fib_dev=(devname(value.fib_dev) or None) if value.has_fib else None,
        fib_table=value.fib_table if value.has_fib else None,
        xmit_devs=dict(xmit_devs),
        packets=value.packets, bytes=value.bytes,
        first_ns=value.first_ns, last_ns=value.last_ns,
        backend=backend,
    )


@dataclass(frozen=True)
class LossCounters:
    """Everything the tracer knows it did not see; shown in every summary."""
    events_dropped: int = 0      # new-flow notices the ring buffer had no room for
    flow_map_full: int = 0       # packets of flows the flow map could not hold
    xmit_map_full: int = 0
    probes_missed: int = 0       # kretprobe misses (kprobe plan)

    @property
    def total(self) -> int:
        return self.events_dropped + self.flow_map_full + self.xmit_map_full + self.probes_missed

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}
