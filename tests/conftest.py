import os
import selectors
import signal
import subprocess
import sys
import json
import threading
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# scripts/vm-test sets ROUTETRACE_BACKEND=kprobe (the CLI's --backend default); here, auto
# chooses tracepoints because the kernel has no kprobes.
EXPECTED_BACKEND = os.environ.get("ROUTETRACE_BACKEND", "tracepoint")


def _bpf_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401  (only whether it imports)
    except ImportError:
        return "needs bcc (python3-bpfcc)"
    return None


def require_bpf() -> None:
    """For tests that load BPF. Off CI they skip without root or bcc; in CI (root, bcc installed by
    scripts/setup) a missing piece is a failure, never a silent skip."""
    reason = _bpf_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"BPF test cannot run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture
def bpf_ready():
    require_bpf()


def free_port_base(count: int) -> int:
    """A base port whose `count` ports are free right now for TCP and UDP on 127.0.0.1 and ::1."""
    import secrets
    import socket
    for _ in range(50):
        base = 20000 + secrets.randbelow(30000)
        socks = []
        try:
            for port in range(base, base + count):
                for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        s = socket.socket(family, kind)
                        socks.append(s)
                        s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.fail("no free port range")


@pytest.fixture
def sandbox(bpf_ready):
    from routetrace.experiment import Sandbox
    with Sandbox() as sb:
        yield sb


def default_sigint():
    """preexec_fn for routetrace under test: a shell without job control starts background
    commands with SIGINT ignored, children inherit that, and Python then never raises
    KeyboardInterrupt. Tests that press Ctrl-C need it back to the default, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LiveRoutetrace:
    """`routetrace ...` as a user runs it, in a child process, stopped like a user stops it."""

    def __init__(self, *args: str, ready_timeout: float = 180, new_session: bool = False):
        """new_session: in a process group of its own, which stop(group=True) signals whole, as a
        terminal's Ctrl-C does (routetrace's helper processes included)."""
        # Unbuffered bytes: what is read here must not sit in a buffer communicate() bypasses.
        self.proc = subprocess.Popen([sys.executable, "-m", "routetrace", *args], bufsize=0,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint,
                                     start_new_session=new_session)
        # "Tracing ..." goes to stdout like bcc tools, or to stderr when stdout carries JSON.
        stream = self.proc.stderr if "--json" in args else self.proc.stdout
        sel = selectors.DefaultSelector()
        sel.register(stream, selectors.EVENT_READ)
        self.head = ""
        while "Tracing" not in self.head:
            if not sel.select(ready_timeout) or self.proc.poll() is not None:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"routetrace did not start: {self.head}{err.decode()}{out.decode()}")
            self.head += os.read(stream.fileno(), 65536).decode()
        self._head_on_stdout = stream is self.proc.stdout
        # Read both streams from now on, as a terminal would: a full pipe would block routetrace.
        self._chunks = {"out": [], "err": []}
        self._readers = [threading.Thread(target=self._read, args=(s, self._chunks[k]), daemon=True)
                         for k, s in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, chunks):
        while data := os.read(stream.fileno(), 1 << 16):
            chunks.append(data)

    def output_so_far(self) -> str:
        return b"".join(self._chunks["out"]).decode(errors="replace")

    def stop(self, sig=signal.SIGINT, timeout: float = 60, group: bool = False):
        """Signal it (sig None: wait for it to end by itself), then its exit code and output."""
        if sig is not None and group:
            os.killpg(self.proc.pid, sig)
        elif sig is not None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout)
        out, err = (b"".join(self._chunks[k]).decode() for k in ("out", "err"))
        if self._head_on_stdout:
            return self.proc.returncode, self.head + out, err
        return self.proc.returncode, out, self.head + err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def live():
    started = []

    def start(*args, **kw):
        run = LiveRoutetrace(*args, **kw)
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()


def json_objects(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sandbox_namespaces(stderr: str) -> list[str]:
    """The namespaces a --sandbox run announced on stderr."""
    import re
    m = re.search(r"^sandbox: namespaces (\S+) .* and (\S+) ", stderr, re.M)
    assert m, f"no sandbox announced: {stderr}"
    return [m.group(1), m.group(2)]


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
