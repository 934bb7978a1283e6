"""routetrace.ringbuf: the BPF ring buffer read in runs, over an in-memory ring laid out as the
kernel lays it out, and over a real ring the kernel writes while the reader reads."""
import array
import json
import random
import struct
import subprocess
import sys

import pytest

from routetrace.errors import EnvironmentProblem
from routetrace.ringbuf import BUSY_BIT, DISCARD_BIT, MemoryRing, record_stride

SAMPLE = struct.Struct("=QQ")          # a test record: (sequence number, a check value)


def records(chunks) -> list[tuple[int, int]]:
    stride = record_stride(SAMPLE.size)
    record = struct.Struct(f"=8x{SAMPLE.format.lstrip('=')}{stride - 8 - SAMPLE.size}x")
    return [r for chunk in chunks for r in record.iter_unpack(chunk)]


def test_every_record_is_read_once_in_order_across_many_wraps_of_the_ring():
    ring = MemoryRing(1024, page=64)             # 42 records of 24 bytes: wraps every 42
    reader = ring.reader(SAMPLE.size)
    rng = random.Random(7)
    written, read = [], []
    for seq in range(5000):
        while not ring.output(SAMPLE.pack(seq, seq * 31 % 977)):
            chunks, n = reader.read(rng.randint(1, 50))
            assert len(records(chunks)) == n
            read += records(chunks)
        written.append((seq, seq * 31 % 977))
    while True:
        chunks, n = reader.read(1000)
        if not n:
            break
        read += records(chunks)
    assert read == written
    assert reader.pending_bytes() == 0


def test_a_record_that_straddles_the_end_reads_whole_from_the_double_mapping():
    stride = record_stride(SAMPLE.size)          # 24: 1024 is not a multiple, records straddle
    ring = MemoryRing(1024, page=64)
    reader = ring.reader(SAMPLE.size)
    for seq in range(42):
        assert ring.output(SAMPLE.pack(seq, 1))
    assert records(reader.read(100)[0]) == [(seq, 1) for seq in range(42)]
    assert ring.output(SAMPLE.pack(42, 2))       # at 1008: 16 bytes before the end, 8 after
    assert (42 * stride) % 1024 + stride > 1024
    assert records(reader.read(100)[0]) == [(42, 2)]


def test_the_reader_stops_at_a_record_still_being_written_and_skips_discarded_ones():
    ring = MemoryRing(4096, page=64)
    reader = ring.reader(SAMPLE.size)
    assert ring.output(SAMPLE.pack(1, 0))
    busy = ring.reserve(SAMPLE.pack(2, 0))
    assert ring.output(SAMPLE.pack(3, 0))        # committed, but behind a busy one
    chunks, n = reader.read(100)
    assert records(chunks) == [(1, 0)] and n == 1
    assert reader.read(100) == ([], 0)           # still busy: nothing passes it
    discarded = ring.reserve(SAMPLE.pack(4, 0))
    ring.commit(busy)
    ring.commit(discarded, discard=True)
    assert ring.output(SAMPLE.pack(5, 0))
    chunks, n = reader.read(100)
    assert records(chunks) == [(2, 0), (3, 0), (5, 0)] and n == 3
    assert reader.pending_bytes() == 0           # the discarded record was stepped over too


def test_the_budget_bounds_a_read_and_the_rest_waits_in_the_ring():
    ring = MemoryRing(4096, page=64)
    reader = ring.reader(SAMPLE.size)
    for seq in range(100):
        assert ring.output(SAMPLE.pack(seq, 0))
    chunks, n = reader.read(30)
    assert n == 30 and [r[0] for r in records(chunks)] == list(range(30))
    assert reader.pending_bytes() == 70 * record_stride(SAMPLE.size)
    assert ring.free_bytes() == 4096 - 70 * record_stride(SAMPLE.size)    # the consumer position moved
    assert [r[0] for r in records(reader.read(1000)[0])] == list(range(30, 100))


def test_a_record_of_another_size_is_an_error_not_a_silent_skip():
    ring = MemoryRing(4096, page=64)
    reader = ring.reader(SAMPLE.size)
    assert ring.output(b"x" * 40)
    with pytest.raises(EnvironmentProblem, match="expected 16"):
        reader.read(10)
    assert BUSY_BIT == 1 << 31 and DISCARD_BIT == 1 << 30


def test_the_session_streams_notices_read_from_a_ring_once_each():
    """Notices through the tracer's own poll over a ring: each flow once, a second device's
    notice of a flow already streamed not again, and the reader stops at POLL_BUDGET."""
    import io
    from routetrace import bench_session
    from routetrace.events import KEY_STRUCT, NOTICE_BYTES
    from routetrace.ringbuf import records_in
    from routetrace.tracer import POLL_BUDGET
    entries = bench_session.entries(POLL_BUDGET + 500)
    ring = MemoryRing(1 << 20)
    assert records_in(ring.size, NOTICE_BYTES) > len(entries) + 1
    for key, value in entries:
        assert ring.output(key + value)
    key, value = entries[0]
    other_device = KEY_STRUCT.pack(*(KEY_STRUCT.unpack(key)[:1] + (9,) + KEY_STRUCT.unpack(key)[2:]))
    assert ring.output(other_device + value)
    out = io.StringIO()
    s = bench_session.session([], out, ring)
    assert s._take_notices(0) == POLL_BUDGET              # the budget: the drain gets its turn
    assert s._take_notices(0) == 500                       # the rest, and the duplicate not again
    assert s._take_notices(0) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted((o["sport"], o["dport"]) for o in lines) == sorted(
        (KEY_STRUCT.unpack(k)[4], KEY_STRUCT.unpack(k)[5]) for k, _ in entries)
    assert lines[0]["devices"][0]["ifindex"] == 2 and lines[0]["comm"] == "python3"


