"""Trace files: versioned JSON lines, written as the trace runs and read back strictly.

    {"type":"header", "format":"routetrace-trace", "version":1, "minor":2, ...}   first line
    {"type":"netns", "netns":4026531840, "name":null, "addresses":[...]}   as namespaces are met
    {"type":"flow", ...}        the same objects --json prints; a later one for the same flow
                                (netns, proto, addresses, ports) replaces an earlier one
    {"type":"fold", ...}        the live table let a flow go; its counts go on in "aggregate"s
    {"type":"aggregate", ...}   counts of folded flows by destination and device
    {"type":"loss", ...}        loss counters as they grew
    {"type":"trailer", ...}     last line, on every orderly stop

Versioning: readers accept any version up to their own; a new optional field does not bump
the version (readers keep fields they do not know: a flow's go to `flow.extra` and are written
back by `export --format json`), a new record type bumps the minor (readers of an older minor
skip and count it), a change in meaning or a new required field bumps the version.

Safety: routetrace runs as root. The writer creates its file as the invoking user would
(O_CREAT|O_EXCL|O_NOFOLLOW, walking the path with directory fds, never following a symbolic link
owned by someone else), refuses existing files unless forced, and turns a write error into
`writer.error` instead of an exception. The reader streams: memory does not grow with the
file, lines are bounded, and every malformed input is a TraceFileError naming path:line.
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import json
import math
import os
import socket
import stat
import sys
import time
from dataclasses import MISSING, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Iterable, Iterator

from . import __version__
from .errors import TraceFileError
from .events import Flow, FlowKey, LossCounters
from .flows import Aggregate, AggregateKey, FlowTable
from .sanitize import text

FORMAT = "routetrace-trace"
VERSION = 1
MINOR = 3        # 1.1: IPv6, device identity, exact accounting (fields added; records "fold", "aggregate", "loss")
                 # 1.2: lost counters gain "route_unpaired" (the kprobe plan's unpaired route lookups)
                 # 1.3: lost gains "uncountable": what the kernel loses with no counter (statements)

# The exit status of a live command whose recording stopped early (disk full, I/O error):
# tracing and the summary went on, the file lacks what came after the error.
EXIT_RECORDING_INCOMPLETE = 3


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- creating files safely -------------------------------------------------------------

def file_owner() -> tuple[int, int]:
    """Whose file a new trace or export is: the sudo user's when root runs on their behalf,
    else the caller's."""
    if os.geteuid() == 0:
        uid, gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
        if uid.isdigit() and int(uid) != 0:
            if gid.isdigit():
                return int(uid), int(gid)
            try:
                import pwd
                return int(uid), pwd.getpwuid(int(uid)).pw_gid
            except (KeyError, ImportError):
                return int(uid), int(uid)
    return os.getuid(), os.getgid()


_MAX_SYMLINKS = 40


