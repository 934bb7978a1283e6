"""The attach plan: which BPF program goes where, chosen from the kernel facts before anything
is loaded, so it can be printed (`doctor`, `--dry-run`) and explained."""
from __future__ import annotations

import importlib.resources
import ipaddress
import os
import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .btf import Btf
from .errors import EnvironmentProblem, UsageError
from .kernel import KernelFacts
from .offsets import Offset, cflags as offset_cflags, resolve as resolve_offsets

# bpf/ in the repository, installed as the package routetrace.bpf (checkout, wheel and .deb alike).
BPF_DIR = Path(str(importlib.resources.files("routetrace.bpf")))

BACKENDS = ("auto", "kprobe", "tracepoint")
ROUTE_FUNCTION = "ip_route_output_key_hash"
# Where most sockets' lookups go (connect's final lookup, ip_route_newports, udp_sendmsg, SYN-ACKs,
# RSTs): in route.c the compiler inlines ip_route_output_key_hash into it, so a probe on
# ip_route_output_key_hash alone sees only callers in other files (connect's first lookup with
# source 0). Exported since 2.6; probed with the same programs, paired the same way.
ROUTE_FLOW_FUNCTION = "ip_route_output_flow"
# Enough kretprobe instances for every CPU to be inside the route function many times over
# (softirq replies nest inside process-context connects); misses are counted, not hidden.
# --kretprobe-maxactive changes it (1 provokes misses in a test).
KRETPROBE_MAXACTIVE = 256
# bpf/kprobe.c pairs the route function's entry and return by the stack pointer, whose offset at
# the return is the x86_64 kretprobe trampoline's (measured on 5.10 to unstable).
KPROBE_PLAN_ARCHES = ("x86_64",)
# Tests only: every packet still carries its route where the kprobe plan reads it, so the route
# function's answers (route_src "lookup") are a fallback real traffic never reaches; with this set
# to 1 they are taken first wherever a flow's own lookup was paired, which the VM tests check.
PREFER_LOOKUP_ENV = "ROUTETRACE_PREFER_LOOKUP"


@dataclass(frozen=True)
class Filters:
    port: int | None = None
    host: str | None = None            # IPv4 or IPv6
    pid: int | None = None
    netns: int | None = None           # namespace inode
    family: int | None = None          # 4 or 6 (-4 / -6)

    def cflags(self) -> list[str]:
        out = []
        if self.port is not None:
            out.append(f"-DFILTER_PORT={self.port}")
        if self.host is not None:
            # As the BPF key holds it: 16 bytes, IPv4 in the first 4, compared as 4 native words.
            addr = ipaddress.ip_address(self.host)
            words = struct.unpack("=4I", addr.packed.ljust(16, b"\0"))
            out.append(f"-DFILTER_HOST_FAMILY={addr.version}")
            out += [f"-DFILTER_HOST_W{i}={w}U" for i, w in enumerate(words)]
        if self.pid is not None:
            out.append(f"-DFILTER_PID={self.pid}")
        if self.netns is not None:
            out.append(f"-DFILTER_NETNS={self.netns}U")
        if self.family is not None:
            out.append(f"-DFILTER_FAMILY={self.family}")
        return out

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def text(self) -> str:
        return filters_text(self.describe())


def filters_text(described: dict) -> str:
    """"port=8888 netns=4026532177", or "none": for live runs and recorded headers alike."""
    return " ".join(f"{k}={v}" for k, v in described.items()) or "none"


@dataclass(frozen=True)
class Limits:
    """Sizes of what the kernel keeps; `doctor` and every summary name them."""
    max_flows: int = 65536         # entries per flow map (two maps alternate, see bpf/common.c)
    ring_pages: int = 2048         # new-flow notice ring: 8 MiB, ~45,000 notices between reads
    kretprobe_maxactive: int = KRETPROBE_MAXACTIVE   # kprobe plan: route calls in flight at once

    def cflags(self) -> list[str]:
        return [f"-DMAX_FLOWS={self.max_flows}", f"-DRING_PAGES={self.ring_pages}"]

    def describe(self) -> dict:
        return {"max_flows": self.max_flows, "ring_pages": self.ring_pages,
                "kretprobe_maxactive": self.kretprobe_maxactive}


