"""Trace files: versioned JSON lines, written as the trace runs and read back strictly.

    {"type":"header", "format":"routetrace-trace", "version":1, ...}   first line
    {"type":"netns", "netns":4026531840, "name":null, "addresses":[...]}   as namespaces are met
    {"type":"flow", ...}        the same objects --json prints; a later one for the same flow
                                (netns, proto, addresses, ports) replaces an earlier one
    {"type":"trailer", ...}     last line, on every orderly stop

Versioning: readers accept any version up to their own; a new optional field does not bump
the version, a change in meaning or a new required field does.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from dataclasses import MISSING, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Iterable

from . import __version__
from .errors import TraceFileError
from .events import Flow, FlowKey, LossCounters
from .flows import Aggregate, FlowTable

FORMAT = "routetrace-trace"
VERSION = 1
MINOR = 1        # 1.1: IPv6, device identity, exact accounting (fields added; records "fold", "aggregate", "loss")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class TraceWriter:
    """Appends records and flushes each batch, so a crash loses at most what the last second saw."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if self.path.is_symlink():
                raise TraceFileError(f"{self.path} is a symbolic link; refusing to write a trace through it") from None
            raise TraceFileError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)              # O_TRUNC on an existing file keeps its old mode
            uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
            if uid and uid.isdigit() and os.geteuid() == 0:
                os.fchown(fd, int(uid), int(gid) if gid and gid.isdigit() else -1)
        except OSError:
            os.close(fd)
            raise
        self._fh = os.fdopen(fd, "w", encoding="utf-8")
        self.error: str | None = None

    def write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def header(self, *, kernel: str, plan: dict, filters: dict, start_ns: int, **extra) -> None:
        self.write({"type": "header", "format": FORMAT, "version": VERSION, "minor": MINOR,
                    "tool_version": __version__, "kernel": kernel, "hostname": socket.gethostname(),
                    "plan": plan, "filters": filters, "start_time": _now_iso(), "start_ns": start_ns,
                    "clock_offset_ns": time.time_ns() - start_ns, **extra})
        self.flush()

    def netns(self, inode: int, name: str | None, addresses: Iterable[str]) -> None:
        self.write({"type": "netns", "netns": inode, "name": name, "addresses": sorted(addresses)})

    def flows(self, flows: Iterable[Flow]) -> None:
        """Snapshots of flows that changed (the session keeps track of which)."""
        for flow in flows:
            self.write(flow.to_dict())

    def fold(self, key) -> None:
        """The live table let this flow go: its counts continue in aggregate records."""
        self.write({"type": "fold", "netns": key.netns, "proto": key.proto, "saddr": key.saddr,
                    "sport": key.sport, "daddr": key.daddr, "dport": key.dport})

    def aggregates(self, aggregates) -> None:
        for agg in aggregates:
            self.write(agg.to_dict())

    def loss(self, losses: LossCounters) -> None:
        self.write({"type": "loss", "lost": losses.to_dict()})

    def trailer(self, losses: LossCounters, flows: int = 0, folded: int = 0) -> None:
        self.write({"type": "trailer", "end_time": _now_iso(), "lost": losses.to_dict(),
                    "flows": flows, "folded": folded})
        self.flush()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


# ---- reading ---------------------------------------------------------------------------

_FLOW_TYPES = {"str": str, "int": int, "str | None": (str, type(None)), "int | None": (int, type(None)),
               "dict[str, int]": dict, "bool | None": (bool, type(None)), "list[dict]": list}


@dataclass
class Trace:
    header: dict
    flows: list[Flow]
    addresses: dict[int, set[str]] = field(default_factory=dict)
    trailer: dict | None = None
    torn_last_line: bool = False
    table: FlowTable | None = None

    @property
    def complete(self) -> bool:
        return self.trailer is not None

    @property
    def losses(self) -> LossCounters | None:
        if self.trailer is None:
            return None
        return LossCounters.from_dict(self.trailer["lost"])

    def own_addresses(self, netns: int) -> set[str]:
        return self.addresses.get(netns, set())


_HEADER_FIELDS = {"tool_version": str, "kernel": str, "hostname": str, "plan": dict, "filters": dict,
                  "start_time": str}


