"""The struct members routetrace's BPF programs read, and where their offsets come from.

This is the only place that knows field paths. Each becomes a `-D` define for the BPF C:
a number taken from the running kernel's BTF, or, when bcc compiles with the running
kernel's own headers, an `offsetof()` the compiler resolves from them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .btf import Btf
from .errors import EnvironmentProblem

# define name -> "struct.member.path"; a path may walk embedded (not pointed-to) members.
FIELDS: dict[str, str] = {
    "OFF_SKB_DEV": "sk_buff.dev",
    "OFF_SKB_SK": "sk_buff.sk",
    "OFF_SKB_REFDST": "sk_buff._skb_refdst",
    "OFF_SKB_HEAD": "sk_buff.head",
    "OFF_SKB_NETWORK_HEADER": "sk_buff.network_header",
    "OFF_SKB_PROTOCOL": "sk_buff.protocol",
    "OFF_SKB_LEN": "sk_buff.len",
    "OFF_SKB_DATA": "sk_buff.data",
    "OFF_SKB_END": "sk_buff.end",
    "OFF_SHINFO_GSO_SEGS": "skb_shared_info.gso_segs",
    "OFF_SK_FAMILY": "sock.__sk_common.skc_family",
    "OFF_SK_STATE": "sock.__sk_common.skc_state",
    "OFF_SK_DST_CACHE": "sock.sk_dst_cache",
    "OFF_NETDEV_NAME": "net_device.name",
    "OFF_NETDEV_IFINDEX": "net_device.ifindex",
    "OFF_NETDEV_FLAGS": "net_device.flags",
    "OFF_NETDEV_NET": "net_device.nd_net.net",
    "OFF_NET_INUM": "net.ns.inum",
    "OFF_DST_DEV": "dst_entry.dev",
    "OFF_RTABLE_RT_TYPE": "rtable.rt_type",
    "OFF_RT6_FLAGS": "rt6_info.rt6i_flags",
    "OFF_TASK_NSPROXY": "task_struct.nsproxy",
    "OFF_NSPROXY_NET": "nsproxy.net_ns",
    "OFF_FL4_SADDR": "flowi4.saddr",
    "OFF_FL4_DADDR": "flowi4.daddr",
    "OFF_FL4_SPORT": "flowi4.uli.ports.sport",
    "OFF_FL4_DPORT": "flowi4.uli.ports.dport",
    "OFF_FL4_PROTO": "flowi4.__fl_common.flowic_proto",
    "OFF_FL4_IIF": "flowi4.__fl_common.flowic_iif",
    "OFF_NHC_DEV": "fib_nh_common.nhc_dev",
    "OFF_FL6_SADDR": "flowi6.saddr",
    "OFF_FL6_DADDR": "flowi6.daddr",
    "OFF_FL6_SPORT": "flowi6.uli.ports.sport",
    "OFF_FL6_DPORT": "flowi6.uli.ports.dport",
    "OFF_FL6_IIF": "flowi6.__fl_common.flowic_iif",
    "OFF_FIB6_RES_NH": "fib6_result.nh",
    "OFF_FIB6_NH_DEV": "fib6_nh.nh_common.nhc_dev",
    "OFF_FIB6_TABLE_ID": "fib6_table.tb6_id",
}

# Structs the header path needs declared; typedef'd ones are not spelled "struct".
_TYPEDEFS = {"possible_net_t"}


@dataclass(frozen=True)
class Offset:
    define: str
    path: str
    value: str        # what the BPF C sees: a number, or an offsetof() expression
    source: str       # "btf" or "headers"


def from_btf(btf: Btf) -> list[Offset]:
    return [Offset(d, p, str(btf.offsetof(p)), "btf") for d, p in FIELDS.items()]


def from_headers() -> list[Offset]:
    out = []
    for define, path in FIELDS.items():
        struct_name, member = path.split(".", 1)
        spelled = struct_name if struct_name in _TYPEDEFS else f"struct {struct_name}"
        out.append(Offset(define, path, f"offsetof({spelled}, {member})", "headers"))
    return out


SOURCES = ("auto", "btf", "headers")


def resolve(headers_match: bool, btf: Btf | None, prefer: str = "auto") -> list[Offset]:
    """Where offsets come from. auto: the running kernel's BTF when it has one -- exact, and it
    spares bcc from parsing the kernel's networking headers, which bcc 0.26 cannot do for 6.12
    (its linux/bpf.h outgrew bcc's uapi copy); else offsetof() over matching headers.
    `prefer` forces one source (scripts/vm-test exercises both)."""
    if prefer not in SOURCES:
        raise EnvironmentProblem(f"ROUTETRACE_OFFSETS must be one of {', '.join(SOURCES)}, not {prefer!r}")
    if prefer == "headers" or (prefer == "auto" and btf is None):
        if not headers_match:
            raise EnvironmentProblem(
                "the kernel headers bcc compiles with are not the running kernel's and there is no BTF "
                "at /sys/kernel/btf/vmlinux to correct struct offsets: install linux-headers-$(uname -r)")
        return from_headers()
    if btf is None:
        raise EnvironmentProblem("ROUTETRACE_OFFSETS=btf, but /sys/kernel/btf/vmlinux is missing")
    return from_btf(btf)


def cflags(offsets: list[Offset]) -> list[str]:
    flags = [f"-D{o.define}={o.value}" for o in offsets]
    if offsets and offsets[0].source == "headers":
        flags.append("-DOFFSETS_FROM_HEADERS=1")
    return flags
