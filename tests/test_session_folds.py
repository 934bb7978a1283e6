"""The live session's order in a storm, without BPF: notices first (no counts), the table folds
past its limit, then the drain brings every flow's counts. Counts of remembered folds take the
fast path (nothing decoded), and every packet is in the table or its aggregates."""
import io

from routetrace import bench_session, session as session_mod
from routetrace.events import NOTICE_BYTES, VALUE_STRUCT
from routetrace.ringbuf import MemoryRing, record_stride


def test_a_storms_counts_reach_the_folds_without_decoding(monkeypatch):
    n = 500
    entries = bench_session.entries(n)                 # one packet each (bpf/common.c's structs)
    ring = MemoryRing(1 << (n * record_stride(NOTICE_BYTES) - 1).bit_length())
    for k, v in entries:                               # a notice: the entry with no counts yet
        assert ring.output(k + VALUE_STRUCT.pack(0, 0, 0, 0, *VALUE_STRUCT.unpack(v)[4:]))
    out = io.StringIO()
    s = bench_session.session(entries, out, ring)
    s.table = session_mod.FlowTable(50, remember_folds=4 * n)
    decoded = []
    real = session_mod.decode_unpacked
    monkeypatch.setattr(session_mod, "decode_unpacked", lambda *a, **kw: decoded.append(a) or real(*a, **kw))
    while ring.free_bytes() < ring.size:
        s._take_notices(0)
    assert out.getvalue().count("\n") == n and s.table.folded == n - 50
    s._take_counts()
    assert decoded == []                               # the 50 in the table, the 450 folds: no decode
    assert s.table.packets == n
    assert sum(a.packets for a in s.table.aggregates.values()) == n - 50
    assert sum(a.flows for a in s.table.aggregates.values()) == n - 50
    assert out.getvalue().count("\n") == n             # nothing streamed twice