def test_a_drain_empties_the_kernel_at_once_then_processes_a_budget_per_pump():
    """The whole drain leaves the kernel in one pump (so the maps flip at once); its entries are
    then processed PROCESS_BUDGET at a time, notices read in between, each flow streamed once."""
    import io
    from routetrace import bench_session, session as session_mod
    entries = bench_session.entries(3 * session_mod.PROCESS_BUDGET + 100)
    out = io.StringIO()
    s = bench_session.session(entries, out)
    s._last_drain = 0.0                                   # a drain is due
    first = s.pump(0)
    assert s._tracer.entries == []                        # all of it out of the kernel in this pump
    assert first == session_mod.PROCESS_BUDGET            # ... and one budget of it processed
    assert s._backlog_entries == len(entries) - session_mod.PROCESS_BUDGET
    while s._backlog:
        assert s.pump(0) <= session_mod.PROCESS_BUDGET
    s.finish()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len({(o["sport"], o["dport"]) for o in lines}) == len(entries)


# ---- against the kernel -------------------------------------------------------------------

@pytest.mark.bpf
@pytest.mark.parametrize("reader", ["mapped", "libbpf"])
def test_a_real_ring_read_while_the_kernel_writes_gives_every_notice_once(sandbox, reader, monkeypatch):
    """A small ring (8 pages, ~180 notices) the kernel fills while a storm of UDP flows runs and
    the reader reads: every notice read decodes to one of the storm's flows, none twice, and
    notices read + notices the kernel dropped (ring full) = entries it made. Both readers: ours
    (mapped, x86-64) and libbpf's callback (the one other architectures use)."""
    from routetrace import kernel, netns, probes, ringbuf
    from routetrace.events import NOTICE_BYTES, NOTICE_RECORD
    from routetrace.tracer import STAT_CREATED_0, STAT_EVENTS_DROPPED, Tracer
    if reader == "mapped" and not ringbuf.supported():
        pytest.skip("the mapped reader is used on x86-64 only")
    if reader == "libbpf":
        monkeypatch.setattr(ringbuf, "supported", lambda: False)
    subprocess.run(["ip", "netns", "exec", sandbox.host, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                   check=True)
    facts = kernel.gather(prepare_headers=True)
    plan = probes.choose(facts, probes.Filters(netns=netns.inode_of(sandbox.host)), "tracepoint",
                         probes.Limits(ring_pages=8))
    flows = 6000
    with Tracer(plan, None if facts.headers.matches else facts.headers.path) as tracer:
        assert isinstance(tracer._notices, ringbuf.RingReader) == (reader == "mapped")
        storm = subprocess.Popen(["ip", "netns", "exec", sandbox.host, sys.executable, "-m", "routetrace.storm",
                                  sandbox.peer_addr, str(flows), "--base-port", "20000"],
                                 stdout=subprocess.PIPE, text=True)
        seen = []
        while storm.poll() is None:
            seen += [r for chunk in tracer.poll(5) for r in NOTICE_RECORD.iter_unpack(chunk)]
        assert storm.wait() == 0
        sent = json.loads(storm.stdout.read())["sent"]
        for _ in range(3):
            seen += [r for chunk in tracer.poll(50) for r in NOTICE_RECORD.iter_unpack(chunk)]
        created, dropped = tracer._stat(STAT_CREATED_0), tracer._stat(STAT_EVENTS_DROPPED)
        if reader == "mapped":
            assert tracer._notices.pending_bytes() == 0
    ports = [(r[4], r[5]) for r in seen]                  # (sport, dport) of each notice
    assert len(ports) == len(set(ports)), "a notice read twice"
    assert all(r[6] == 17 for r in seen) and {r[3][:4] for r in seen} == {bytes(map(int, sandbox.peer_addr.split(".")))}
    assert len(seen) + dropped == created == sent         # one entry per datagram: distinct ports
    assert len(seen) > ringbuf.records_in(8 * 4096, NOTICE_BYTES)   # more than a ring's worth: it wrapped



class _CommitsBetweenReads:
    """The reader's header view, with the kernel committing a record between the reader's look at
    a run of headers (still BUSY then) and its look at that one header (committed by then)."""

    def __init__(self, headers, ring, pos):
        self._headers, self._ring, self._pos = headers, ring, pos

    def __getitem__(self, key):
        value = self._headers[key]
        if isinstance(key, slice) and self._pos is not None:
            value = array.array("I", value.tolist())   # what the reader saw: BUSY
            self._ring.commit(self._pos)               # right after the run was read
            self._pos = None
        return value

    def release(self):
        self._headers.release()


def test_a_record_committed_between_the_run_and_the_single_look_is_read_not_an_error():
    """Seen under an RPS flood: the run's header said BUSY, the next look said committed; that
    is the record the reader waits for, not a record of another size."""
    ring = MemoryRing(4096, page=64)
    reader = ring.reader(SAMPLE.size)
    busy = ring.reserve(SAMPLE.pack(1, 0))
    assert ring.output(SAMPLE.pack(2, 0))
    reader._headers = _CommitsBetweenReads(reader._headers, ring, busy)
    chunks, n = reader.read(100)
    assert records(chunks) == [(1, 0), (2, 0)] and n == 2
    assert reader.pending_bytes() == 0
