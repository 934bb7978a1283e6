"""Network namespaces: resolve --netns, and learn each namespace's own addresses."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

from .errors import EnvironmentProblem, UsageError

NETNS_RUN_DIR = Path("/run/netns")


def current_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


# ioctl(NS_GET_NSTYPE) on an nsfs file answers its namespace type as a CLONE_NEW* flag (4.11+).
NS_GET_NSTYPE = 0xB703                      # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
NS_TYPES = {0x00020000: "mount", 0x02000000: "cgroup", 0x04000000: "uts", 0x08000000: "ipc",
            0x10000000: "user", 0x20000000: "pid", CLONE_NEWNET: "network", 0x00000080: "time"}


def resolve(spec: str) -> tuple[int, str | None]:
    """--netns NAME | PATH | INODE -> (inode, name when it has one under /run/netns). Only real
    network namespaces pass: a path must be an nsfs file of type net, an inode must be the
    namespace of some process or of a /run/netns entry; anything else is a UsageError."""
    if spec.isdigit():
        inode = int(spec)
        if not _exists(inode):
            hint = "" if os.geteuid() == 0 else "; as root, every process's namespace can be seen"
            raise UsageError(f"--netns {spec}: no network namespace has inode {spec} "
                             f"(no process is in one, and no entry under {NETNS_RUN_DIR} holds one{hint})")
        return inode, name_of(inode)
    if "/" in spec:
        path = Path(spec)
    else:
        path = NETNS_RUN_DIR / spec
        if not path.exists():
            raise UsageError(f"unknown network namespace {spec!r} "
                             f"(not a name under {NETNS_RUN_DIR}, a path or an inode)")
    inode = _net_namespace_inode(path, spec)
    return inode, name_of(inode)


def _net_namespace_inode(path: Path, spec: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"--netns {spec}: no such file (give a name under {NETNS_RUN_DIR}, "
                         "a path such as /proc/PID/ns/net, or an inode)") from None
    except OSError as exc:
        raise UsageError(f"--netns {spec}: cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            # ENOTTY: not a namespace file. Kernels before 4.11 lack the ioctl: there, a file on
            # the same nsfs as our own network namespace is one (of some type) — accept it.
            nstype = CLONE_NEWNET if st.st_dev == os.stat("/proc/self/ns/net").st_dev else None
    finally:
        os.close(fd)
    if nstype is None:
        raise UsageError(f"--netns {spec} is not a network namespace "
                         f"(a path must be one, such as {NETNS_RUN_DIR}/NAME or /proc/PID/ns/net)")
    if nstype != CLONE_NEWNET:
        raise UsageError(f"--netns {spec} is a {NS_TYPES.get(nstype, 'non-network')} namespace, "
                         "not a network namespace")
    return st.st_ino


def _exists(inode: int) -> bool:
    """Some process is in that network namespace, or a /run/netns entry holds it."""
    if inode == current_inode() or name_of(inode) is not None:
        return True
    return _pid_in(inode) is not None


def name_of(inode: int) -> str | None:
    try:
        entries = list(NETNS_RUN_DIR.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if entry.stat().st_ino == inode:
                return entry.name
        except OSError:
            continue
    return None


def _ip_json(args: list[str]) -> list:
    try:
        out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False, timeout=10)
    except FileNotFoundError:
        raise EnvironmentProblem("the 'ip' command (iproute2) is missing: run scripts/setup")
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout)


def _pid_in(inode: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "ns" / "net").stat().st_ino == inode:
                    return int(proc.name)
            except OSError:
                continue
    return None


def addresses(inode: int) -> set[str]:
    """Every IPv4 and IPv6 address configured in that namespace (link-local ones too: the
    kernel's flows carry no scope, so they are kept without it); empty when it cannot be entered."""
    if inode == current_inode():
        data = _ip_json(["addr", "show"])
    elif (name := name_of(inode)) is not None:
        data = _ip_json(["-n", name, "addr", "show"])
    elif (pid := _pid_in(inode)) is not None:
        try:
            out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "addr", "show"],
                                 capture_output=True, text=True, check=False, timeout=10)
            data = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []
        except (OSError, ValueError):
            data = []
    else:
        data = []
    return {a["local"] for link in data for a in link.get("addr_info", [])
            if a.get("family") in ("inet", "inet6") and "local" in a}


def inode_of(name: str | None) -> int:
    """The inode of a named namespace, or of this process's own when name is None."""
    return resolve(name)[0] if name else current_inode()


def own_ipv4(inode: int | None = None) -> list[str]:
    """This (or that) namespace's own IPv4 addresses outside the loopback range, in order."""
    import ipaddress
    addrs = addresses(current_inode() if inode is None else inode)
    return sorted((a for a in addrs if ipaddress.ip_address(a).version == 4 and not ipaddress.ip_address(a).is_loopback),
                  key=ipaddress.ip_address)