def _flow_from(obj: dict, where: str) -> Flow:
    types = Flow.field_types()
    fields = {k: v for k, v in obj.items() if k != "type"}
    required = {f.name for f in dataclass_fields(Flow)
                if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(fields))
    if missing:
        raise TraceFileError(f"{where}: flow is missing field {missing[0]!r}")
    extra = sorted(set(fields) - set(types))
    if extra:
        raise TraceFileError(f"{where}: flow has unknown field {extra[0]!r}")
    for name, value in fields.items():
        want = _FLOW_TYPES[types[name]]
        if (isinstance(value, bool) and bool not in (want if isinstance(want, tuple) else (want,))) \
                or not isinstance(value, want):
            raise TraceFileError(f"{where}: flow field {name!r} has the wrong type ({type(value).__name__})")
        if types[name] == "dict[str, int]" and not all(
                isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) for k, n in value.items()):
            raise TraceFileError(f"{where}: flow field {name!r} must map device names to packet counts")
    for name in ("saddr", "daddr"):
        try:
            ipaddress.ip_address(fields[name])
        except ValueError:
            raise TraceFileError(f"{where}: flow field {name!r} is not an IP address: {fields[name]!r}") from None
    for name in ("sport", "dport"):
        _check(0 <= fields[name] <= 65535, where, f"flow field {name!r} is not a port number")
    for name in ("packets", "bytes", "first_ns", "last_ns", "netns", "pid"):
        _check(fields[name] >= 0, where, f"flow field {name!r} is negative")
    return Flow(**fields)


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise TraceFileError(f"{where}: {message}")


def read_trace(path: str | os.PathLike) -> Trace:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise TraceFileError(f"{path} is a directory, not a trace file") from None
    except OSError as exc:
        raise TraceFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise TraceFileError(f"{path}:{line}: not UTF-8 text; is this a routetrace trace?") from None
    lines = text.split("\n")
    torn = False
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        # A last line without its newline is what a killed writer leaves: drop it if unreadable.
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
            torn = True
    if not lines:
        raise TraceFileError(f"{path}: empty file, not a routetrace trace")

    table, addresses, header, trailer = FlowTable(limit=None), {}, None, None
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError:
            raise TraceFileError(f"{where}: corrupt line (not JSON)") from None
        _check(isinstance(obj, dict) and isinstance(obj.get("type"), str), where, "a record must be a JSON object with a \"type\"")
        kind = obj["type"]
        _check(trailer is None, where, "record after the trailer")
        if number == 1:
            _check(kind == "header", where, f"the first record must be the header, not {kind!r}")
            _check(obj.get("format") == FORMAT, where, f"unknown format {obj.get('format')!r} (expected {FORMAT!r})")
            version = obj.get("version")
            _check(isinstance(version, int) and not isinstance(version, bool) and version >= 1, where,
                   f"bad format version {version!r}")
            _check(version <= VERSION, where,
                   f"format version {version} is newer than this routetrace reads ({VERSION}): upgrade routetrace")
            for name, want in _HEADER_FIELDS.items():
                _check(isinstance(obj.get(name), want), where, f"header field {name!r} is missing or not a {want.__name__}")
            _check(isinstance(obj["plan"].get("backend"), str), where, "header plan has no backend")
            header = obj
        elif kind == "flow":
            table.update(_flow_from(obj, where))
        elif kind == "netns":
            inode, addrs = obj.get("netns"), obj.get("addresses")
            _check(isinstance(inode, int) and isinstance(addrs, list) and all(isinstance(a, str) for a in addrs),
                   where, "netns record needs an integer \"netns\" and a list of \"addresses\"")
            addresses[inode] = set(addrs)
        elif kind == "trailer":
            lost = obj.get("lost")
            _check(isinstance(lost, dict) and all(isinstance(lost.get(k, 0), int) for k in LossCounters().__dict__),
                   where, "trailer needs integer loss counters")
            trailer = obj
        elif kind == "fold":
            try:
                table.drop(FlowKey(obj["netns"], obj["proto"], obj["saddr"], obj["sport"], obj["daddr"], obj["dport"]))
            except (KeyError, TypeError):
                raise TraceFileError(f"{where}: fold record needs the flow's key") from None
        elif kind == "aggregate":
            try:
                table.set_aggregate(Aggregate.from_dict(obj))
            except (KeyError, TypeError):
                raise TraceFileError(f"{where}: aggregate record is missing fields") from None
        elif kind == "loss":
            pass
        else:
            raise TraceFileError(f"{where}: unknown record type {kind!r}")
    return Trace(header, list(table), addresses, trailer, torn, table)
