"""End to end, as root on a shared host: names chosen by unprivileged users (a process's comm,
a device in a namespace they own) reach the terminal escaped and the JSON exact; a running
`watch` has given up root once its programs are attached (privileges.drop_privileges)."""
import subprocess
import sys
import time

import pytest

from conftest import json_objects
from routetrace import privileges

pytestmark = pytest.mark.bpf

ATTACK = "=1+\x1b]2;pwn\x07\x1b[2J"            # 15 bytes: all of comm
EVIL_DEV = "\x1b[31mev\x07"                     # the kernel allows any byte but '/', ':', whitespace
RAW_CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\n"] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]

SEND_AS = r"""
import ctypes, socket, sys
name = sys.argv[1].encode("latin-1") if sys.argv[1].isascii() else sys.argv[1].encode()
assert ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0) == 0      # PR_SET_NAME
with open("/proc/self/comm", "rb") as fh:
    assert fh.read().rstrip(b"\n") == name, "comm not set"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(b"hello", (sys.argv[2], int(sys.argv[3])))
"""


def send_udp_as(ns: str, comm: str, host: str, port: int) -> None:
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SEND_AS, comm, host, str(port)],
                   check=True, capture_output=True, timeout=30)


def no_raw_controls(text: str) -> list[str]:
    return sorted({repr(c) for c in text if c in RAW_CONTROLS})


def test_a_hostile_process_name_is_escaped_on_the_terminal_and_exact_in_json(sandbox, live):
    run = live("watch", "--netns", sandbox.host, "--port", "7777")
    send_udp_as(sandbox.host, ATTACK, "127.0.0.1", 7777)
    time.sleep(1.5)
    code, out, err = run.stop()
    assert code == 0, err
    assert no_raw_controls(out) == [] and no_raw_controls(err) == []
    assert "\\x1b]2;pwn\\x07\\x1b[2J" in out           # shown, escaped
    run = live("watch", "--netns", sandbox.host, "--port", "7777", "--json")
    send_udp_as(sandbox.host, ATTACK, "127.0.0.1", 7777)
    time.sleep(1.5)
    code, out, err = run.stop()
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out      # JSON escapes them
    objects = json_objects(out)
    flows = [o for o in objects if o["type"] == "flow"]
    assert any(f["comm"] == ATTACK and f["daddr"] == "127.0.0.1" for f in flows), flows
    summary = objects[-1]
    assert summary["type"] == "summary" and any(f["comm"] == ATTACK for f in summary["flows"])


@pytest.fixture
def evil_device(sandbox):
    """A veth named with ESC and BEL in the sandbox's host namespace, its peer in the peer
    namespace: 203.0.113.1 <-> 203.0.113.2."""
    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)
    ip("-n", sandbox.host, "link", "add", EVIL_DEV, "type", "veth", "peer", "name", "p0", "netns", sandbox.peer)
    ip("-n", sandbox.host, "addr", "add", "203.0.113.1/24", "dev", EVIL_DEV)
    ip("-n", sandbox.peer, "addr", "add", "203.0.113.2/24", "dev", "p0")
    ip("-n", sandbox.host, "link", "set", EVIL_DEV, "up")
    ip("-n", sandbox.peer, "link", "set", "p0", "up")
    return sandbox


def test_a_hostile_device_name_never_reaches_the_terminal_raw(evil_device, live):
    sb = evil_device
    run = live("watch", "--netns", sb.host, "--port", "7778")
    send_udp_as(sb.host, "sender", "203.0.113.2", 7778)
    time.sleep(1.5)
    code, out, err = run.stop()
    assert code == 0, err
    assert no_raw_controls(out) == [] and no_raw_controls(err) == []
    assert "\\x1b[31mev\\x07" in out                    # the device, escaped, in the stream and summary
    run = live("watch", "--netns", sb.host, "--port", "7778", "--json")
    send_udp_as(sb.host, "sender", "203.0.113.2", 7778)
    time.sleep(1.5)
    code, out, err = run.stop()
    assert code == 0, err
    flows = [o for o in json_objects(out) if o["type"] == "flow"]
    assert any(EVIL_DEV in f["xmit_devs"] for f in flows), flows


def test_a_running_watch_has_dropped_root(sandbox, live, monkeypatch):
    """The session calls privileges.drop_privileges() once the programs are attached and the
    maps open (expected call site: routetrace/watch.py, inside `with Session(...)`, before the
    "Tracing ..." line), with a privileges.NetnsHelper started before it for the namespaces met
    later. Without --netns, the sandbox namespace is first met after the drop: classifying its
    own address proves the helper does the lookup the unprivileged session cannot."""
    for env, uid in (({}, 65534), ({"SUDO_UID": "4242", "SUDO_GID": "4242"}, 4242)):
        for var in ("SUDO_UID", "SUDO_GID", "SUDO_USER"):
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        run = live("watch", "--port", "7779")
        st = privileges.status(run.proc.pid)
        assert st["Uid"] == [uid] * 4, st
        assert st["CapEff"] == 0 and st["CapPrm"] == 0 and st["CapAmb"] == 0, st
        assert st["NoNewPrivs"] == 1
        send_udp_as(sandbox.host, "after-drop", "127.0.0.1", 7779)         # tracing goes on unprivileged
        send_udp_as(sandbox.host, "after-drop", sandbox.own_addr, 7779)
        time.sleep(1.5)
        code, out, err = run.stop()
        assert code == 0, err
        assert "after-drop" in out and "127.0.0.1:7779" in out
        assert any(sandbox.own_addr in line and "own-address" in line for line in out.splitlines()), out
