"""Typed records: what the kernel aggregated for one flow, in one schema for live, recorded
and replayed data. Decoding from the BPF maps' structs happens here, once."""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

from .ringbuf import record_stride
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


class _KeyOnce:
    """`flow.key`, computed at first use and stored in the instance's dict under "key", where
    every later read finds it without calling anything (a descriptor with only __get__: the
    instance's dict wins). The identifying fields never change after a flow is made; the
    decoder stores the key it built, so the table's lookups of a storm's flows cost a dict read."""

    def __get__(self, flow, owner=None):
        if flow is None:
            return self
        key = flow.__dict__["key"] = FlowKey(flow.netns, flow.proto, flow.saddr, flow.sport, flow.daddr, flow.dport)
        return key


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

    key = _KeyOnce()                # FlowKey: not a field (no annotation), cached in __dict__

    def to_dict(self) -> dict:
        # From the instance's own dict rather than asdict(), which deep-copies field by field:
        # a storm streams hundreds of thousands of these. (A dataclass's __dict__ holds its
        # fields in declaration order, then the cached "key".)
        out = self.shallow_dict()
        out["xmit_devs"] = dict(self.xmit_devs)
        out["devices"] = [dict(d) for d in self.devices]
        return out

    def shallow_dict(self) -> dict:
        """to_dict without copying the nested device dicts: for a view made and dropped at once."""
        out = {"type": "flow", **self.__dict__}
        out.pop("key", None)
        extra = out.pop("extra")
        for k, v in extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def field_types(cls) -> dict[str, str]:
        return {f.name: f.type for f in fields(cls) if f.name != "extra"}


# struct flow_key / flow_value / new_flow_event in bpf/common.c, decoded with struct (not ctypes
# objects): a drain can return tens of thousands of entries.
KEY_FORMAT = "II16s16sHHBBH"
VALUE_FORMAT = "QQQQQIIIIHBBI16s16s16s16s"
KEY_STRUCT = struct.Struct("=" + KEY_FORMAT)
VALUE_STRUCT = struct.Struct("=" + VALUE_FORMAT)
NOTICE_BYTES = KEY_STRUCT.size + VALUE_STRUCT.size          # struct new_flow_event
# A notice as the ring buffer holds it: the ring's 8-byte header, the event, padding to 8
# bytes (ringbuf.record_stride). One iter_unpack decodes a run of them.
NOTICE_RECORD = struct.Struct(f"=8x{KEY_FORMAT}{VALUE_FORMAT}{record_stride(NOTICE_BYTES) - 8 - NOTICE_BYTES}x")
ROUTE_SOURCES = {0: None, 1: "packet", 2: "socket", 3: "lookup"}
FLOW_HAS_FIB, FLOW_ROUTE_LOOPBACK, FLOW_DEV_LOOPBACK, FLOW_V4_MAPPED_SOCKET, FLOW_CONTINUED = 1, 2, 4, 8, 16
PROTOCOLS_BY_FAMILY = {**PROTOCOLS, socket.IPPROTO_ICMPV6: "icmp6"}


def address(family: int, raw: bytes) -> str:
    """An address as the BPF key holds it (16 bytes, IPv4 in the first 4), in RFC 5952 form
    (inet_ntop: the same text as ipaddress, several times faster in a storm)."""
    return socket.inet_ntop(socket.AF_INET, raw[:4]) if family == 4 else socket.inet_ntop(socket.AF_INET6, raw)


# Text the kernel repeats, decoded once: a storm sends from a few addresses and processes, on a
# few devices, to many ports. Raw bytes -> text; each cache is emptied when it grows past
# TEXT_CACHE_LIMIT entries, so a storm to a million addresses costs memory for at most that many.
TEXT_CACHE_LIMIT = 1 << 16
_ADDRESSES_V4: dict[bytes, str] = {}
_ADDRESSES_V6: dict[bytes, str] = {}
_NAMES: dict[bytes, str] = {}
_PROTOCOL_NAMES = {p: name for p, name in PROTOCOLS_BY_FAMILY.items()}
_ROUTE_TYPE_NAMES = dict(enumerate(ROUTE_TYPES))
_new_key = tuple.__new__        # FlowKey from a tuple, without the namedtuple's Python-level __new__


