"""Network namespaces: resolve --netns, and learn each namespace's own addresses."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .errors import EnvironmentProblem, UsageError

NETNS_RUN_DIR = Path("/run/netns")


def current_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def resolve(spec: str) -> tuple[int, str | None]:
    """--netns NAME | PATH | INODE -> (inode, name when it has one under /run/netns)."""
    if spec.isdigit():
        return int(spec), name_of(int(spec))
    path = Path(spec) if "/" in spec else NETNS_RUN_DIR / spec
    try:
        inode = path.stat().st_ino
    except OSError:
        raise UsageError(f"unknown network namespace {spec!r} (not a name under {NETNS_RUN_DIR}, a path or an inode)")
    return inode, name_of(inode)


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
