"""Least privilege for a live trace. Loading and attaching BPF programs needs root; what comes
after does not: on this kernel (6.5 and later) reading, deleting and batch-draining a map through
an fd the process already holds, and polling or mmapping a ring buffer, are not capability-checked.
So once the programs are attached and the maps open, the session calls `drop_privileges()`:
the process becomes the invoking user (SUDO_UID/SUDO_GID, else nobody) with no capabilities at
all (unless `keep` names some), an emptied bounding set, no ambient capabilities, no_new_privs and
not dumpable (the user cannot ptrace it to borrow its BPF fds). Files opened before (the
recording) stay writable.

One thing the rest of a run still needs privilege for: learning the own addresses of a network
namespace that appears later (setns needs CAP_SYS_ADMIN; opening another user's
/proc/PID/ns/net needs CAP_SYS_PTRACE). That is done by a tiny helper process forked before the
drop (`NetnsHelper`): it is the invoking user too, keeps only CAP_SYS_ADMIN and CAP_SYS_PTRACE,
and takes one kind of request, an integer inode, answering with a list of addresses. Each
lookup runs in a fresh child that enters the namespace, drops those two capabilities as well and
reads the addresses over netlink (`ip -j addr`, no capability needed).

And one thing it needs privilege for after the end: removing the kprobe plan's kretprobes from
tracefs' kprobe_events, where bcc made them and where they outlive the process. A second helper
forked while root (`ProbeEventReaper`) holds that file open, becomes the invoking user with no
capabilities, and removes exactly those events when the trace ends or dies.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import select
import signal
import socket
import struct
import time
from typing import Iterable

from .errors import EnvironmentProblem

CAPS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4, "kill": 5,
    "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9, "net_bind_service": 10,
    "net_broadcast": 11, "net_admin": 12, "net_raw": 13, "ipc_lock": 14, "ipc_owner": 15,
    "sys_module": 16, "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20,
    "sys_admin": 21, "sys_boot": 22, "sys_nice": 23, "sys_resource": 24, "sys_time": 25,
    "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29, "audit_control": 30,
    "setfcap": 31, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
    "block_suspend": 36, "audit_read": 37, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
CAP_NAMES = {v: k for k, v in CAPS.items()}

PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_CAPBSET_DROP = 4, 8, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 38, 47
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
_CAP_VERSION_3 = 0x20080522
CLONE_NEWNET = 0x40000000

# What the netns helper keeps: setns into a namespace, and open another user's /proc/PID/ns/net.
NETNS_HELPER_CAPS = ("sys_admin", "sys_ptrace")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    rc = _libc.prctl(option, arg2, arg3, 0, 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return rc


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def cap_mask(names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        key = name.lower().removeprefix("cap_")
        if key not in CAPS:
            raise ValueError(f"unknown capability {name!r}")
        mask |= 1 << CAPS[key]
    return mask


def cap_names(mask: int) -> list[str]:
    return [f"cap_{CAP_NAMES.get(i, str(i))}" for i in range(64) if mask >> i & 1]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return max(CAPS.values())


def status(pid: int | str = "self") -> dict:
    """Uid, Gid, CapEff, CapPrm, CapBnd, CapAmb, NoNewPrivs of a process, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                out[key] = [int(v) for v in value.split()]
            elif key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
                out[key] = int(value.strip(), 16)
            elif key == "NoNewPrivs":
                out[key] = int(value)
    return out


def target_user() -> tuple[int, int, str]:
    """Who to become: the sudo user, else nobody."""
    import pwd
    uid, gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if uid.isdigit() and int(uid) != 0:
        try:
            name = pwd.getpwuid(int(uid)).pw_name
        except KeyError:
            name = uid
        return int(uid), int(gid) if gid.isdigit() else int(uid), name
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid, "nobody"
    except KeyError:
        return 65534, 65534, "nobody"


def drop_privileges(keep: Iterable[str] = (), *, uid: int | None = None, gid: int | None = None,
                    dumpable: bool = False) -> dict:
    """Become `uid`/`gid` (default: the sudo user, else nobody) keeping only the capabilities
    named in `keep` ("cap_sys_admin" or "sys_admin"), with no_new_privs; returns what it did.
    Call it with no other thread running: credentials and capabilities are per thread.
    Not root: changes nothing and says so."""
    keep_mask = cap_mask(keep)
    if uid is None:
        uid, default_gid, name = target_user()
        gid = default_gid if gid is None else gid
    else:
        name = str(uid)
        gid = uid if gid is None else gid
    threads = len(os.listdir("/proc/self/task"))
    if os.geteuid() != 0:
        return _drop_capabilities_only(keep_mask, threads, dumpable)
    try:
        for cap in range(_last_cap() + 1):
            if not keep_mask >> cap & 1:
                _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _capset(keep_mask, keep_mask, 0)
        _prctl(PR_SET_KEEPCAPS, 0)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_DUMPABLE, 1 if dumpable else 0)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot drop privileges to uid {uid}: {exc.strerror or exc}") from None
    st = status()
    return {"dropped": True, "user": name, "uid": st["Uid"][1], "gid": st["Gid"][1],
            "caps": cap_names(st["CapEff"]), "bounding": cap_names(st["CapBnd"]),
            "no_new_privs": bool(st["NoNewPrivs"]), "threads": threads}