@dataclass(frozen=True)
class Attachment:
    kind: str                 # btf_tracepoint | raw_tracepoint | tracepoint | kprobe | kretprobe
    target: str               # "net:net_dev_queue" or a kernel function
    fn: str                   # the BPF function in bpf/*.c
    maxactive: int = 0
    # Compiled in the same unit and attached instead if the kernel refuses this one (tracer.py)
    fallback: "Attachment | None" = None

    def __str__(self) -> str:
        return f"{self.kind} {self.target}"


@dataclass
class AttachPlan:
    backend: str                                      # "tracepoint" or "kprobe"
    sources: list[Path]                               # compiled as one unit, in this order
    attachments: list[Attachment]
    offsets: list[Offset]
    filters: Filters
    reasons: list[str] = field(default_factory=list)
    extra_cflags: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    # what this plan loses on this kernel without any counter (KernelFacts.uncountable)
    uncountable: list[str] = field(default_factory=list)
    # kernel functions the BTF-typed programs call (bpfsys.KFUNC_MARKS), linked by tracer.py
    kfuncs: list[str] = field(default_factory=list)

    @property
    def cflags(self) -> list[str]:
        # -w: kernel headers of other versions make clang chatter; errors still print.
        return ["-w", *offset_cflags(self.offsets), *self.filters.cflags(), *self.limits.cflags(),
                *self.extra_cflags]

    @property
    def xmit(self) -> Attachment | None:
        """The transmit program's attachment (xmit_*), as loaded: after a fallback, the fallback."""
        return next((a for a in self.attachments if a.fn.startswith("xmit_")), None)

    def describe(self) -> dict:
        return {"backend": self.backend, "attachments": [str(a) for a in self.attachments],
                "offsets_from": self.offsets[0].source if self.offsets else None,
                "limits": self.limits.describe()}

    def program_text(self) -> str:
        """The plan's C files as one unit: bcc rewrites map calls (`flows.lookup`) only in its
        main file, so the shared code cannot be an #include. #line keeps errors pointing home."""
        return "".join(f'#line 1 "{p}"\n{p.read_text()}\n' for p in self.sources)

    def render(self, cannot_see: Iterable[str] = ()) -> str:
        """The plan as doctor and --dry-run print it; `cannot_see`: statements of what it cannot see
        on this kernel (KernelFacts.limits), each said once, as that -- a reason that says the
        same (the plan's reasons carry the blind spots too) is not repeated."""
        cannot_see = list(cannot_see)
        lines = [f"attach plan: {self.backend}"]
        lines += [f"  {a.kind:<11} {a.target:<26} -> {a.fn}" + (f" (maxactive {a.maxactive})" if a.maxactive else "")
                  for a in self.attachments]
        lines += [f"  because {r}" for r in self.reasons if r not in cannot_see]
        lines.append(f"  sources: {', '.join(p.name for p in self.sources)}")
        lines.append(f"  filters: {self.filters.text()}")
        lines.append(f"  limits: {self.limits.max_flows} flows per map (x2), ring {self.limits.ring_pages} pages")
        lines += [f"  cannot see: {statement}" for statement in cannot_see]
        lines.append("offsets:")
        lines += [f"  {o.define:<24} {o.path:<34} {o.value:>6}  ({o.source})" for o in self.offsets]
        return "\n".join(lines)


# Raw tracepoints: the programs get the kernel's own arguments (the skb, the lookup's structs)
# and skip the regular tracepoints' record copying. bcc attaches them on load.
FIB_TRACEPOINT = Attachment("raw_tracepoint", "fib_table_lookup", "raw_tracepoint__fib_table_lookup")
FIB6_TRACEPOINT = Attachment("raw_tracepoint", "fib6_table_lookup", "raw_tracepoint__fib6_table_lookup")
XMIT_TRACEPOINT = Attachment("raw_tracepoint", "net_dev_queue", "xmit_raw")
# BTF-typed (tp_btf): plain loads instead of helper calls for the skb, its device and namespace.
# tracer.py loads it (bcc cannot) and falls back to XMIT_TRACEPOINT if the verifier refuses it.
XMIT_BTF_TRACEPOINT = Attachment("btf_tracepoint", "net_dev_queue", "xmit_btf", fallback=XMIT_TRACEPOINT)
# Tests and benchmarks: "raw" keeps the transmit program on the raw tracepoint where tp_btf works.
XMIT_HOOK_ENV = "ROUTETRACE_XMIT_HOOK"


