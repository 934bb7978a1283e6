"""Facts about the running kernel and machine. Pure data, gathered once; `doctor` prints it.
`KernelFacts.to_dict()`/`from_dict()` make them data: `doctor --json` prints them, scripts/vm-test
collects them from every kernel it boots, and tests/fixtures/kernel-facts/ keeps them."""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .btf import VMLINUX_BTF
from .errors import EnvironmentProblem

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
TRACEPOINTS = ("fib/fib_table_lookup", "fib6/fib6_table_lookup", "net/net_dev_queue", "net/net_dev_start_xmit")
SYMBOLS = ("ip_route_output_key_hash", "ip_route_output_flow", "ip6_route_output_flags", "ip6_route_output_flags_noref",
           "__dev_queue_xmit", "dev_queue_xmit")
# BPF_RAW_TRACEPOINT_OPEN (4.17+) is there when the kernel has either helper (bcc's own test).
RAW_TRACEPOINT_SYMBOLS = ("bpf_find_raw_tracepoint", "bpf_get_raw_tracepoint")
# The fields routetrace reads from fib:fib_table_lookup: without them the FIB's answer cannot
# be shown (name) or attributed to a flow (addresses, ports).
FACTS_FORMAT = 1
# Merged copies of split (Debian-style) header trees, private to routetrace: pointing bcc at
# them through BCC_KERNEL_SOURCE in our own process leaves every other bcc tool unchanged.
HEADER_CACHE = Path("/var/cache/routetrace/kernel-headers")


@dataclass(frozen=True)
class Headers:
    path: Path            # what bcc is pointed at
    release: str          # the kernel release the headers are for
    matches: bool         # the same release as the running kernel


