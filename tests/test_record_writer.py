"""The trace writer (and `export -o`) as root on a shared host: files are created as the invoking
user would create them, existing paths, links, FIFOs and other users' files are refused and left
untouched, and a full disk stops the recording, never the trace."""
import contextlib
import dataclasses
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import FIXTURES
from routetrace import cli
from routetrace.errors import TraceFileError
from routetrace.events import LossCounters
from routetrace.record import EXIT_RECORDING_INCOMPLETE, TraceWriter, read_trace

TRACE = FIXTURES / "trace-tracepoint-6.18.jsonl"
ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users' files, mounts)")
OTHER_UID = 4321


@pytest.fixture(autouse=True)
def no_sudo(monkeypatch):
    for var in ("SUDO_UID", "SUDO_GID", "SUDO_USER"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def shared_dir():
    """A directory every user can reach (tmp_path's parents are 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rt-writer-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def snapshot(path: Path):
    st = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, content


def write_a_trace(writer: TraceWriter, flows=None):
    trace = read_trace(TRACE)
    writer.header(kernel="6.18", plan={"backend": "tracepoint"}, filters={}, start_ns=1)
    writer.netns(1, "blue", ["127.0.0.1"])
    writer.flows(flows if flows is not None else trace.flows)
    writer.trailer(LossCounters(), flows=len(trace.flows))
    writer.close()


def export_to(path, *extra):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main(["export", str(TRACE), "--format", "csv", "-o", str(path), *extra])
    return code, out.getvalue(), err.getvalue()


def test_a_new_trace_is_private_owned_by_the_caller_and_reads_back(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    assert writer.created
    write_a_trace(writer)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    trace = read_trace(path)
    assert trace.complete and len(trace.flows) == 5
    assert writer.error is None and writer.dropped == 0 and writer.records == 8


# ---- refusals: each is one line, exit 2, and leaves the target exactly as it was ------------

def _existing(d: Path) -> Path:
    p = d / "existing"
    p.write_text("precious\n")
    return p


def _symlink(d: Path) -> Path:
    victim = d / "victim"
    victim.write_text("keep me\n")
    (d / "link").symlink_to(victim)
    return d / "link"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "fifo")
    return d / "fifo"


def _others_file(d: Path) -> Path:
    p = d / "theirs"
    p.write_text("someone else's\n")
    os.chown(p, OTHER_UID, OTHER_UID)
    return p


def _device(d: Path) -> Path:
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return d / "null"


REFUSED = {
    "existing file": (_existing, "already exists; refusing to overwrite it"),
    "symlink": (_symlink, "is a symbolic link; refusing to write a trace through it"),
    "fifo": (_fifo, "already exists"),
    "another user's file": (_others_file, "already exists"),
    "device": (_device, "already exists"),
}
REFUSED_WITH_FORCE = {
    "symlink": (_symlink, "is a symbolic link"),
    "fifo": (_fifo, "is not a regular file"),
    "another user's file": (_others_file, "belongs to uid 4321, not to you"),
    "device": (_device, "is not a regular file"),
}


def _check_refused(make, message, tmp_path, force):
    target = make(tmp_path)
    before = snapshot(target)
    linked = snapshot(tmp_path / "victim") if (tmp_path / "victim").exists() else None
    start = time.monotonic()
    with pytest.raises(TraceFileError) as exc:
        TraceWriter(target, force=force)
    assert time.monotonic() - start < 5                     # a FIFO never hangs it
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert snapshot(target) == before
    code, out, err = export_to(target, *(["--force"] if force else []))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err
    assert err.startswith(f"routetrace: {target}")
    assert snapshot(target) == before
    if linked:
        assert snapshot(tmp_path / "victim") == linked


@needs_root
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_without_force_and_left_untouched(tmp_path, case):
    _check_refused(*REFUSED[case], tmp_path, force=False)


@needs_root
@pytest.mark.parametrize("case", sorted(REFUSED_WITH_FORCE))
def test_refused_even_with_force_and_left_untouched(tmp_path, case):
    _check_refused(*REFUSED_WITH_FORCE[case], tmp_path, force=True)


def test_force_replaces_an_earlier_output_the_caller_owns(tmp_path, capsys):
    for fmt in ("csv", "json"):
        target = tmp_path / f"mine.{fmt}"
        assert cli.main(["export", str(TRACE), "--format", fmt, "-o", str(target)]) == 0
        with open(target, "a") as fh:
            fh.write("old tail\n" * 50)
        assert cli.main(["export", str(TRACE), "--format", fmt, "-o", str(target), "--force"]) == 0
        assert "old tail" not in target.read_text()
    empty = tmp_path / "empty.csv"
    empty.touch()
    assert cli.main(["export", str(TRACE), "-o", str(empty), "--force"]) == 0
    target = tmp_path / "t.jsonl"
    write_a_trace(TraceWriter(target))
    with open(target, "a") as fh:
        fh.write("old tail\n")
    writer = TraceWriter(target, force=True)
    assert not writer.created
    write_a_trace(writer)
    assert read_trace(target).complete and "old tail" not in target.read_text()


def test_force_never_replaces_what_is_not_routetrace_output_even_for_root(tmp_path, capsys):
    """Root's own files are root's: `sudo routetrace export ... -o /etc/shadow --force` as root
    itself (no SUDO_UID) must not replace them either."""
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$6$secret:19000:0:99999:7:::\n")
    before = snapshot(shadow)
    with pytest.raises(TraceFileError, match="is not a routetrace trace; --force replaces only those"):
        TraceWriter(shadow, force=True)
    code, out, err = export_to(shadow, "--force")
    assert code == 2 and "is not an earlier routetrace csv export" in err and len(err.splitlines()) == 1
    code, _, err = export_to(shadow, "--format", "json", "--force")
    assert code == 2 and "is not an earlier routetrace json export" in err
    assert snapshot(shadow) == before
    trace = tmp_path / "t.jsonl"
    write_a_trace(TraceWriter(trace))
    os.link(trace, tmp_path / "hardlink")                  # a second name: not ours alone to replace
    before = snapshot(trace)
    with pytest.raises(TraceFileError, match="has 2 hard links"):
        TraceWriter(trace, force=True)
    assert snapshot(trace) == before


@needs_root
def test_a_symlink_in_a_parent_directory_owned_by_another_user_is_not_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "dirlink"
    link.symlink_to(real)
    os.lchown(link, OTHER_UID, OTHER_UID)
    for make in (lambda: TraceWriter(link / "t.jsonl"), lambda: TraceWriter(link / "." / "t.jsonl")):
        with pytest.raises(TraceFileError, match="a symbolic link owned by another user"):
            make()
    code, _, err = export_to(link / "out.csv")
    assert code == 2 and "symbolic link owned by another user" in err
    assert list(real.iterdir()) == []


def test_a_symlink_in_a_parent_directory_the_caller_owns_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "mine").symlink_to("real")
    write_a_trace(TraceWriter(tmp_path / "mine" / "sub-link-free.jsonl"))
    assert read_trace(real / "sub-link-free.jsonl").complete


# ---- on behalf of a sudo user ------------------------------------------------------------

@needs_root
def test_under_sudo_the_file_is_created_by_the_user_not_chowned(shared_dir, monkeypatch):
    user_dir = shared_dir / "user"
    user_dir.mkdir()
    os.chown(user_dir, 65534, 65534)
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "65534")
    writer = TraceWriter(user_dir / "t.jsonl")
    write_a_trace(writer)
    st = (user_dir / "t.jsonl").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)
    assert read_trace(user_dir / "t.jsonl").complete


@needs_root
def test_under_sudo_roots_files_and_directories_are_out_of_reach(shared_dir, monkeypatch):
    """The sudoers case: a user allowed to run only routetrace must not get root's files."""
    shadow = shared_dir / "shadow"
    shadow.write_text("root:$6$secret:19000:0:99999:7:::\n")
    os.chmod(shadow, 0o640)
    root_dir = shared_dir / "etc"
    root_dir.mkdir(mode=0o755)
    before = snapshot(shadow)
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "65534")
    for force in (False, True):
        with pytest.raises(TraceFileError):
            TraceWriter(shadow, force=force)
        assert snapshot(shadow) == before
    with pytest.raises(TraceFileError, match="Permission denied"):
        TraceWriter(root_dir / "cron-job")                   # nobody may not create files here
    assert list(root_dir.iterdir()) == []
    # The same as a user runs it: exit 2, one line.
    env = dict(os.environ, SUDO_UID="65534", SUDO_GID="65534", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "routetrace", "export", str(TRACE), "-o", str(shadow), "--force"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "belongs to uid 0" in out.stderr
    assert snapshot(shadow) == before


# ---- a full disk -------------------------------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_the_recording_without_an_exception(tiny_tmpfs):
    flow = read_trace(TRACE).flows[0]
    flows = [dataclasses.replace(flow, sport=1024 + i, extra={}) for i in range(3000)]
    err = io.StringIO()
    writer = TraceWriter(tiny_tmpfs / "t.jsonl", err=err)
    writer.header(kernel="6.18", plan={"backend": "tracepoint"}, filters={}, start_ns=1)
    for i in range(0, 3000, 100):                   # batches, as the session records once a second
        writer.flows(flows[i:i + 100])
        writer.flush()
    assert writer.error is not None and "No space left on device" in writer.error
    writer.fold(flows[0].key)                            # later calls are accepted, and do nothing
    writer.trailer(LossCounters(), flows=3000)
    writer.flush()
    writer.close()
    writer.close()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routetrace: recording stopped: cannot write ")
    assert "No space left on device" in lines[0] and "records not written" in lines[0]
    assert writer.records + writer.dropped == 3003      # header, 3000 flows, fold, trailer
    assert 0 < writer.records < 3000
    trace = read_trace(tiny_tmpfs / "t.jsonl")          # what was written reads as an incomplete trace
    assert not trace.complete and 0 < len(trace.flows) < 3000
    assert EXIT_RECORDING_INCOMPLETE == 3


def test_the_writer_keeps_no_state_per_flow(tmp_path):
    flow = read_trace(TRACE).flows[0]
    writer = TraceWriter(tmp_path / "t.jsonl")
    writer.header(kernel="6.18", plan={"backend": "tracepoint"}, filters={}, start_ns=1)
    for i in range(20000):
        writer.flows([dataclasses.replace(flow, sport=i % 65536, pid=i, extra={})])
        assert writer._buffered < 2 * TraceWriter.BUFFER_BYTES
    writer.close()
    assert sorted(vars(writer)) == ["_buf", "_buffered", "_err", "_fd", "created", "dropped", "error", "path", "records"]
    assert len(read_trace(tmp_path / "t.jsonl").flows) == 20000


def test_what_the_kernel_loses_uncounted_is_recorded_and_read_back(tmp_path):
    """The plan's uncountable statements travel with the loss counters into the recording and
    back (format 1.3), and `report` prints them beside "lost:", escaped like any file string."""
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    trace = read_trace(TRACE)
    writer.header(kernel="6.18", plan={"backend": "tracepoint"}, filters={}, start_ns=1)
    writer.flows(trace.flows)
    said = ("this kernel does not run BPF tracing programs while PID 1 is the current task",
            "a statement with an escape \x1b[31m inside")
    writer.trailer(LossCounters(uncountable=said), flows=len(trace.flows))
    writer.close()
    back = read_trace(path)
    assert back.losses.uncountable == said and back.losses.total == 0
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["report", str(path)]) == 0
    report = out.getvalue()
    assert "lost: nothing" in report
    assert f"not countable here: {said[0]}" in report
    assert "\x1b" not in report and "not countable here: a statement with an escape" in report


@pytest.mark.parametrize("bad", [{"uncountable": "one string"}, {"uncountable": [1]},
                                 {"uncountable": ["x"] * 17}])
def test_a_trailer_with_malformed_uncountable_statements_is_refused(tmp_path, bad):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    writer.header(kernel="6.18", plan={"backend": "tracepoint"}, filters={}, start_ns=1)
    writer.trailer(LossCounters(), flows=0)
    writer.close()
    lines = path.read_text().splitlines()
    import json
    trailer = json.loads(lines[-1])
    trailer["lost"].update(bad)
    lines[-1] = json.dumps(trailer)
    path.write_text("\n".join(lines) + "\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main(["report", str(path)])
    assert code != 0 and "uncountable" in err.getvalue() and "Traceback" not in err.getvalue()