def _cached_address(family: int, raw: bytes) -> str:
    cache = _ADDRESSES_V4 if family == 4 else _ADDRESSES_V6
    if len(cache) >= TEXT_CACHE_LIMIT:
        cache.clear()
    text = cache[raw] = address(family, raw)
    return text


def _cached_name(raw: bytes) -> str:
    if len(_NAMES) >= TEXT_CACHE_LIMIT:
        _NAMES.clear()
    text = _NAMES[raw] = kernel_string(raw)
    return text


def decode_entry(key: bytes, value: bytes, backend: str) -> tuple[Flow, bool]:
    """One kernel entry (a flow on one transmit device) as a Flow with one device, and whether
    the kernel marked it as continuing from the previous epoch."""
    return decode_fields(KEY_STRUCT.unpack(key), VALUE_STRUCT.unpack(value), backend)


def decode_fields(key: tuple, value: tuple, backend: str, flow_key: FlowKey | None = None) -> tuple[Flow, bool]:
    """decode_entry, from the structs already unpacked (KEY_STRUCT, VALUE_STRUCT); flow_key
    when the caller has it already (flow_key_of)."""
    return decode_unpacked(key + value, backend, flow_key)


def decode_unpacked(entry: tuple, backend: str, flow_key: FlowKey | None = None) -> tuple[Flow, bool]:
    """decode_fields from one tuple: KEY_STRUCT's fields, then VALUE_STRUCT's (what
    NOTICE_RECORD.iter_unpack yields for a notice)."""
    return decode_flows((entry,), backend, flow_key)[0], bool(entry[20] & FLOW_CONTINUED)


def decode_notices(records: bytes, backend: str) -> list[Flow]:
    """A run of new-flow notices as the ring holds them (NOTICE_RECORD each), as Flows."""
    return decode_flows(NOTICE_RECORD.iter_unpack(records), backend)


def decode_flows(entries, backend: str, flow_key: FlowKey | None = None) -> list[Flow]:
    """Unpacked entries (KEY_STRUCT's fields, then VALUE_STRUCT's) as Flows, in one loop (a
    storm decodes hundreds of thousands: no call per entry). flow_key: of a single entry,
    when the caller has it already (flow_key_of)."""
    out: list[Flow] = []
    append = out.append
    names, new_flow = _NAMES, object.__new__
    for (netns, ifindex, saddr, daddr, sport, dport, proto, family, _, packets, nbytes, segments, fragments, first_ns,
         pid, fib_table, route_ifindex, fib_ifindex, route_type, route_src, flags, _, comm, dev, route_dev,
         fib_dev) in entries:
        key = flow_key
        if key is None:
            addresses = _ADDRESSES_V4 if family == 4 else _ADDRESSES_V6
            key = _new_key(FlowKey, (netns, _PROTOCOL_NAMES.get(proto) or str(proto),
                                     addresses.get(saddr) or _cached_address(family, saddr), sport,
                                     addresses.get(daddr) or _cached_address(family, daddr), dport))
        dev_name = names.get(dev)
        if dev_name is None:
            dev_name = _cached_name(dev)
        comm_text = names.get(comm)
        if comm_text is None:
            comm_text = _cached_name(comm)
        if route_src:
            route = (_ROUTE_TYPE_NAMES.get(route_type) or route_type_name(route_type),
                     names.get(route_dev) or _cached_name(route_dev) or None, ROUTE_SOURCES.get(route_src),
                     route_ifindex, bool(flags & FLOW_ROUTE_LOOPBACK))
        else:
            route = (None, None, None, None, None)
        if flags & FLOW_HAS_FIB:
            fib = (names.get(fib_dev) or _cached_name(fib_dev) or None, fib_table, fib_ifindex)
        else:
            fib = (None, None, None)
        # The instance's dict built directly, in field order: the same object Flow(...) makes,
        # without a 27-argument __init__ per flow (the hot path of a storm).
        flow = new_flow(Flow)
        flow.__dict__ = {
            "proto": key[1], "saddr": key[2], "sport": sport,
            "daddr": key[4], "dport": dport, "netns": netns, "pid": pid, "comm": comm_text,
            "route_type": route[0], "route_dev": route[1], "fib_dev": fib[0], "fib_table": fib[1],
            "xmit_devs": {dev_name: packets},       # a notice carries the device, with no counts yet
            "packets": packets, "bytes": nbytes, "first_ns": first_ns, "last_ns": first_ns, "backend": backend,
            "family": family, "segments": segments, "route_src": route[2],
            "route_ifindex": route[3], "route_loopback": route[4], "fib_ifindex": fib[2],
            "devices": [{"ifindex": ifindex, "name": dev_name, "loopback": bool(flags & FLOW_DEV_LOOPBACK),
                         "packets": packets, "segments": segments, "bytes": nbytes}],
            "fragments": fragments,
            "extra": {"v4_mapped_socket": True} if flags & FLOW_V4_MAPPED_SOCKET else {},
            "key": key,
        }
        append(flow)
    return out