@dataclass
class KernelFacts:
    release: str
    is_root: bool
    btf: bool
    tracefs: Path | None
    kprobes: bool
    tracepoints: dict[str, bool] = field(default_factory=dict)
    # symbol -> kallsyms type letter ("T" global, "t" local), absent when not present
    symbols: dict[str, str] = field(default_factory=dict)
    headers: Headers | None = None
    bcc_version: str | None = None
    # fib:fib_table_lookup's device name: a fixed char[16] (5.15+) or a __data_loc string (5.10)
    fib_name_data_loc: bool = False
    raw_tracepoints: bool = False
    # The kernel loads BTF-typed tracepoint programs (tp_btf) for net_dev_queue from this process:
    # the transmit program's cheapest way in (bpf/tracepoint.c)
    btf_tracepoints: bool = False
    # ... and takes bpf_rdonly_cast (6.2+) in one: packet headers are then read by plain loads
    # (bpf/common.c, PACKET_CASTS) instead of bpf_probe_read_kernel calls
    packet_casts: bool = False
    # BPF tracing programs are not run while PID 1 is current (a non-upstream patch whose mark is
    # bpf_prog_aux.init_owned in BTF; seen on the 6.18 sandbox kernel)
    bpf_skips_pid1: bool = False
    # tracepoint -> field -> {"type", "offset", "size"}, from its tracefs format file (common_* left out)
    tracepoint_fields: dict[str, dict[str, dict]] = field(default_factory=dict)

    @property
    def xmit_function(self) -> str | None:
        """The transmit function to kprobe: never the local out-of-line copy of the inline wrapper."""
        # Since 5.18 __dev_queue_xmit is the exported function and dev_queue_xmit an inline
        # wrapper (with a rarely used local copy); before, __dev_queue_xmit was static.
        if self.symbols.get("__dev_queue_xmit") == "T":
            return "__dev_queue_xmit"
        if self.symbols.get("dev_queue_xmit") == "T":
            return "dev_queue_xmit"
        return None

    def limits(self, backend: str) -> dict[str, str]:
        """What a plan cannot see on this kernel although it runs: flow field -> the statement
        doctor prints (and tests assert) instead of a value. Empty when nothing is missing."""
        # Both plans read the FIB lookups' own structures through raw tracepoints (offsets from
        # BTF or headers), so no tracepoint record field can be missing; a missing tracepoint can.
        out = {}
        if backend == "kprobe" and self.kprobes:
            # bcc makes the transmit kprobe through the kprobe PMU, whose nmissed tracefs does not
            # list; where the kprobe layer skips a nested probe before any BPF recursion check
            # (seen on 6.1), that packet is counted nowhere (README, Limits).
            out["xmit_missed"] = ("kprobe plan: a transmit probe skipped by the kprobe layer (nested in another "
                                  "probe on that CPU) is counted only in its own nmissed, which a kprobe made "
                                  "through the kprobe PMU does not show: such packets are neither accounted nor "
                                  "counted lost")
        if self.bpf_skips_pid1:
            # Found on the 6.18 sandbox kernel by disassembling bpf_trace_run1: it returns before
            # the program (no run, no recursion miss) when current->tgid == 1 and the program's
            # aux->init_owned is clear. Softirq work does not change `current`, so a packet sent
            # from a softirq that happened to run on PID 1's time is skipped too (README, Limits).
            out["pid1"] = ("this kernel does not run BPF tracing programs while PID 1 is the current task "
                           "(bpf_prog_aux.init_owned: a patch, not upstream Linux): packets PID 1 sends, and "
                           "packets sent from softirq work that ran on its time, are neither accounted nor "
                           "counted lost, and FIB lookups there leave no answer")
        if not self.tracepoints.get("fib6/fib6_table_lookup"):
            out["fib_dev/ipv6"] = (f"no fib6:fib6_table_lookup tracepoint on {self.release}: "
                                   "IPv6 flows have no FIB column")
        return out

    def uncountable(self, backend: str) -> list[str]:
        """The limits() statements about packets a plan loses with no counter to show it: carried in
        the loss counters, so every summary, loss line and recording says what "nothing" cannot cover."""
        limits = self.limits(backend)
        return [limits[k] for k in ("xmit_missed", "pid1") if k in limits]

    def to_dict(self) -> dict:
        """One JSON object (doctor --json); from_dict() reads it back."""
        hdr = self.headers
        return {
            "format": FACTS_FORMAT,
            "release": self.release,
            "is_root": self.is_root,
            "btf": self.btf,
            "tracefs": str(self.tracefs) if self.tracefs else None,
            "kprobes": self.kprobes,
            "raw_tracepoints": self.raw_tracepoints,
            "btf_tracepoints": self.btf_tracepoints,
            "packet_casts": self.packet_casts,
            "bpf_skips_pid1": self.bpf_skips_pid1,
            "tracepoints": dict(self.tracepoints),
            "tracepoint_fields": {tp: dict(f) for tp, f in self.tracepoint_fields.items()},
            "symbols": dict(self.symbols),
            "xmit_function": self.xmit_function,
            "fib_name_data_loc": self.fib_name_data_loc,
            "headers": {"path": str(hdr.path), "release": hdr.release, "matches": hdr.matches} if hdr else None,
            "bcc_version": self.bcc_version,
            "limits": {b: self.limits(b) for b in ("kprobe", "tracepoint")},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "KernelFacts":
        if not isinstance(data, dict) or data.get("format") != FACTS_FORMAT:
            raise EnvironmentProblem(f"not routetrace kernel facts (format {FACTS_FORMAT}): "
                                     f"{str(data)[:60]!r}")
        hdr = data.get("headers")
        return cls(
            release=data["release"], is_root=data.get("is_root", False), btf=data["btf"],
            tracefs=Path(data["tracefs"]) if data.get("tracefs") else None,
            kprobes=data["kprobes"], tracepoints=dict(data.get("tracepoints", {})),
            symbols=dict(data.get("symbols", {})),
            headers=Headers(Path(hdr["path"]), hdr["release"], hdr["matches"]) if hdr else None,
            bcc_version=data.get("bcc_version"), fib_name_data_loc=data.get("fib_name_data_loc", False),
            raw_tracepoints=data.get("raw_tracepoints", False),
            btf_tracepoints=data.get("btf_tracepoints", False),
            packet_casts=data.get("packet_casts", False),
            bpf_skips_pid1=data.get("bpf_skips_pid1", False),
            tracepoint_fields={tp: dict(f) for tp, f in data.get("tracepoint_fields", {}).items()},
        )

    @classmethod
    def load(cls, path: Path) -> "KernelFacts":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise EnvironmentProblem(f"cannot read kernel facts from {path}: {exc}") from None


def gather(prepare_headers: bool = False) -> KernelFacts:
    release = os.uname().release
    tracefs = find_tracefs()
    return KernelFacts(
        release=release,
        is_root=os.geteuid() == 0,
        btf=VMLINUX_BTF.exists(),
        tracefs=tracefs,
        kprobes=_kprobes_available(tracefs),
        tracepoints={tp: bool(tracefs and (tracefs / "events" / tp / "format").exists()) for tp in TRACEPOINTS},
        symbols=read_symbols(SYMBOLS),
        headers=find_headers(release, prepare=prepare_headers),
        bcc_version=bcc_version(),
        fib_name_data_loc=_field_is_data_loc(tracefs, "fib/fib_table_lookup", "name"),
        raw_tracepoints=bool(read_symbols(RAW_TRACEPOINT_SYMBOLS)),
        **_typed_programs(),
        bpf_skips_pid1=_bpf_skips_pid1(),
        tracepoint_fields={tp: fields for tp in TRACEPOINTS
                           if (fields := tracepoint_fields(tracefs, tp)) is not None},
    )


def _typed_programs(tracepoint: str = "net_dev_queue") -> dict[str, bool]:
    """btf_tracepoints and packet_casts, asked of the kernel itself, with the ids both need from
    one walk of its BTF. btf_tracepoints: a two-instruction program (BTF, 5.5+ and the privilege to
    load tracing programs -- some machines refuse fentry yet take this, others may refuse both).
    packet_casts: one that casts its skb pointer with bpf_rdonly_cast and reads through the result
    (the kfunc is 6.2+, and its BTF must be there)."""
    none = {"btf_tracepoints": False, "packet_casts": False}
    if os.geteuid() != 0 or not VMLINUX_BTF.exists():
        return none
    from .bpfsys import btf_tracepoint_loads, packet_cast_loads
    from .btf import KIND_FUNC, KIND_STRUCT, KIND_TYPEDEF, type_ids
    typedef = "btf_trace_" + tracepoint
    try:
        ids = type_ids({typedef: KIND_TYPEDEF, "bpf_rdonly_cast": KIND_FUNC, "iphdr": KIND_STRUCT})
    except EnvironmentProblem:
        return none
    if typedef not in ids or not btf_tracepoint_loads(ids[typedef]):
        return none
    return {"btf_tracepoints": True,
            "packet_casts": len(ids) == 3 and packet_cast_loads(ids[typedef], ids["bpf_rdonly_cast"], ids["iphdr"])}


def _bpf_skips_pid1() -> bool:
    """The patch's mark in BTF: a member no upstream kernel has (README, Limits)."""
    if not VMLINUX_BTF.exists():
        return False
    from .btf import struct_has_member
    try:
        return struct_has_member("bpf_prog_aux", "init_owned")
    except EnvironmentProblem:
        return False


_FIELD_LINE = re.compile(r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);", re.M)
_DECL = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>\w+)\s*(?P<dim>\[[^\]]*\])?$")


