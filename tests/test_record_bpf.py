"""Recording live traces: what the file holds after every way a trace can end."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from routetrace.record import read_trace

pytestmark = pytest.mark.bpf


def _traffic(sandbox):
    for target in ("127.0.0.1", sandbox.own_addr, sandbox.peer_addr):
        assert sandbox.connect(sandbox.host, target, 8888) == "ok"


@pytest.fixture
def served(sandbox):
    sandbox.serve(sandbox.host, 8888)
    sandbox.serve(sandbox.peer, 8888)
    return sandbox


def test_record_then_report_reproduces_the_live_summary_exactly(served, live, tmp_path):
    path = tmp_path / "trace.jsonl"
    run = live("watch", "--netns", served.host, "--port", "8888", "--record", str(path))
    _traffic(served)
    rc, out, err = run.stop(signal.SIGINT)
    assert rc == 0, err
    live_summary = out[out.index("\nPROTO "):]
    report = subprocess.run([sys.executable, "-m", "routetrace", "report", str(path)],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert read_trace(path).complete                 # Ctrl-C still wrote the trailer
    header, replayed_summary = report.stdout.split("\n", 1)
    assert header.startswith("trace of ") and "tracepoint plan" in header
    assert replayed_summary == live_summary
    assert "verdict: same path" in live_summary and "198.51.100.2:8888" in live_summary


def test_sigterm_leaves_a_complete_file(served, live, tmp_path):
    path = tmp_path / "trace.jsonl"
    run = live("watch", "--netns", served.host, "--port", "8888", "--json", "--record", str(path))
    _traffic(served)
    rc, _, err = run.stop(signal.SIGTERM)
    assert rc == 0, err
    trace = read_trace(path)
    assert trace.complete and trace.losses.total == 0
    assert trace.trailer["flows"] == len(trace.flows) == 5
    assert {f.daddr for f in trace.flows if f.dport == 8888} == {"127.0.0.1", served.own_addr, served.peer_addr}


def test_sigkill_leaves_what_was_seen_readable_as_incomplete(served, live, tmp_path):
    path = tmp_path / "trace.jsonl"
    run = live("watch", "--netns", served.host, "--port", "8888", "--record", str(path))
    _traffic(served)
    # Counts reach the file within two drain intervals and a record interval (about 2 s).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and path.read_text().count('"packets":5') < 3:
        time.sleep(0.2)
    run.proc.kill()
    run.proc.wait()
    trace = read_trace(path)
    assert not trace.complete
    assert {f.daddr for f in trace.flows if f.dport == 8888} == {"127.0.0.1", served.own_addr, served.peer_addr}
    assert all(sum(f.xmit_devs.values()) == f.packets >= 3 for f in trace.flows)
    report = subprocess.run([sys.executable, "-m", "routetrace", "report", str(path)],
                            capture_output=True, text=True)
    assert report.returncode == 0
    assert "incomplete: no trailer" in report.stdout and "verdict: same path" in report.stdout


def test_file_is_private_and_owned_by_the_sudo_user(bpf_ready):
    # The file is created as the sudo user (record.create_private), so in a directory that
    # user can reach and write (pytest's tmp_path is root's, 0700).
    import shutil
    import tempfile
    from pathlib import Path
    user_dir = Path(tempfile.mkdtemp(prefix="rt-sudo-", dir="/tmp"))
    try:
        os.chmod(user_dir, 0o755)
        os.chown(user_dir, 65534, 65534)
        path = user_dir / "trace.jsonl"
        env = dict(os.environ, SUDO_UID="65534", SUDO_GID="65534")
        out = subprocess.run([sys.executable, "-m", "routetrace", "watch", "--port", "8888", "-d", "0.5",
                              "--record", str(path)], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert read_trace(path).complete
    finally:
        shutil.rmtree(user_dir, ignore_errors=True)


def test_refuses_to_follow_a_symlink_at_the_target(bpf_ready, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    link = tmp_path / "trace.jsonl"
    link.symlink_to(victim)
    out = subprocess.run([sys.executable, "-m", "routetrace", "watch", "-d", "0.5", "--record", str(link)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == f"routetrace: {link} is a symbolic link; refusing to write a trace through it\n"
    assert victim.read_text() == "keep me\n"