def _refuse(path: str, message: str) -> TraceFileError:
    return TraceFileError(text(f"{path} {message}"))     # both may hold a user's bytes


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _walk_to_parent(path: str, uid: int) -> tuple[int, str]:
    """A directory fd for `path`'s parent and the last component, reached component by
    component with O_NOFOLLOW: a symbolic link is followed only when root or `uid` owns it."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or parts[-1] == "..":
        raise _refuse(path, "is a directory, not a file")
    name, todo = parts[-1], parts[:-1]
    fd = os.open("/" if path.startswith("/") else ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    links = 0
    try:
        while todo:
            part = todo.pop(0)
            try:
                new = _open_dir(part, fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(path, f"cannot be created: {part}: {exc.strerror}") from None
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise _refuse(path, f"cannot be created: {part} is not a directory") from None
                if st.st_uid not in (0, uid):
                    raise _refuse(path, f"goes through {part}, a symbolic link owned by another user "
                                        f"(uid {st.st_uid}); refusing to follow it") from None
                links += 1
                if links > _MAX_SYMLINKS:
                    raise _refuse(path, "cannot be created: too many levels of symbolic links") from None
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            os.close(fd)
            fd = new
        return fd, name
    except BaseException:
        os.close(fd)
        raise


def looks_like_trace(head: bytes) -> bool:
    """Whether a file starting with `head` is a routetrace trace (what --force may replace)."""
    first = head.split(b"\n", 1)[0]
    try:
        obj = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("type") == "header" and obj.get("format") == FORMAT


def _create(path: str, force: bool, uid: int, replaceable=looks_like_trace, what: str = "a routetrace trace"
            ) -> tuple[int, bool]:
    """Open `path` for writing as this process: (fd, created). Never follows a final symbolic
    link, never opens a FIFO or device; replaces only with `force`, and then only an empty or
    `replaceable` regular file with one link that `uid` owns (even root's --force never
    replaces /etc/shadow)."""
    dir_fd, name = _walk_to_parent(path, uid)
    try:
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600, dir_fd=dir_fd), True
        except FileExistsError:
            pass
        except OSError as exc:
            raise _refuse(path, f"cannot be created: {exc.strerror}") from None
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise _refuse(path, f"cannot be created: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(path, "is a symbolic link; refusing to write a trace through it")
        if not force:
            raise _refuse(path, "already exists; refusing to overwrite it (--force replaces a regular file you own)")
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "is not a regular file (a FIFO, device, socket or directory); refusing to write to it")
        if st.st_uid != uid:
            raise _refuse(path, f"belongs to uid {st.st_uid}, not to you (uid {uid}); refusing to replace it")
        if st.st_nlink != 1:
            raise _refuse(path, f"has {st.st_nlink} hard links; refusing to replace it")
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise _refuse(path, f"cannot be opened: {exc.strerror}") from None
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode) \
                or now.st_uid != uid or now.st_nlink != 1:
            os.close(fd)
            raise _refuse(path, "changed while it was being opened; refusing to write to it")
        head = os.pread(fd, 4096, 0)
        if head and not replaceable(head):
            os.close(fd)
            raise _refuse(path, f"is not {what}; --force replaces only those (remove it yourself if you mean it)")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
        return fd, False
    finally:
        os.close(dir_fd)


def _create_as(path: str, force: bool, uid: int, gid: int, replaceable, what: str) -> tuple[int, bool]:
    """`_create` in a child process that is `uid` (with its groups): the kernel then checks
    every directory's permissions for that user, and the new file is theirs without a chown."""
    try:
        import pwd
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, ImportError):
        groups = [gid]
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:                                         # the child: no Python cleanup, ever
        status = 0
        try:
            parent.close()
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                fd, created = _create(path, force, uid, replaceable, what)
            except TraceFileError as exc:
                child.sendall(json.dumps(["error", str(exc)]).encode())
            else:
                socket.send_fds(child, [json.dumps(["ok", created]).encode()], [fd])
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    child.close()
    try:
        msg, fds, _flags, _addr = socket.recv_fds(parent, 65536, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if not msg:
        raise _refuse(path, "cannot be created (the helper that opens it as you failed)")
    kind, value = json.loads(msg)
    if kind == "error" or len(fds) != 1 or not stat.S_ISREG(os.fstat(fds[0]).st_mode):
        for fd in fds:
            os.close(fd)
        if kind == "error" and "Permission denied" in value:
            value += f" (as uid {uid}, the user sudo runs routetrace for)"
        raise TraceFileError(value if kind == "error" else f"{text(path)} cannot be created")
    return fds[0], bool(value)


def create_private(path: str | os.PathLike, force: bool = False, replaceable=looks_like_trace,
                   what: str = "a routetrace trace") -> tuple[int, bool]:
    """A writable fd for a new file at `path`, mode 0600, owned by whoever the file is for
    (see `file_owner`); (fd, True when it was created, False when --force replaced it).
    Refusals are TraceFileError (one line, exit 2)."""
    path = os.fspath(path)
    if not path:
        raise TraceFileError("no file name given")
    uid, gid = file_owner()
    if os.geteuid() == 0 and uid != 0:
        return _create_as(path, force, uid, gid, replaceable, what)
    return _create(path, force, uid, replaceable, what)


# ---- writing ---------------------------------------------------------------------------

class TraceWriter:
    """Appends records and flushes each batch, so a crash loses at most what the last second
    saw. A write error (disk full, I/O error) stops the recording, not the trace: `error` says
    why, one line goes to stderr, and every later call is a no-op that counts what it dropped."""

    BUFFER_BYTES = 64 * 1024

    def __init__(self, path: str | os.PathLike, force: bool = False, err=None):
        self.path = Path(path)
        self._fd, self.created = create_private(path, force)
        self._buf: list[bytes] = []
        self._buffered = 0
        self._err = err
        self.error: str | None = None
        self.records = 0             # records written to the file
        self.dropped = 0             # records not written because of `error`

    def write(self, obj: dict) -> None:
        if self.error is not None:
            self.dropped += 1
            return
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")
        self._buf.append(line)
        self._buffered += len(line)
        if self._buffered >= self.BUFFER_BYTES:
            self.flush()

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
        if self.error is not None or not self._buf:
            return
        data = b"".join(self._buf)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as exc:
            whole = 0
            for line in self._buf:           # records whose every byte reached the file
                if done < len(line):
                    break
                done -= len(line)
                whole += 1
            self.records += whole
            self._fail(exc, len(self._buf) - whole)
            return
        self.records += len(self._buf)
        self._buf.clear()
        self._buffered = 0

    def _fail(self, exc: OSError, lost: int) -> None:
        self._buf.clear()
        self._buffered = 0
        self.dropped += lost
        self.error = f"cannot write {text(self.path)}: {exc.strerror or exc}"
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
        print(f"routetrace: recording stopped: {self.error}; {lost} record{'s' if lost != 1 else ''} not "
              f"written, nor any after them (tracing goes on; {self.records} records were written)",
              file=self._err or sys.stderr, flush=True)

    def close(self) -> None:
        if self._fd < 0:
            return
        self.flush()
        if self.error is None:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:
                self._fd = fd
                self._fail(exc, 0)


# ---- reading ---------------------------------------------------------------------------

MAX_LINE_BYTES = 1 << 20        # a flow record is well under 4 KiB
MAX_DEPTH = 32                  # records nest 3 deep; leave room for a newer minor's fields
U64 = 1 << 64
MAX_UNKNOWN_TYPES = 64

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
    unknown_records: dict[str, int] = field(default_factory=dict)   # a newer minor's record types, counted

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


class _Bad(ValueError):
    """A record that is not what the format says; the reader adds path:line."""


def _parse_float(s: str) -> float:
    value = float(s)
    if not math.isfinite(value):
        raise _Bad("a number is out of range")
    return value


def _parse_constant(s: str):
    raise _Bad(f"{s} is not a JSON number")


# Integers parse as Python ints (past 4300 digits int() refuses: a corrupt line); the fields that
# are counts are then checked against u64.
_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_constant=_parse_constant)


