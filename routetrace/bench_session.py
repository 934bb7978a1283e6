"""User-space cost per new flow of the live session, without BPF (run by scripts/bench-session).

Synthetic kernel entries (the structs bpf/common.c writes) go through the session's own code:
  notice:           ring read -> decode -> flow table -> JSON line (as watch --json streams it);
                    the notices are written into an in-memory ring laid out as the kernel's
                    (ringbuf.MemoryRing, untimed) and read by the tracer's own reader
  drain, known:     the drained counts of those flows (the fast path: counts added)
  drain, unnoticed: entries whose notice was dropped: decoded, tabled and streamed by the drain
  stream floor:     a lower bound, not the session: ring read, unpack and the JSON template
                    filled straight from the unpacked fields, nothing kept
Prints µs of CPU per flow for each. The table holds --keep-flows rows (20,000), so most flows
are also folded, as in a storm.
"""
from __future__ import annotations

import io
import json
import socket
import sys
import time

from .events import KEY_STRUCT, NOTICE_BYTES, VALUE_STRUCT, LossCounters
from .probes import Limits
from .render import live_flow_json_line
from .ringbuf import MemoryRing, record_stride
from .session import Session
from .tracer import Tracer

FLOWS = 60_000
CHUNK = 4096


def entries(n: int) -> list[tuple[bytes, bytes]]:
    src, dst = socket.inet_aton("198.51.100.1").ljust(16, b"\0"), socket.inet_aton("198.51.100.2").ljust(16, b"\0")
    return [(KEY_STRUCT.pack(4026531840, 2, src, dst, 1024 + i % 60000, 9 + i // 60000, 17, 4, 0),
             VALUE_STRUCT.pack(1, 29, 1, 0, 123456789 + i, 4242, 254, 2, 2, 1, 2, 1, 0, b"python3", b"eth0",
                               b"eth0", b"eth0")) for i in range(n)]


class FakeTracer:
    """What the session asks of a tracer, fed from memory: notices from a ring (read by the
    real tracer's poll, over an in-memory ring), counts from a list of entries."""

    def __init__(self, kernel_entries, ring: MemoryRing | None = None):
        self.entries = kernel_entries
        self.reader = Tracer.__new__(Tracer)
        self.reader.plan, self.reader._behind = Plan(), False
        self.reader._notices = ring.reader(NOTICE_BYTES) if ring else None
        self.reader._table = lambda name: ring

    def poll(self, timeout_ms):
        return self.reader.poll(timeout_ms) if self.reader._notices else []

    def drain(self, final=False):
        entries, self.entries = self.entries, []          # a drain empties the map
        for start in range(0, len(entries), CHUNK):
            chunk = entries[start:start + CHUNK]
            yield b"".join(k for k, _ in chunk), b"".join(v for _, v in chunk), len(chunk)

    def created_since_drain(self):
        return len(self.entries)

    def losses(self):
        return LossCounters()

    def program_stats(self):
        return []


class Plan:
    backend = "tracepoint"
    limits = Limits()


def session(kernel_entries, out: io.StringIO, ring: MemoryRing | None = None) -> Session:
    s = Session(Plan(), None, addresses=lambda inode: set())
    s._tracer = FakeTracer(kernel_entries, ring)
    s.on_flows = lambda flows: out.write("".join(live_flow_json_line(f) + "\n" for f in flows))
    return s


def measure(n: int = FLOWS) -> dict:
    import gc
    from . import session as session_mod
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(session_mod.GC_THRESHOLD, *threshold[1:])     # as Session.__enter__ sets it
    try:
        return _measure(n)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _measure(n: int) -> dict:
    kernel_entries = entries(n)
    # A notice is the entry with its counts zeroed (bpf/common.c notify_new_flow).
    notices = [k + VALUE_STRUCT.pack(0, 0, 0, 0, *VALUE_STRUCT.unpack(v)[4:]) for k, v in kernel_entries]
    ring = MemoryRing(1 << (CHUNK * record_stride(NOTICE_BYTES) - 1).bit_length())
    out = io.StringIO()
    s = session(kernel_entries, out, ring)
    notice = 0.0
    for start in range(0, n, CHUNK):
        for raw in notices[start:start + CHUNK]:          # the kernel's side: not timed
            if not ring.output(raw):
                raise RuntimeError("benchmark ring too small")
        t0 = time.process_time()
        while ring.free_bytes() < ring.size:             # the reader stops at POLL_BUDGET
            s._take_notices(0)
        notice += time.process_time() - t0
    t0 = time.process_time()
    s._take_counts()
    known = time.process_time() - t0
    s = session(kernel_entries, out)
    t0 = time.process_time()
    s._take_counts()
    unnoticed = time.process_time() - t0
    return {"flows": n, "notice_us": 1e6 * notice / n, "drain_known_us": 1e6 * known / n,
            "drain_unnoticed_us": 1e6 * unnoticed / n,
            "new_flows_per_cpu_s": n / (notice + known), "lines": out.getvalue().count("\n"),
            "stream_floor_us": 1e6 * stream_floor(notices) / n}


def stream_floor(notices: list[bytes]) -> float:
    """CPU seconds for the least a Python session can do and still stream each flow: read the
    notices out of the ring, unpack them (one iter_unpack a run) and fill the live stream's JSON
    template (render._LIVE_FLOW_TEMPLATE) from the unpacked fields (their strings' JSON text cached) -- no flow record, no
    table, no drain. A lower bound, not a session."""
    from .events import NOTICE_RECORD, address
    from .render import _JSON_STRINGS as s, _LIVE_FLOW_TEMPLATE
    ring = MemoryRing(1 << (CHUNK * record_stride(NOTICE_BYTES) - 1).bit_length())
    reader = ring.reader(NOTICE_BYTES)
    texts: dict[bytes, str] = {}
    spent = 0.0
    for start in range(0, len(notices), CHUNK):
        for raw in notices[start:start + CHUNK]:
            if not ring.output(raw):
                raise RuntimeError("benchmark ring too small")
        t0 = time.process_time()
        lines = []
        chunks, _ = reader.read(CHUNK)
        for chunk in chunks:
            for (netns, ifindex, saddr, daddr, sport, dport, proto, family, _, packets, nbytes, segments, fragments,
                 first_ns, pid, fib_table, route_ifindex, fib_ifindex, route_type, route_src, flags, _, comm, dev,
                 route_dev, fib_dev) in NOTICE_RECORD.iter_unpack(chunk):
                daddr_text = texts.get(daddr) or texts.setdefault(daddr, s[address(family, daddr)])
                saddr_text = texts.get(saddr) or texts.setdefault(saddr, s[address(family, saddr)])
                dev_text = texts.get(dev) or texts.setdefault(dev, s[dev.rstrip(b"\0").decode()])
                lines.append(_LIVE_FLOW_TEMPLATE % (
                    '"udp"', saddr_text, sport, daddr_text, dport, netns, pid, dev_text, '"UNICAST"', dev_text,
                    dev_text, "%d" % fib_table, dev_text, packets, packets, nbytes, first_ns, first_ns,
                    '"tracepoint"', family, segments, '"socket"', "%d" % route_ifindex, "false", "%d" % fib_ifindex,
                    ifindex, dev_text, "false", packets, segments, nbytes, fragments))
        "".join(lines)
        spent += time.process_time() - t0
    return spent


def main() -> int:
    r = measure()
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
