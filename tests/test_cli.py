"""User mistakes and missing pieces: one line on stderr, exit 2, never a traceback."""
import os
import subprocess
import sys

import pytest

from routetrace import cli, kernel, netns


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("port", ["70000", "-1", "http", "88.8"])
def test_bad_port(capsys, port):
    code, _, err = run(capsys, "watch", "--port", port)
    assert code == 2
    assert one_line_error(err) == f"routetrace: --port must be a number from 0 to 65535, not {port!r}"


def test_bad_host_duration_pid(capsys):
    code, _, err = run(capsys, "watch", "--host", "example.org")
    assert code == 2 and "--host must be an IPv4 or IPv6 address" in one_line_error(err)
    code, _, err = run(capsys, "watch", "--duration", "0")
    assert code == 2 and "--duration must be positive" in one_line_error(err)
    code, _, err = run(capsys, "watch", "--pid", "999999999")
    assert code == 2 and "is not a running process" in one_line_error(err)


def test_unknown_option_and_command_are_one_line(capsys):
    code, _, err = run(capsys, "watch", "--colour")
    line = one_line_error(err)
    assert code == 2 and "No such option" in line and "--colour" in line
    code, _, err = run(capsys, "wtach")
    assert code == 2 and "No such command 'wtach'" in one_line_error(err)


def test_unknown_namespace(capsys):
    code, _, err = run(capsys, "watch", "--netns", "no-such-ns-routetrace")
    assert code == 2
    assert one_line_error(err).startswith("routetrace: unknown network namespace 'no-such-ns-routetrace'")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a network namespace needs root")
def test_pid_outside_the_requested_namespace_conflicts(capsys):
    # --netns must be a real network namespace: another one, held by a child in its own.
    child = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        other = f"/proc/{child.pid}/ns/net"
        for _ in range(100):        # until unshare has made the namespace
            if os.stat(other).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            __import__("time").sleep(0.05)
        code, _, err = run(capsys, "watch", "--pid", str(os.getpid()), "--netns", other)
        assert code == 2 and "is in network namespace" in one_line_error(err)
    finally:
        child.kill()
        child.wait()


def test_not_root(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = run(capsys, "watch", "--port", "8888")
    assert code == 2
    assert one_line_error(err) == "routetrace: routetrace watch needs root to load BPF programs: run it with sudo"


def test_bcc_missing(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(sys.modules, "bcc", None)      # import bcc -> ImportError
    code, _, err = run(capsys, "watch")
    assert code == 2
    assert "bcc (python3-bpfcc) is not importable" in one_line_error(err)
    assert "scripts/setup" in err


def test_no_headers(capsys, monkeypatch):
    from routetrace import tracer
    monkeypatch.setattr(tracer, "import_bcc", lambda: None)   # as if bcc were installed
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(kernel, "mount_tracefs", lambda: None)
    monkeypatch.setattr(kernel, "find_headers", lambda *a, **k: None)
    code, _, err = run(capsys, "watch")
    assert code == 2
    assert one_line_error(err).startswith("routetrace: no kernel headers for bcc: run scripts/setup")


def test_netns_resolves_name_path_and_inode(tmp_path):
    own = netns.current_inode()
    assert netns.resolve(str(own))[0] == own
    assert netns.resolve("/proc/self/ns/net")[0] == own


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "watch" in out and "doctor" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "routetrace, version" in out


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "routetrace", "watch", "--port", "x"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "routetrace: --port must be a number from 0 to 65535, not 'x'\n"
