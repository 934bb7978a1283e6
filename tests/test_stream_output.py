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