def _drop_capabilities_only(keep_mask: int, threads: int, dumpable: bool) -> dict:
    """Not root, but perhaps started with capabilities (capsh --addamb ...): keep the user,
    drop every capability not in `keep`, ambient ones included."""
    import pwd
    st = status()
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    if not (st.get("CapPrm", 0) | st.get("CapAmb", 0)):
        return {"dropped": False, "reason": "not running as root", "user": name, "uid": uid, "gid": os.getgid(),
                "caps": [], "no_new_privs": bool(st.get("NoNewPrivs")), "threads": threads}
    keep_mask &= st.get("CapPrm", 0)
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        if st.get("CapEff", 0) >> CAPS["setpcap"] & 1:
            for cap in range(_last_cap() + 1):
                if not keep_mask >> cap & 1:
                    _prctl(PR_CAPBSET_DROP, cap)
        _capset(keep_mask, keep_mask, 0)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_DUMPABLE, 1 if dumpable else 0)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot drop capabilities: {exc.strerror or exc}") from None
    st = status()
    return {"dropped": True, "user": name, "uid": uid, "gid": os.getgid(), "caps": cap_names(st["CapEff"]),
            "bounding": cap_names(st["CapBnd"]), "no_new_privs": bool(st["NoNewPrivs"]), "threads": threads}


def capabilities_for_maps(release: str | None = None) -> list[str]:
    """What reading and draining already-open BPF maps needs. Before 6.5 every bpf(2) command
    was refused without CAP_BPF (CAP_SYS_ADMIN before 5.8) when unprivileged BPF is disabled, as
    distributions ship it; since 6.5 commands on fds the process holds are not capability-checked."""
    import re
    release = release or os.uname().release
    version = tuple(int(x) for x in re.findall(r"\d+", release)[:2])
    if version >= (6, 5):
        return []
    return ["cap_bpf"] if version >= (5, 8) else ["cap_sys_admin"]


def describe(result: dict) -> str:
    """One line for the summary or doctor."""
    if not result.get("dropped"):
        return f"privileges: kept ({result.get('reason', 'not dropped')})"
    caps = ", ".join(result["caps"]) or "no capabilities"
    return f"privileges: dropped to {result['user']} (uid {result['uid']}) with {caps}, no_new_privs"


# ---- the namespace-address helper --------------------------------------------------------