def parse_format(text: str) -> dict[str, dict]:
    """A tracefs format file's own fields: name -> {"type", "offset", "size"}; common_* left out.
    A __data_loc field's type keeps that word ("__data_loc char[]")."""
    fields = {}
    for m in _FIELD_LINE.finditer(text):
        decl = m.group("decl").strip()
        d = _DECL.match(decl)
        if not d:
            continue
        name = d.group("name")
        if name.startswith("common_"):
            continue
        fields[name] = {"type": (d.group("type") + (d.group("dim") or "")).strip(),
                        "offset": int(m.group("offset")), "size": int(m.group("size"))}
    return fields


def tracepoint_fields(tracefs: Path | None, tracepoint: str) -> dict[str, dict] | None:
    """The fields of a tracepoint, or None when it (or tracefs) is not there."""
    try:
        return parse_format((tracefs / "events" / tracepoint / "format").read_text()) if tracefs else None
    except OSError:
        return None


def _field_is_data_loc(tracefs: Path | None, tracepoint: str, field_name: str) -> bool:
    try:
        fmt = (tracefs / "events" / tracepoint / "format").read_text() if tracefs else ""
    except OSError:
        return False
    return re.search(rf"field:__data_loc [^;]*\b{field_name};", fmt) is not None


def find_tracefs() -> Path | None:
    for path in TRACEFS_CANDIDATES:
        if (path / "events").is_dir():
            return path
    return None


