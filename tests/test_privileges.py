"""Least privilege: what a process is after `drop_privileges()`, read from /proc/PID/status of
a small child process (no BPF needed: map and ring-buffer access through open fds was checked
on kernel 6.18 by hand, see routetrace/privileges.py)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from routetrace import privileges

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


class Child:
    """python -c CODE in a child; it prints one JSON line, then waits for stdin to close."""

    def __init__(self, code: str, env: dict | None = None):
        full = textwrap.dedent(code) + "\nimport sys, json\nprint(json.dumps(result), flush=True)\nsys.stdin.read()\n"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
        environ.update(env or {}, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", full], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=environ)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.stdin.close()
            raise AssertionError(f"child failed: {self.proc.stderr.read()}")
        self.result = json.loads(line)

    def status(self) -> dict:
        return privileges.status(self.proc.pid)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def child():
    started = []

    def start(code, env=None):
        c = Child(code, env)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


@needs_root
def test_without_sudo_it_becomes_nobody_with_no_capabilities(child):
    c = child("from routetrace.privileges import drop_privileges\nresult = drop_privileges()")
    st = c.status()
    assert st["Uid"] == [65534] * 4 and st["Gid"] == [65534] * 4
    assert st["CapEff"] == st["CapPrm"] == st["CapInh"] == st["CapAmb"] == st["CapBnd"] == 0
    assert st["NoNewPrivs"] == 1
    assert c.result["dropped"] and c.result["user"] == "nobody" and c.result["caps"] == []
    assert privileges.describe(c.result) == "privileges: dropped to nobody (uid 65534) with no capabilities, no_new_privs"


@needs_root
def test_under_sudo_it_becomes_the_invoking_user_keeping_only_what_is_asked(child):
    c = child("from routetrace.privileges import drop_privileges\nresult = drop_privileges(keep=['cap_net_admin'])",
              env={"SUDO_UID": "4242", "SUDO_GID": "4343", "SUDO_USER": "someone"})
    st = c.status()
    assert st["Uid"] == [4242] * 4 and st["Gid"] == [4343] * 4
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == 1 << 12      # cap_net_admin only
    assert st["CapAmb"] == st["CapInh"] == 0 and st["NoNewPrivs"] == 1
    assert c.result["caps"] == ["cap_net_admin"]
    with open(f"/proc/{c.proc.pid}/status") as fh:
        groups = next(line for line in fh if line.startswith("Groups:")).split()[1:]
    assert groups == ["4343"]


@needs_root
def test_after_the_drop_root_is_gone_but_files_opened_before_stay_writable(child, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    c = child(f"""
        import os
        from routetrace.privileges import drop_privileges
        keep = open({str(private / 'trace.jsonl')!r}, "w")
        result = drop_privileges()
        keep.write("still writable\\n"); keep.flush()
        def tries(fn):
            try:
                fn(); return "allowed"
            except OSError as exc:
                return exc.__class__.__name__
        result = dict(result, shadow=tries(lambda: open("/etc/shadow").read()),
                      new_file=tries(lambda: open({str(private / 'other')!r}, "w")),
                      setuid=tries(lambda: os.setuid(0)))
    """)
    assert (private / "trace.jsonl").read_text() == "still writable\n"
    assert c.result["shadow"] == "PermissionError"
    assert c.result["new_file"] == "PermissionError"
    assert c.result["setuid"] == "PermissionError"


def test_without_root_nothing_changes_and_it_says_so(child):
    # Imported before the switch: the checkout may be private to root (CI clones anywhere), and
    # what is tested is the call made without root, not reading the module as nobody.
    code = "from routetrace.privileges import drop_privileges\n"
    if os.geteuid() == 0:
        code += "import os\nos.setresgid(65534, 65534, 65534)\nos.setresuid(65534, 65534, 65534)\n"
    code += "result = drop_privileges()"
    c = child(code)
    assert c.result["dropped"] is False and c.result["reason"] == "not running as root"


def test_capability_names_round_trip():
    assert privileges.cap_mask(["cap_bpf", "perfmon"]) == (1 << 39) | (1 << 38)
    assert privileges.cap_names((1 << 39) | (1 << 21)) == ["cap_sys_admin", "cap_bpf"]
    with pytest.raises(ValueError):
        privileges.cap_mask(["cap_flying"])


@pytest.fixture
def namespace_with_address():
    """A namespace holding 203.0.113.7 on a veth (no dummy module here; documentation range)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"rt-priv-{os.getpid()}"
    run = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)   # noqa: E731
    run("netns", "add", name)
    try:
        run("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        run("-n", name, "addr", "add", "203.0.113.7/24", "dev", "d0")
        run("-n", name, "link", "set", "d0", "up")
        yield name, os.stat(f"/run/netns/{name}").st_ino
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_the_netns_helper_learns_a_new_namespaces_addresses_for_an_unprivileged_session(child, namespace_with_address):
    _name, inode = namespace_with_address
    c = child(f"""
        from routetrace import netns
        from routetrace.privileges import NetnsHelper, drop_privileges, status
        helper = NetnsHelper()
        result = drop_privileges()
        result = dict(result, direct=sorted(netns.addresses({inode})), helped=sorted(helper.addresses({inode})),
                      helper_status=status(helper.pid))
        helper.close()
    """)
    assert c.result["direct"] == []                      # the unprivileged session cannot do it itself
    assert c.result["helped"] == ["203.0.113.7"]
    helper = c.result["helper_status"]
    assert helper["Uid"] == [65534] * 4
    assert helper["CapEff"] == privileges.cap_mask(privileges.NETNS_HELPER_CAPS) and helper["NoNewPrivs"] == 1


@needs_root
def test_host_helpers_bind_only_the_addresses_given_serve_concurrently_and_drop_root():
    import socket
    import time
    from routetrace import experiment
    proc = experiment.start_listener(None, [18889], addresses=["127.0.0.1", "::1"])
    try:
        st = privileges.status(proc.pid)
        assert st["Uid"] == [65534] * 4 and st["CapEff"] == 0 and st["NoNewPrivs"] == 1
        listening = subprocess.run(["ss", "-Hltnp", "sport", "=", ":18889"], capture_output=True, text=True).stdout
        assert "127.0.0.1:18889" in listening and "[::1]:18889" in listening
        assert "0.0.0.0:18889" not in listening and "*:18889" not in listening
        stalled = [socket.create_connection(("127.0.0.1", 18889)) for _ in range(5)]   # send nothing
        start = time.perf_counter()
        assert experiment.connect("127.0.0.1", 18889, "tcp") == "ok"
        assert experiment.connect("::1", 18889, "tcp") == "ok"
        assert experiment.connect("127.0.0.1", 18889, "udp") == "ok"
        assert time.perf_counter() - start < 2           # not behind the stalled clients' 5 s timeouts
        for s in stalled:
            s.close()
    finally:
        experiment.stop_process(proc)


CAPSH_CAPS = "cap_bpf,cap_perfmon,cap_dac_read_search"


@needs_root
def test_started_by_capsh_with_ambient_capabilities_it_drops_them_all(tmp_path):
    """The no-uid-0 route (README): capsh gives the user only the capabilities tracing needs,
    as ambient ones; once attached, drop_privileges() leaves nothing, ambient included."""
    import shutil
    if not shutil.which("capsh"):
        pytest.skip("capsh is missing (apt package libcap2-bin)")
    script = tmp_path / "drop.py"
    script.write_text("import json\nfrom routetrace.privileges import drop_privileges, status\n"
                      "before = status()\nresult = drop_privileges()\n"
                      "print(json.dumps({'before': before, 'after': status(), 'result': result}))\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)
    out = subprocess.run(["capsh", f"--caps={CAPSH_CAPS},cap_setuid,cap_setgid,cap_setpcap+eip", "--keep=1",
                          "--user=nobody", f"--addamb={CAPSH_CAPS}", "--",
                          "-c", f"PYTHONPATH={ROOT} {sys.executable} {script}"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    if out.returncode != 0 and "Permission denied" in out.stderr and "drop.py" in out.stderr:
        pytest.skip("nobody cannot reach the test's temporary directory")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    wanted = privileges.cap_mask(CAPSH_CAPS.split(","))
    assert data["before"]["Uid"] == [65534] * 4
    assert data["before"]["CapEff"] == data["before"]["CapAmb"] == wanted
    after = data["after"]
    assert after["CapEff"] == after["CapPrm"] == after["CapAmb"] == after["CapInh"] == 0
    assert after["NoNewPrivs"] == 1 and data["result"]["dropped"] and data["result"]["user"] == "nobody"


# ---- the tracefs probe-event reaper (the kprobe plan's kretprobes live in kprobe_events) -----
# A regular file stands in for kprobe_events here (this host has no kprobes): the reaper lists
# the events it reads there and writes each removal to it, which the file keeps. The real file,
# where a removal deletes the line, is exercised in the VM matrix (test_vm_matrix.py).

def _reaper_child(child, events: Path, ask: bool = False):
    return child(f"""
        import os
        from routetrace.privileges import ProbeEventReaper
        path = {str(events)!r}
        mine = f"kprobes/r_f_bcc_{{os.getpid()}}"
        with open(path, "w") as fh:
            fh.write(f"r256:{{mine}} f\\np:kprobes/p_g_bcc_1 g\\n")
        os.chmod(path, 0o600)
        reaper = ProbeEventReaper(path, [mine, f"kprobes/p_f_bcc_{{os.getpid()}}"])
        result = {{"reaper": reaper.pid, "mine": mine, "parent": os.getpid()}}
        if {ask!r}:
            result["answer"] = reaper.remove()
            reaper.close()
            result["reaper_gone"] = not os.path.exists(f"/proc/{{reaper.pid}}")
    """)


def _removals(events: Path) -> list[str]:
    return [part.split("\n")[0] for part in events.read_text().split("-:")[1:]]


@needs_root
def test_the_probe_event_reaper_removes_only_its_own_events_when_asked(child, tmp_path):
    events = tmp_path / "kprobe_events"
    c = _reaper_child(child, events, ask=True)
    mine = c.result["mine"]
    assert c.result["answer"] == {"removed": [mine], "failed": []}
    assert _removals(events) == [mine]                  # not p_g_bcc_1: another process's event
    assert c.result["reaper_gone"]


@needs_root
def test_the_probe_event_reaper_survives_ctrl_c_and_sigterm_drops_root_and_cleans_up_after_sigkill(child, tmp_path):
    import signal
    import time
    events = tmp_path / "kprobe_events"
    c = _reaper_child(child, events)
    reaper = c.result["reaper"]
    st = privileges.status(reaper)
    assert st["Uid"][1] != 0 and st["CapEff"] == 0 and st["CapBnd"] == 0 and st["NoNewPrivs"] == 1, st
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):     # a terminal's group signals
        os.kill(reaper, sig)
    time.sleep(0.5)
    assert privileges.status(reaper)["Uid"][1] != 0               # still there
    assert _removals(events) == []                                 # and nothing removed while its parent runs
    c.proc.kill()                                                  # the trace, killed
    c.proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while not _removals(events) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _removals(events) == [c.result["mine"]]
