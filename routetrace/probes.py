"""The attach plan: which BPF program goes where, chosen from the kernel facts before anything
is loaded, so it can be printed (`doctor`) and explained."""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .btf import Btf
from .errors import EnvironmentProblem
from .kernel import KernelFacts
from .offsets import Offset, cflags as offset_cflags, resolve as resolve_offsets

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
if not BPF_DIR.is_dir():                      # installed as a wheel: shipped inside the package
    BPF_DIR = Path(__file__).resolve().parent / "bpf"


@dataclass(frozen=True)
class Filters:
    port: int | None = None
    host: str | None = None
    pid: int | None = None
    netns: int | None = None           # namespace inode

    def cflags(self) -> list[str]:
        out = []
        if self.port is not None:
            out.append(f"-DFILTER_PORT={self.port}")
        if self.host is not None:
            be = struct.unpack("=I", ipaddress.IPv4Address(self.host).packed)[0]
            out.append(f"-DFILTER_HOST={be}U")
        if self.pid is not None:
            out.append(f"-DFILTER_PID={self.pid}")
        if self.netns is not None:
            out.append(f"-DFILTER_NETNS={self.netns}U")
        return out

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class AttachPlan:
    backend: str                                      # "tracepoint" (or "kprobe")
    sources: list[Path]                               # compiled as one unit, in this order
    attachments: list[tuple[str, str]]                # (kind, target)
    offsets: list[Offset]
    filters: Filters
    reasons: list[str] = field(default_factory=list)

    @property
    def cflags(self) -> list[str]:
        return [*offset_cflags(self.offsets), *self.filters.cflags()]

    def describe(self) -> dict:
        return {"backend": self.backend,
                "attachments": [f"{kind} {target}" for kind, target in self.attachments],
                "offsets_from": self.offsets[0].source if self.offsets else None}

    def program_text(self) -> str:
        """The plan's C files as one unit: bcc rewrites map calls (`flows.lookup`) only in its
        main file, so the shared code cannot be an #include. #line keeps errors pointing home."""
        return "".join(f'#line 1 "{p}"\n{p.read_text()}\n' for p in self.sources)


TRACEPOINT_ATTACHMENTS = [("tracepoint", "fib:fib_table_lookup"), ("tracepoint", "net:net_dev_queue")]


def choose(facts: KernelFacts, filters: Filters, backend: str = "auto") -> AttachPlan:
    reasons = []
    if backend == "kprobe" or (backend == "auto" and facts.kprobes):
        # The kprobe plan is not built yet; auto must not pretend it is.
        if backend == "kprobe":
            raise EnvironmentProblem("the kprobe attach plan is not available in this version; use --backend tracepoint")
        reasons.append("kprobes are available, but this version traces with tracepoints only")
    elif not facts.kprobes:
        reasons.append("kprobes are not available on this kernel (CONFIG_KPROBES off)")
    missing = [tp for tp in ("fib/fib_table_lookup", "net/net_dev_queue") if not facts.tracepoints.get(tp)]
    if missing:
        where = facts.tracefs or "tracefs (not mounted)"
        raise EnvironmentProblem(f"tracepoints {', '.join(missing)} are missing under {where}")
    reasons.append("tracepoints fib:fib_table_lookup and net:net_dev_queue are present")
    if facts.headers is None:
        raise EnvironmentProblem(
            "no kernel headers for bcc: run scripts/setup, or apt install linux-headers-$(uname -r) "
            "(or the distribution's generic linux-headers package)")
    btf = Btf.load() if facts.btf and not facts.headers.matches else None
    offsets = resolve_offsets(facts.headers.matches, btf)
    if facts.headers.matches:
        reasons.append(f"struct offsets from the running kernel's headers ({facts.headers.path})")
    else:
        reasons.append(f"headers are for {facts.headers.release}, not {facts.release}: "
                       "struct offsets from BTF (/sys/kernel/btf/vmlinux)")
    return AttachPlan("tracepoint", [BPF_DIR / "common.c", BPF_DIR / "tracepoint.c"], list(TRACEPOINT_ATTACHMENTS),
                      offsets, filters, reasons)