def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _lookup_in_child(inode: int) -> list[str]:
    """Runs in a fresh child of the helper: enter the namespace, drop the rest, read addresses."""
    from . import netns
    if inode != netns.current_inode():
        name = netns.name_of(inode)
        pid = None if name else netns._pid_in(inode)
        path = str(netns.NETNS_RUN_DIR / name) if name else (f"/proc/{pid}/ns/net" if pid else None)
        if path is None:
            return []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != inode:
            return []
        _setns(fd)
        os.close(fd)
    _capset(0, 0, 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    return sorted(netns.addresses(inode))


def _serve(sock: socket.socket) -> None:
    """The helper's loop: 8-byte inode in, a JSON list of addresses out; ends when the other
    side closes."""
    while True:
        data = b""
        while len(data) < 8:
            chunk = sock.recv(8 - len(data))
            if not chunk:
                return
            data += chunk
        (inode,) = struct.unpack("=Q", data)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                os.write(w, json.dumps(_lookup_in_child(inode)).encode())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
        os.close(r)
        os.waitpid(pid, 0)
        try:
            addrs = [a for a in json.loads(out) if isinstance(a, str)] if out else []
        except ValueError:
            addrs = []
        reply = json.dumps(addrs).encode()
        sock.sendall(struct.pack("=I", len(reply)) + reply)


class NetnsHelper:
    """A small process, forked while still root, that looks up a namespace's own addresses for
    the unprivileged session. `addresses(inode)` is a drop-in for `netns.addresses`."""

    def __init__(self, uid: int | None = None, gid: int | None = None):
        if uid is None:
            uid, gid, _ = target_user()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                keep = child.fileno()
                os.closerange(3, keep)           # no BPF fds, no recording in the helper
                os.closerange(keep + 1, 65536)
                drop_privileges(NETNS_HELPER_CAPS, uid=uid, gid=gid)
                _serve(child)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        child.close()
        self.pid, self._sock = pid, parent

    def addresses(self, inode: int) -> set[str]:
        if self._sock is None:
            return set()
        try:
            self._sock.sendall(struct.pack("=Q", inode))
            (size,) = struct.unpack("=I", self._recv(4))
            return set(json.loads(self._recv(size)))
        except (OSError, ValueError, struct.error):
            return set()

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise OSError("netns helper is gone")
            data += chunk
        return data

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass

    def __enter__(self) -> "NetnsHelper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the tracefs probe-event reaper -------------------------------------------------------
#
# A kretprobe with maxactive is made through tracefs (a line in kprobe_events: bcc 0.26 does so
# whenever maxactive is given) and, unlike a perf event of the kprobe PMU, outlives the process
# that made it until someone writes "-:GROUP/NAME" to kprobe_events. That needs the file open for
# writing, which only root may do; a trace that dropped root cannot, and one killed (SIGKILL, a
# crash) cannot do anything. So a tiny process forked while still root, before any probe exists,
# does it: it holds kprobe_events open (read and write), the parent's pidfd and one socket, and
# nothing else; it becomes the invoking user with no capabilities (writes through a file opened
# before are not checked again) and removes the events named when it was forked -- when asked
# (after the parent closed the probes' perf events), or when the parent has exited without asking.
# Ctrl-C, SIGTERM and SIGHUP sent to the whole process group do not stop it before its work.

EVENT_REMOVE = b"R"
REAPER_READY = b"+"
REAPER_ASK_TIMEOUT_S = 30.0      # a removal is a few writes; under TCG a slow one is seconds
REAPER_BUSY_PATIENCE_S = 60.0    # after the parent died: its last perf events may still be closing


def _read_all(fd: int) -> str:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")


def probe_events_listed(text: str) -> set[str]:
    """GROUP/NAME of every event in a kprobe_events text ("r256:kprobes/NAME func" per line)."""
    out = set()
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if ":" in head:
            out.add(head.split(":", 1)[1])
    return out


def remove_probe_events(read_fd: int, write_fd: int, names: Iterable[str], patience_s: float) -> dict:
    """Remove those of `names` (GROUP/NAME) that kprobe_events lists; an event still in use
    (EBUSY) is retried until `patience_s` has passed. Returns {"removed": [...], "failed": [...]}."""
    deadline = time.monotonic() + patience_s
    removed, failed = [], []
    wanted = set(names)
    while True:
        busy, failed = [], []
        for name in sorted(wanted & probe_events_listed(_read_all(read_fd))):
            try:
                os.write(write_fd, f"-:{name}".encode())
                removed.append(name)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue                          # gone meanwhile
                (busy if exc.errno == errno.EBUSY else failed).append(f"{name}: {os.strerror(exc.errno)}")
        if not busy or time.monotonic() >= deadline:
            return {"removed": removed, "failed": failed + busy}
        time.sleep(0.2)


def _reap(sock: socket.socket, parent: int, kprobe_events: str, names: list[str], uid: int, gid: int) -> None:
    """The reaper's life, in the forked child (see above)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    write_fd = os.open(kprobe_events, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    read_fd = os.open(kprobe_events, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pidfd = os.pidfd_open(parent)             # readable once the parent has exited (5.3+)
    except (AttributeError, OSError):
        pidfd = None                              # then the socket's end stands for the parent's
    drop_privileges(uid=uid, gid=gid)
    sock.sendall(REAPER_READY)
    released = False
    while True:
        ready, _, _ = select.select([sock] + ([pidfd] if pidfd is not None else []), [], [])
        if pidfd in ready:
            break                                 # the parent has ended, orderly or not
        data = sock.recv(1)
        if data == EVENT_REMOVE:
            done = remove_probe_events(read_fd, write_fd, names, patience_s=2.0)
            sock.sendall(json.dumps(done).encode() + b"\n")
            released = True
        elif released:
            return                                # closed after removing them: done
        elif pidfd is not None:
            select.select([pidfd], [], [])        # closed without asking: wait for the parent's end
            break
        else:
            break                                 # no pidfd: the closed socket is all there is to learn
    remove_probe_events(read_fd, write_fd, names, patience_s=REAPER_BUSY_PATIENCE_S)


class ProbeEventReaper:
    """Removes the named tracefs probe events (GROUP/NAME) when asked (`remove()`) or when this
    process ends without asking. Start it while root, before the probes are made."""

    def __init__(self, kprobe_events: str, names: Iterable[str], uid: int | None = None, gid: int | None = None):
        if uid is None:
            uid, gid, _ = target_user()
        names = sorted(set(names))
        parent = os.getpid()
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError as exc:
            here.close()
            there.close()
            raise EnvironmentProblem(f"cannot start the process that removes routetrace's tracefs probe events: "
                                     f"{exc.strerror or exc}") from None
        if pid == 0:
            code = 0
            try:
                keep = there.fileno()
                os.closerange(3, keep)            # no BPF fds, no recording, no other socket
                os.closerange(keep + 1, 65536)
                _reap(there, parent, kprobe_events, names, uid, gid)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        there.close()
        self.pid, self.names, self._sock = pid, names, here
        self._reply = b""
        self._answered = False
        # Ready only once it holds kprobe_events and has dropped root: else no probe is made.
        here.settimeout(REAPER_ASK_TIMEOUT_S)
        try:
            ready = here.recv(1)
        except OSError:
            ready = b""
        if ready != REAPER_READY:
            self.close()
            try:
                os.kill(pid, signal.SIGKILL)          # ours, and of no use
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
            raise EnvironmentProblem(f"cannot start the process that removes routetrace's tracefs probe events "
                                     f"({kprobe_events}) when it ends: it did not come up")

    def remove(self) -> dict:
        """Remove the events now (their perf events must be closed). Returns {"removed", "failed"};
        a reaper that cannot answer fails every name."""
        if self._sock is None:
            return {"removed": [], "failed": [f"{name}: the reaper was let go" for name in self.names]}
        try:
            self._sock.sendall(EVENT_REMOVE)
            while not self._reply.endswith(b"\n"):
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise OSError("the reaper is gone")
                self._reply += chunk
            answer = json.loads(self._reply)
            self._reply = b""
            self._answered = True
            return {"removed": list(answer.get("removed", [])), "failed": list(answer.get("failed", []))}
        except (OSError, ValueError) as exc:
            return {"removed": [], "failed": [f"{name}: {exc}" for name in self.names]}

    def close(self) -> None:
        """Let it go. After an answered remove() it exits at once (waited for); otherwise it
        stays until this process ends, then removes the events."""
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        if self._answered:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def nobody() -> tuple[int, int]:
    import pwd
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


# ---- load processes: bench's servers and clients ----------------------------------------
#
# None of them needs root (ports >= 1024; taskset pins its own process), but bench runs as root
# for its namespaces and probes. Each one becomes nobody once its privileged setup is over, by
# the same drop as prove's helpers: the Python ones call drop_to_nobody() themselves after
# binding (they import routetrace first, which a checkout private to root allows only as root);
# an external tool is started through `unprivileged()`, this module run as a tiny wrapper that
# drops and then execs it. After `ip netns exec NS`: entering the namespace needs root.

def drop_to_nobody() -> dict:
    """Become nobody with no capabilities, an emptied bounding set and no_new_privs (not root:
    keep the user, drop any capability held). Without a 'nobody' entry, uid and gid 65534, as
    prove's helpers do; never root."""
    uid, gid = nobody()
    if uid == 0 or gid == 0:
        raise EnvironmentProblem("user 'nobody' is root here: there is no unprivileged user to run the load as")
    return drop_privileges(uid=uid, gid=gid)


EXEC_AS_NOBODY = "exec-as-nobody"


def unprivileged(argv: list[str]) -> list[str]:
    """argv started as nobody: the wrapper drops (drop_to_nobody), then execs argv; if the drop
    fails it says so in one line and exits 2, never running argv as root."""
    import sys
    return [sys.executable, "-m", "routetrace.privileges", EXEC_AS_NOBODY, "--", *argv]


def _exec_as_nobody(argv: list[str]) -> int:
    import sys
    if not argv:
        print("routetrace: nothing to run", file=sys.stderr)
        return 2
    try:
        drop_to_nobody()
    except EnvironmentProblem as exc:
        print(f"routetrace: {exc}", file=sys.stderr)
        return 2
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"routetrace: cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    import sys
    args = sys.argv[1:]
    if args[:2] != [EXEC_AS_NOBODY, "--"]:
        print(f"usage: python -m routetrace.privileges {EXEC_AS_NOBODY} -- PROGRAM [ARG]...", file=sys.stderr)
        sys.exit(2)
    sys.exit(_exec_as_nobody(args[2:]))