COUNTS_STRUCT = struct.Struct("=QQQQ")     # the first four members of struct flow_value
# The same four counts, stepping over the rest of the value: iter_unpack over a drained chunk.
VALUE_COUNTS_STRUCT = struct.Struct(f"=QQQQ{VALUE_STRUCT.size - COUNTS_STRUCT.size}x")


# struct cached_flow in bpf/common.c: a flow_key, then its four counts.
CACHED_FLOW_STRUCT = struct.Struct(f"={KEY_STRUCT.size}sQQQQ")


def cached_counts(slots: bytes) -> dict[bytes, list[int]]:
    """The per-CPU flow cache's slots of one epoch (struct cached_flow, back to back): the counts
    each key holds there, summed over the CPUs that cached it (empty slots: family 0)."""
    out: dict[bytes, list[int]] = {}
    family_at = KEY_STRUCT.size - 3       # flow_key.family (then the 2-byte pad)
    for key, packets, nbytes, segments, fragments in CACHED_FLOW_STRUCT.iter_unpack(slots):
        if key[family_at] == 0 or not packets:
            continue
        counts = out.setdefault(key, [0, 0, 0, 0])
        counts[0] += packets
        counts[1] += nbytes
        counts[2] += segments
        counts[3] += fragments
    return out


def add_cached_counts(keys: bytes, values: bytes, count: int, pending: dict[bytes, list[int]]) -> bytes:
    """A drained chunk's values with the cached counts of its keys added (each key found is taken
    out of pending, so what is left there belongs to no drained entry)."""
    if not pending:
        return values
    ksize, vsize = KEY_STRUCT.size, VALUE_STRUCT.size
    # An index of the chunk's keys: linear in the chunk, whatever the number pending (a slot per
    # CPU each: thousands on a large host).
    at = {keys[i * ksize:(i + 1) * ksize]: i for i in range(count)}
    patched = None
    for key in [k for k in pending if k in at]:
        if patched is None:
            patched = bytearray(values)
        off = at[key] * vsize
        packets, nbytes, segments, fragments = pending.pop(key)
        old = COUNTS_STRUCT.unpack_from(patched, off)
        COUNTS_STRUCT.pack_into(patched, off, old[0] + packets, old[1] + nbytes, old[2] + segments,
                                old[3] + fragments)
    return values if patched is None else bytes(patched)


def flow_key_of(key: tuple) -> FlowKey:
    """Just the identity of an unpacked kernel key (KEY_STRUCT): cheaper than decode_fields for
    the common case of a flow already known."""
    netns, _ifindex, saddr, daddr, sport, dport, proto, family, _ = key
    addresses = _ADDRESSES_V4 if family == 4 else _ADDRESSES_V6
    return _new_key(FlowKey, (netns, _PROTOCOL_NAMES.get(proto) or str(proto),
                              addresses.get(saddr) or _cached_address(family, saddr), sport,
                              addresses.get(daddr) or _cached_address(family, daddr), dport))


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
    # What this kernel loses with no counter to show it (the plan's KernelFacts.uncountable
    # statements): "lost: nothing" is said together with them, never instead of them.
    uncountable: tuple[str, ...] = ()

    @property
    def packets_lost(self) -> int:
        return self.flow_map_full + self.xmit_map_full + self.xmit_missed

    @property
    def total(self) -> int:
        """Everything missed; undecoded packets are counted, so they are not in it."""
        return self.packets_lost + self.events_dropped + self.probes_missed + self.fib_missed + self.route_unpaired

    def to_dict(self) -> dict:
        out = {**asdict(self), "packets_lost": self.packets_lost, "total": self.total}
        if not self.uncountable:
            del out["uncountable"]        # only where a kernel has something uncountable to say
        else:
            out["uncountable"] = list(self.uncountable)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LossCounters":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["uncountable"] = tuple(values.get("uncountable") or ())
        return cls(**values)
