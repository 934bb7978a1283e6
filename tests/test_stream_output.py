"""Live output survives the signals watch catches: each line written whole and once.

CPython's buffered writers, when a signal interrupts a partly written pipe write, write the
interrupted part again (seen as `{"type":"flow","{"type":"flow",...` in a storm's stream
stopped with Ctrl-C). render.write_stream writes to the descriptor itself."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

WRITER = r"""
import json, signal, sys
from routetrace.render import write_stream
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
line = json.dumps({"type": "flow", "pad": "y" * 300})
i = 0
while i < 200:
    write_stream(sys.stdout, "".join(line[:-1] + f', "i": {i * 2000 + j}}}\n' for j in range(2000)))
    i += 1
signal.signal(signal.SIGUSR1, signal.SIG_IGN)    # until exit: finalisation restores the default
"""


def test_a_stream_interrupted_by_signals_has_every_line_once_and_whole():
    proc = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE, bufsize=0)
    chunks: list[bytes] = []

    def read():
        while data := os.read(proc.stdout.fileno(), 1 << 16):
            chunks.append(data)
            time.sleep(0.0005)          # a reader a little slower than the writer: partial writes
    reader = threading.Thread(target=read)
    reader.start()
    while not chunks and proc.poll() is None:
        time.sleep(0.01)
    while proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.002)
    reader.join(60)
    assert proc.returncode == 0
    numbers = [json.loads(line)["i"] for line in b"".join(chunks).decode().splitlines()]
    assert numbers == list(range(200 * 2000))


def test_a_decoded_entry_is_the_flow_the_constructor_makes_and_streams_as_its_dict():
    """decode_fields builds the instance's dict directly (the storm's hot path): it must be the
    very object Flow(...) makes, field for field and in order, and its JSON line the same."""
    import dataclasses
    from routetrace.events import KEY_STRUCT, VALUE_STRUCT, Flow, decode_entry
    from routetrace.render import flow_json_fast, flow_json_line, json_line
    key = KEY_STRUCT.pack(7, 3, b"\x7f\0\0\x01".ljust(16, b"\0"), b"\xc6\x33\x64\x01".ljust(16, b"\0"), 40000, 8888,
                          17, 4, 0)
    value = VALUE_STRUCT.pack(2, 120, 2, 0, 10, 42, 254, 1, 2, 2, 1, 0x01 | 0x08, 0, b"c\xc3\x28rl\x1b", b"veth\"0",
                              b"lo", b"eth0")
    flow, _ = decode_entry(key, value, "tracepoint")
    made = Flow(**{f.name: getattr(flow, f.name) for f in dataclasses.fields(Flow)})
    assert flow == made and flow.extra == made.extra == {"v4_mapped_socket": True}
    # (the decoder also stores the flow's key, as the first read of flow.key does)
    assert [k for k in vars(flow) if k != "key"] == [k for k in vars(made) if k != "key"]
    assert flow.key == made.key
    assert flow_json_line(flow) == json_line(flow.to_dict()) == json_line(made.to_dict())
    assert json.loads(flow_json_line(flow))["comm"] == flow.comm        # escaped, not raw
    # The hand-formatted line is the one taken for a decoded flow (a field added to Flow makes
    # it fall back to the encoder: update render.flow_json_fast then), and it is the same line.
    assert flow_json_fast(flow) is None                                 # extra fields: the encoder's
    plain, _ = decode_entry(key, VALUE_STRUCT.pack(2, 120, 2, 0, 10, 42, 254, 1, 2, 2, 1, 0x01, 0, b"c\xc3\x28rl\x1b",
                                                   b"veth\"0", b"lo", b"eth0"), "tracepoint")
    assert plain.extra == {} and plain.fib_dev == "eth0"
    assert flow_json_fast(plain) == json_line(plain.to_dict())
    no_route, _ = decode_entry(key, VALUE_STRUCT.pack(0, 0, 0, 0, 10, 42, 0, 0, 0, 0, 0, 0x04, 0, b"x", b"lo", b"", b""),
                               "tracepoint")
    assert flow_json_fast(no_route) == json_line(no_route.to_dict())     # nulls and booleans
    made.extra["newer_field"] = 1
    assert flow_json_fast(made) is None and json.loads(flow_json_line(made))["newer_field"] == 1


def test_the_session_streams_each_flow_once_whether_noticed_or_found_by_the_drain():
    """scripts/bench-session's run, small: 3,000 flows noticed then drained (streamed once, by the
    notice), then the same entries drained by a fresh session with no notice (streamed once, by
    the drain), through a table of 20,000 rows... and a table of 1,000, which folds most of them."""
    from routetrace import bench_session
    from routetrace.session import Session
    r = bench_session.measure(3000)
    assert r["lines"] == 2 * 3000
    out = __import__("io").StringIO()
    s = bench_session.session(bench_session.entries(3000), out)
    s.table.limit = 1000
    s._take_counts()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len({(o["sport"], o["dport"]) for o in lines}) == 3000
    assert s.table.folded == 2000 and s.table.packets == 3000 and isinstance(s, Session)