def _has_fib6(facts: KernelFacts) -> bool:
    return bool(facts.tracepoints.get("fib6/fib6_table_lookup"))


def _kprobe_problem(facts: KernelFacts, machine: str | None = None) -> str | None:
    """Why the kprobe plan cannot run here, or None when it can."""
    if not facts.kprobes:
        return "kprobes are not available on this kernel (CONFIG_KPROBES off)"
    machine = machine or platform.machine()
    if machine not in KPROBE_PLAN_ARCHES:
        return (f"the kprobe plan pairs the route function's entry and return by stack pointer, "
                f"known for {', '.join(KPROBE_PLAN_ARCHES)} only, not {machine}")
    if ROUTE_FUNCTION not in facts.symbols:
        return f"{ROUTE_FUNCTION} is not in /proc/kallsyms"
    if facts.xmit_function is None:
        return "neither __dev_queue_xmit nor a global dev_queue_xmit is in /proc/kallsyms"
    return None


def choose(facts: KernelFacts, filters: Filters, backend: str = "auto", limits: Limits | None = None) -> AttachPlan:
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    reasons = []
    problem = _kprobe_problem(facts)
    if backend == "kprobe" and problem:
        raise EnvironmentProblem(f"--backend kprobe: {problem}; use --backend tracepoint")
    use_kprobes = backend == "kprobe" or (backend == "auto" and problem is None)
    if backend == "auto":
        reasons.append(f"auto: {problem}" if problem else
                       f"auto: kprobes available and {ROUTE_FUNCTION}, {facts.xmit_function} resolve")
    else:
        reasons.append(f"--backend {backend} asked for")
    if not facts.raw_tracepoints:
        raise EnvironmentProblem("this kernel has no raw tracepoints (BPF_RAW_TRACEPOINT_OPEN, Linux 4.17+), "
                                 "which both plans use for the FIB lookup and the transmit path")
    if not facts.tracepoints.get("fib/fib_table_lookup"):
        raise EnvironmentProblem(f"tracepoint fib:fib_table_lookup is missing under {facts.tracefs or 'tracefs (not mounted)'}")
    if not use_kprobes and not facts.tracepoints.get("net/net_dev_queue"):
        raise EnvironmentProblem(f"tracepoint net:net_dev_queue is missing under {facts.tracefs or 'tracefs (not mounted)'}")
    if facts.headers is None:
        raise EnvironmentProblem(
            "no kernel headers for bcc: run scripts/setup, or apt install linux-headers-$(uname -r) "
            "(or the distribution's generic linux-headers package)")
    prefer = os.environ.get("ROUTETRACE_OFFSETS", "auto")
    btf = Btf.load() if facts.btf and prefer != "headers" else None
    offsets = resolve_offsets(facts.headers.matches, btf, prefer)
    compiled_with = (f"bcc compiles with the running kernel's headers ({facts.headers.path})" if facts.headers.matches
                     else f"bcc compiles with headers for {facts.headers.release}, not {facts.release}")
    where = ("offsetof() over those headers" if offsets[0].source == "headers"
             else "struct offsets from BTF (/sys/kernel/btf/vmlinux)")
    reasons.append(f"{compiled_with}; {where}" + (f" (ROUTETRACE_OFFSETS={prefer})" if prefer != "auto" else ""))
    fib = [FIB_TRACEPOINT]
    fib_flags = []
    if _has_fib6(facts):
        fib.append(FIB6_TRACEPOINT)
        fib_flags.append("-DHAVE_FIB6=1")
    else:
        reasons.append(facts.limits(backend)["fib_dev/ipv6"])
    if facts.bpf_skips_pid1:
        reasons.append(facts.limits("kprobe" if use_kprobes else "tracepoint")["pid1"])
    limits = limits or Limits()
    if use_kprobes:
        xmit = facts.xmit_function
        reasons.append(f"transmit probe on {xmit}" + (" (dev_queue_xmit is an inline wrapper here)"
                                                       if xmit == "__dev_queue_xmit" else ""))
        route = [Attachment("kprobe", ROUTE_FUNCTION, "route_entry"),
                 Attachment("kretprobe", ROUTE_FUNCTION, "route_return", limits.kretprobe_maxactive)]
        if ROUTE_FLOW_FUNCTION in facts.symbols:
            route += [Attachment("kprobe", ROUTE_FLOW_FUNCTION, "route_entry"),
                      Attachment("kretprobe", ROUTE_FLOW_FUNCTION, "route_return", limits.kretprobe_maxactive)]
        else:
            reasons.append(f"{ROUTE_FLOW_FUNCTION} is not in /proc/kallsyms: route answers only from "
                           f"{ROUTE_FUNCTION}'s callers outside route.c")
        attachments = [
            *route,
            Attachment("kprobe", xmit, "xmit_entry"),
            *fib,
        ]
        reasons.append(facts.limits("kprobe")["xmit_missed"])
        route_flags = ["-DROUTE_DECISIONS=1"]
        if os.environ.get(PREFER_LOOKUP_ENV) == "1":
            route_flags.append("-DROUTE_PREFER_LOOKUP=1")
            reasons.append(f"{PREFER_LOOKUP_ENV}=1: a flow's route is its own paired lookup's answer where "
                           "there is one, before the packet's (a test of the pairing)")
        return AttachPlan("kprobe", [BPF_DIR / "common.c", BPF_DIR / "fib.c", BPF_DIR / "kprobe.c"],
                          attachments, offsets, filters, reasons, [*route_flags, *fib_flags], limits,
                          facts.uncountable("kprobe"))
    xmit, xmit_flags, kfuncs = XMIT_TRACEPOINT, ["-DRAW_XMIT=1"], []
    if facts.btf_tracepoints and os.environ.get(XMIT_HOOK_ENV) != "raw":
        xmit = XMIT_BTF_TRACEPOINT
        xmit_flags.append("-DXMIT_BTF=1")
        reasons.append("net_dev_queue as a BTF-typed tracepoint: the skb, its device and namespace by plain loads")
        casts = _packet_cast_flags(btf) if facts.packet_casts else None
        if casts:
            xmit_flags += casts
            kfuncs.append("bpf_rdonly_cast")
            reasons.append("packet headers and the GSO count by plain loads through bpf_rdonly_cast "
                           "(no bpf_probe_read_kernel call per packet)")
    elif os.environ.get(XMIT_HOOK_ENV) == "raw":
        reasons.append(f"{XMIT_HOOK_ENV}=raw: net_dev_queue as a raw tracepoint")
    else:
        reasons.append("net_dev_queue as a raw tracepoint (this kernel or process cannot load BTF-typed ones)")
    return AttachPlan("tracepoint", [BPF_DIR / "common.c", BPF_DIR / "fib.c", BPF_DIR / "tracepoint.c"],
                      [*fib, xmit], offsets, filters, reasons, [*xmit_flags, *fib_flags], limits,
                      facts.uncountable("tracepoint"), kfuncs)


# The structs bpf/common.c casts packet data to (PACKET_CASTS): define -> struct name.
PACKET_CAST_STRUCTS = {"BTF_ID_IPHDR": "iphdr", "BTF_ID_IPV6HDR": "ipv6hdr", "BTF_ID_UDPHDR": "udphdr",
                       "BTF_ID_SKB_SHARED_INFO": "skb_shared_info"}


def _packet_cast_flags(btf: Btf | None) -> list[str] | None:
    """-D defines for PACKET_CASTS: the casts' BTF ids in the running kernel (the program is
    loaded against it); None without BTF offsets or when a struct is missing."""
    if btf is None:
        return None
    ids = {define: btf.by_name.get(name) for define, name in PACKET_CAST_STRUCTS.items()}
    if None in ids.values():
        return None
    from .bpfsys import KFUNC_MARKS
    return ["-DPACKET_CASTS=1", f"-DKFUNC_RDONLY_CAST_MARK={KFUNC_MARKS['bpf_rdonly_cast']}",
            *(f"-D{define}={type_id}" for define, type_id in ids.items())]