def _check_value(obj) -> None:
    """Nesting and strings of a parsed record: bounded depth, every string valid Unicode."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Bad("a string is not valid Unicode (a lone surrogate)") from None
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _Bad(f"nested more than {MAX_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str):
                    stack.append((k, depth))
                stack.append((v, depth + 1))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value, what: str, lo: int = 0, hi: int = U64) -> int:
    if not _is_int(value):
        raise _Bad(f"{what} is not an integer ({type(value).__name__})")
    if not lo <= value < hi:
        raise _Bad(f"{what} is out of range ({value})")
    return value


def _string(value, what: str, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Bad(f"{what} is not a string ({type(value).__name__})")
    return value


@functools.lru_cache(maxsize=4096)
def _parse_address(value: str) -> tuple[int, str] | None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    return addr.version, str(addr)


def _address(value, what: str, family: int | None = None) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is not an IP address ({type(value).__name__})")
    parsed = _parse_address(value)
    if parsed is None:
        raise _Bad(f"{what} is not an IP address: {value!r}")
    if family is not None and parsed[0] != family:
        raise _Bad(f"{what} {value!r} is not an IPv{family} address (family {family})")
    return parsed[1]


def _family(value, what: str) -> int:
    if value not in (4, 6) or isinstance(value, bool):
        raise _Bad(f"{what} must be 4 or 6, not {value!r}")
    return value


_FLOW_COUNTS = ("packets", "bytes", "first_ns", "last_ns", "netns", "pid", "segments", "fragments",
                "fib_table", "route_ifindex", "fib_ifindex")


def _device(d, where_field: str) -> dict:
    if not isinstance(d, dict):
        raise _Bad(f"{where_field} must hold objects")
    _string(d.get("name"), f"{where_field} name")
    _count(d.get("packets"), f"{where_field} packets")
    for k in ("segments", "bytes"):
        if k in d:
            _count(d[k], f"{where_field} {k}")
    if not isinstance(d.get("loopback"), bool):
        raise _Bad(f"{where_field} loopback must be true or false")
    if d.get("ifindex") is not None:
        _count(d["ifindex"], f"{where_field} ifindex", hi=1 << 32)
    return d


_FLOW_SCHEMA: tuple[dict, frozenset] | None = None


def _flow_schema() -> tuple[dict, frozenset]:
    """{field: (accepted types, whether bool is one of them)} and the required fields."""
    global _FLOW_SCHEMA
    if _FLOW_SCHEMA is None:
        checks = {}
        for name, kind in Flow.field_types().items():
            want = _FLOW_TYPES[kind]
            checks[name] = (want, bool in (want if isinstance(want, tuple) else (want,)))
        _FLOW_SCHEMA = (checks, frozenset(f.name for f in dataclass_fields(Flow)
                                          if f.default is MISSING and f.default_factory is MISSING))
    return _FLOW_SCHEMA


def _flow_from(obj: dict) -> Flow:
    checks, required = _flow_schema()
    known, extra = {}, {}
    for name, value in obj.items():
        check = checks.get(name)
        if check is None:
            if name != "type":
                extra[name] = value              # a newer writer's field: kept, written back
            continue
        if not isinstance(value, check[0]) or (value.__class__ is bool and not check[1]):
            raise _Bad(f"flow field {name!r} has the wrong type ({type(value).__name__})")
        known[name] = value
    if not required <= known.keys():
        raise _Bad(f"flow is missing field {sorted(required - known.keys())[0]!r}")
    for k, n in known.get("xmit_devs", {}).items():
        if not (isinstance(k, str) and n.__class__ is int and 0 <= n < U64):
            raise _Bad("flow field 'xmit_devs' must map device names to packet counts")
    if "family" in known:
        family = _family(known["family"], "flow field 'family'")
    else:                                # format 1.0 wrote no family: the addresses tell
        _address(known["daddr"], "flow field 'daddr'")
        family = _parse_address(known["daddr"])[0]
        known["family"] = family
    known["saddr"] = _address(known["saddr"], "flow field 'saddr'", family)
    known["daddr"] = _address(known["daddr"], "flow field 'daddr'", family)
    for name in ("sport", "dport"):
        if not 0 <= known[name] < 65536:
            raise _Bad(f"flow field {name!r} is out of range ({known[name]})")
    for name in _FLOW_COUNTS:            # types were checked above: ints (None where allowed)
        value = known.get(name)
        if value is not None and not 0 <= value < U64:
            raise _Bad(f"flow field {name!r} is out of range ({value})")
    for d in known.get("devices", ()):
        _device(d, "flow field 'devices'")
    return Flow(**known, extra=extra)


def _key_from(obj: dict) -> FlowKey:
    _address(obj.get("daddr"), "fold daddr")
    family = _parse_address(obj["daddr"])[0]
    return FlowKey(_count(obj.get("netns"), "fold netns"), _string(obj.get("proto"), "fold proto"),
                   _address(obj.get("saddr"), "fold saddr", family), _count(obj.get("sport"), "fold sport", hi=65536),
                   _address(obj.get("daddr"), "fold daddr", family), _count(obj.get("dport"), "fold dport", hi=65536))


def _aggregate_from(obj: dict) -> Aggregate:
    family = _family(obj.get("family"), "aggregate family")
    if not isinstance(obj.get("loopback"), bool):
        raise _Bad("aggregate loopback must be true or false")
    key = AggregateKey(netns=_count(obj.get("netns"), "aggregate netns"), family=family,
                       proto=_string(obj.get("proto"), "aggregate proto"),
                       daddr=_address(obj.get("daddr"), "aggregate daddr", family),
                       route_type=_string(obj.get("route_type"), "aggregate route_type"),
                       route_dev=_string(obj.get("route_dev"), "aggregate route_dev"),
                       dev=_string(obj.get("dev"), "aggregate dev"),
                       ifindex=_count(obj.get("ifindex"), "aggregate ifindex", hi=1 << 32),
                       loopback=obj["loopback"])
    return Aggregate(key, *(_count(obj.get(k), f"aggregate {k}") for k in ("flows", "packets", "segments", "bytes")),
                     fib_dev=_string(obj.get("fib_dev"), "aggregate fib_dev", optional=True))


_LOSS_FIELDS = {f.name for f in dataclass_fields(LossCounters)} - {"uncountable"}
MAX_UNCOUNTABLE = 16             # statements a loss record may carry (the plans have at most two)


def _lost(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{what} needs loss counters (an object)")
    for k in _LOSS_FIELDS:
        if k in value:
            _count(value[k], f"{what} counter {k!r}")
    statements = value.get("uncountable", [])
    if not isinstance(statements, list) or len(statements) > MAX_UNCOUNTABLE:
        raise _Bad(f"{what}: 'uncountable' must be a list of at most {MAX_UNCOUNTABLE} statements")
    for s in statements:
        _string(s, f"{what} uncountable statement")
    return value


_HEADER_FIELDS = {"tool_version": str, "kernel": str, "hostname": str, "plan": dict, "filters": dict,
                  "start_time": str}


def _header(obj: dict) -> int:
    """Checks the header; returns its minor version."""
    if obj.get("type") != "header":
        raise _Bad(f"the first record must be the header, not {obj.get('type')!r}")
    if obj.get("format") != FORMAT:
        raise _Bad(f"unknown format {obj.get('format')!r} (expected {FORMAT!r})")
    version = obj.get("version")
    if not _is_int(version) or version < 1:
        raise _Bad(f"bad format version {version!r}")
    if version > VERSION:
        raise _Bad(f"format version {version} is newer than this routetrace reads ({VERSION}): upgrade routetrace")
    minor = obj.get("minor", 0)
    _count(minor, "header field 'minor'")
    for name, want in _HEADER_FIELDS.items():
        if not isinstance(obj.get(name), want):
            raise _Bad(f"header field {name!r} is missing or not a {want.__name__}")
    if not isinstance(obj["plan"].get("backend"), str):
        raise _Bad("header plan has no backend")
    return minor


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(number, line, ended by a newline), one at a time; refuses what is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise TraceFileError(f"{text(path)} is a directory, not a trace file") from None
    except OSError as exc:
        raise TraceFileError(f"cannot read {text(path)}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise TraceFileError(f"{text(path)} is a directory, not a trace file")
        if not stat.S_ISREG(st.st_mode):
            raise TraceFileError(f"{text(path)} is not a regular file (a FIFO or device); refusing to read it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=1 << 20) as fh:
        number = 0
        while True:
            try:
                raw = fh.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise TraceFileError(f"{text(path)}:{number + 1}: cannot read: {exc.strerror}") from None
            if not raw:
                return
            number += 1
            ended = raw.endswith(b"\n")
            if len(raw) > MAX_LINE_BYTES and not (ended and len(raw) == MAX_LINE_BYTES + 1):
                raise TraceFileError(f"{text(path)}:{number}: line longer than {MAX_LINE_BYTES // (1 << 20)} MiB; "
                                     "not a routetrace trace")
            yield number, raw[:-1] if ended else raw, ended


def _decode(raw: bytes) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("not UTF-8 text; is this a routetrace trace?") from None
    try:
        obj = _DECODER.decode(line)
    except _Bad:
        raise
    except RecursionError:
        raise _Bad(f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:                   # JSONDecodeError, and int() past Python's digit limit
        raise _Bad("corrupt line (not JSON)") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise _Bad("a record must be a JSON object with a \"type\"")
    # The walk costs more than the parse: skip it when the bytes show it cannot find anything
    # (fewer brackets than the depth limit, no \uD800-\uDFFF escape that could be a lone surrogate).
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH or b"\\ud" in raw or b"\\uD" in raw:
        _check_value(obj)
    return obj


READER_MAX_FLOWS = 1_000_000


def _reader_limit(header: dict) -> int:
    """The reader's table bound: twice what the live table kept (its fold records keep a replay
    well below), and never more than READER_MAX_FLOWS, so a crafted file of unique flows cannot
    exhaust memory: past the bound flows fold into aggregates, as they did live."""
    keep = header.get("keep_flows")
    if not _is_int(keep) or keep <= 0:
        return READER_MAX_FLOWS
    return min(READER_MAX_FLOWS, max(2 * keep, 1000))


def read_trace(path: str | os.PathLike) -> Trace:
    """The trace at `path`, read line by line: memory grows with the flows the live table held,
    never with the file. Any malformed input is a TraceFileError naming path:line."""
    path = Path(path)
    table, addresses, unknown = FlowTable(limit=None), {}, {}
    state = {"header": None, "trailer": None, "minor": 0}
    torn = False

    def apply(obj: dict) -> None:
        if state["trailer"] is not None:
            raise _Bad("record after the trailer")
        if state["header"] is None:
            state["minor"] = _header(obj)
            state["header"] = obj
            table.limit = _reader_limit(obj)
        else:
            state["trailer"] = _record(obj, table, addresses, state["minor"], unknown) or state["trailer"]

    for number, raw, ended in _lines(path):
        where = f"{text(path)}:{number}"
        obj = None
        try:
            try:
                obj = _decode(raw)
            except _Bad:
                if not ended:            # a last line a killed writer tore: dropped, and reported
                    torn = True
                    break
                raise
            apply(obj)
        except _Bad as exc:
            raise TraceFileError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
            kind = obj.get("type") if isinstance(obj, dict) else None
            raise TraceFileError(f"{where}: malformed {text(kind)!r} record ({type(exc).__name__})") from None
    if state["header"] is None:
        raise TraceFileError(f"{text(path)}: empty file, not a routetrace trace")
    return Trace(state["header"], list(table), addresses, state["trailer"], torn, table, unknown)


def _record(obj: dict, table: FlowTable, addresses: dict, minor: int, unknown: dict) -> dict | None:
    """Applies one record after the header; returns it when it is the trailer."""
    kind = obj["type"]
    if kind == "flow":
        table.update(_flow_from(obj))
    elif kind == "netns":
        inode, addrs, name = obj.get("netns"), obj.get("addresses"), obj.get("name")
        if not _is_int(inode) or not isinstance(addrs, list):
            raise _Bad("netns record needs an integer \"netns\" and a list of \"addresses\"")
        _string(name, "netns name", optional=True)
        addresses[_count(inode, "netns")] = {_address(a, "netns address") for a in addrs}
    elif kind == "trailer":
        _lost(obj.get("lost"), "trailer")
        for k in ("flows", "folded"):
            if k in obj:
                _count(obj[k], f"trailer {k!r}")
        return obj
    elif kind == "fold":
        table.drop(_key_from(obj))
    elif kind == "aggregate":
        table.set_aggregate(_aggregate_from(obj))
    elif kind == "loss":
        _lost(obj.get("lost"), "loss record")
    elif kind == "header":
        raise _Bad("a second header")
    elif minor > MINOR:
        # A newer minor's record: skipped and counted (its meaning is not this reader's to guess).
        if kind in unknown or len(unknown) < MAX_UNKNOWN_TYPES:
            unknown[kind] = unknown.get(kind, 0) + 1
    else:
        raise _Bad(f"unknown record type {kind!r}")
    return None