def mount_tracefs() -> Path:
    """Mount tracefs (and debugfs, where bcc 0.26 reads tracepoint formats) when missing."""
    path = find_tracefs()
    if path is None:
        subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
                       capture_output=True, check=False)
    if not Path("/sys/kernel/debug/tracing/events").is_dir():
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"],
                       capture_output=True, check=False)
    path = find_tracefs()
    if path is None:
        raise EnvironmentProblem("tracefs is not mounted and could not be mounted at /sys/kernel/tracing")
    return path


def _kprobes_available(tracefs: Path | None) -> bool:
    if Path("/sys/bus/event_source/devices/kprobe/type").exists():
        return True
    return bool(tracefs and (tracefs / "kprobe_events").exists())


def read_symbols(names, kallsyms: Path = Path("/proc/kallsyms")) -> dict[str, str]:
    wanted, found = set(names), {}
    try:
        with kallsyms.open() as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in wanted and len(parts) == 3:
                    # A global definition wins over a local copy of the same name.
                    if found.get(parts[2]) != "T":
                        found[parts[2]] = parts[1]
    except OSError:
        pass
    return found


class BccVersion(str):
    """bcc's version, as a string, that also says where bcc came from: `path` (the imported
    module's folder) and `package` (the Debian package owning it, or None for pip/source)."""
    path: str | None = None
    package: str | None = None

    def origin(self) -> str:
        where = self.path or "?"
        return f"{where} (Debian package {self.package})" if self.package else f"{where} (not from a Debian package)"


def bcc_version() -> BccVersion | None:
    """bcc's version when `import bcc` works (the library loads too), else None."""
    try:
        import bcc  # noqa: PLC0415 - only to ask; tracer.py is where it is used
    except Exception:    # ImportError, or OSError when libbcc itself cannot be loaded
        return None
    path = os.path.dirname(getattr(bcc, "__file__", None) or "") or None
    package, package_version = None, None
    if path:
        try:
            owner = subprocess.run(["dpkg-query", "-S", os.path.join(path, "__init__.py")],
                                   capture_output=True, text=True, check=False, timeout=10)
            if owner.returncode == 0 and ":" in owner.stdout:
                package = owner.stdout.split(":", 1)[0].strip()
                ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                     capture_output=True, text=True, check=False, timeout=10)
                package_version = ver.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    version = getattr(bcc, "__version__", None) or package_version or "unknown version"
    info = BccVersion(str(version))
    info.path, info.package = path, package
    return info


def _has_headers(path: Path) -> bool:
    return (path / "include").is_dir() or (path / "arch").is_dir()


def _release_key(release: str):
    return [int(x) for x in re.findall(r"\d+", release)]


def find_headers(release: str, modules: Path = Path("/lib/modules"), prepare: bool = False,
                 cache: Path = HEADER_CACHE) -> Headers | None:
    """The headers bcc will compile with: the running kernel's when present, else the newest others."""
    own = modules / release / "build"
    if _has_headers(own):
        return Headers(own, release, True)
    candidates = sorted((d for d in modules.glob("*") if _has_headers(d / "build")),
                        key=lambda d: _release_key(d.name), reverse=True)
    if not candidates:
        return None
    chosen = candidates[0]
    build, source = (chosen / "build").resolve(), (chosen / "source").resolve()
    if not (chosen / "source").exists() or source == build:
        return Headers(build, chosen.name, False)
    # Debian splits headers into an arch tree (build) and a common tree (source); with
    # BCC_KERNEL_SOURCE bcc takes one tree, so give it one made of links to both.
    merged = cache / chosen.name
    if prepare and not (merged / ".complete").exists():
        merge_header_trees(source, build, merged)
    return Headers(merged, chosen.name, False)


def merge_header_trees(common: Path, arch: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    for tree in (common, arch):   # arch-specific files override common ones
        subprocess.run(["cp", "-as", "--remove-destination", f"{tree}/.", str(tmp)], check=True)
    (tmp / ".complete").write_text(f"{common}\n{arch}\n")
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    tmp.rename(dest)
