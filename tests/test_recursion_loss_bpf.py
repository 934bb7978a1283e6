"""BPF recursion misses: a FIB lookup the FIB program could not see is counted as fib_missed.

The kernel runs a raw-tracepoint program only if that program is not already running on the same
CPU (a per-CPU `active` count, checked before the program runs); when it is, the run is skipped and
counted in the program's recursion_misses, which routetrace reports as fib_missed. fib_table_lookup
fires in process context for output route lookups (an unconnected UDP sendto looks its route up
under rcu_read_lock only, bottom halves enabled) and in softirq for input lookups of received
packets. So: one CPU sends unconnected datagrams in a tight loop while it also receives a flood in
softirq. The flood comes from the other CPU over the veth; RPS on the receiving device sends it to
the sender's CPU, which the other CPU wakes with an IPI, and the softirq run on that interrupt's
exit lands inside the sender's lookup often enough. Without RPS the flood is received on the CPU
that sends it and nothing nests (measured: 0 misses without RPS, thousands with it).
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import json_objects
from routetrace.record import read_trace
from test_accounting_bpf import Traced, quiet, storm  # noqa: F401  (quiet is a fixture used here)

pytestmark = pytest.mark.bpf

ROUND_FLOWS = 10000          # unconnected sendtos per round, each its own output lookup
MAX_ROUNDS = 12              # a busy machine may need more than one; hundreds of misses per round here


def two_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        reason = "needs two CPUs: a lookup nests only when another CPU sends this one packets"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return cpus[0], cpus[1]


def fib_missed_seen(stream: str) -> int:
    """The largest fib_missed among the loss lines streamed so far."""
    whole_lines = stream[:stream.rfind("\n") + 1]      # the last line may still be arriving
    lines = [o for o in json_objects(whole_lines) if o["type"] == "loss"]
    return max((o["lost"]["fib_missed"] for o in lines), default=0)


def test_fib_lookups_nested_on_one_cpu_are_counted_as_fib_missed(quiet, live, tmp_path):
    sender_cpu, flood_cpu = two_cpus()
    host, peer = quiet.host, quiet.peer
    # Packets the host's eth0 receives are processed on the sender's CPU (hex mask of one CPU).
    subprocess.run(["ip", "netns", "exec", host, "sh", "-c",
                    f"echo {1 << sender_cpu:x} > /sys/class/net/eth0/queues/rx-0/rps_cpus"], check=True)
    path = tmp_path / "trace.jsonl"
    traced = Traced(live, quiet, "--record", str(path))
    flood = subprocess.Popen(["ip", "netns", "exec", peer, sys.executable, "-m", "routetrace.storm", quiet.own_addr,
                              "1000", "--cpu", str(flood_cpu), "--until-stopped"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rounds = sent = 0
        # Send until the stream shows the loss (a bound on rounds, not on time).
        while rounds < MAX_ROUNDS and not fib_missed_seen(traced.run.output_so_far()):
            sent += storm(host, quiet.peer_addr, ROUND_FLOWS, cpu=sender_cpu)["sent"]
            rounds += 1
    finally:
        flood.send_signal(signal.SIGTERM)
        flood_out, flood_err = flood.communicate(timeout=60)
    assert flood.returncode == 0, flood_err
    assert json.loads(flood_out)["sent"] > 0 and sent > 0
    t = traced.stop()

    lost = t.summary["lost"]
    print(f"fib_missed {lost['fib_missed']} after {rounds} rounds of {ROUND_FLOWS} sends")
    assert lost["fib_missed"] > 0, (rounds, lost)
    # Seen moving in the stream: a line when it first happened and whenever it grew, the last one
    # equal to the summary.
    streamed = [o["lost"]["fib_missed"] for o in t.loss_lines]
    assert streamed and streamed == sorted(streamed) and streamed[-1] == lost["fib_missed"]
    assert t.loss_lines[-1]["lost"] == lost
    # A missed lookup loses a route answer, never a packet: every packet is still accounted.
    assert lost["xmit_missed"] == 0 and lost["total"] >= lost["fib_missed"]
    t.assert_every_packet_explained()
    # In the recording: each loss record and the trailer.
    trace = read_trace(path)
    assert trace.losses.fib_missed == lost["fib_missed"]
    recorded = [o["lost"]["fib_missed"] for o in json_objects(path.read_text()) if o["type"] == "loss"]
    assert recorded == streamed
    report = subprocess.run([sys.executable, "-m", "routetrace", "report", str(path)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert f"{lost['fib_missed']} FIB lookups missed" in report.stdout
