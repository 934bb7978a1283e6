"""BPF recursion misses: a FIB lookup the FIB program could not see is counted as fib_missed, and
a transmit in softirq never nests inside the transmit tracepoint (xmit_missed stays 0 there).

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

A missed lookup loses a route answer, never a packet: xmit_missed stays 0 (the net_dev_queue
tracepoint fires inside __dev_queue_xmit's rcu_read_lock_bh(), so no softirq runs inside the
transmit program) and every packet is still accounted.
"""
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import EXPECTED_BACKEND, json_objects
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


def largest_loss_seen(stream: str, counter: str) -> int:
    """The largest value of a loss counter among the loss lines streamed so far."""
    whole_lines = stream[:stream.rfind("\n") + 1]      # the last line may still be arriving
    lines = [o for o in json_objects(whole_lines) if o["type"] == "loss"]
    return max((o["lost"][counter] for o in lines), default=0)


@dataclass
class NestedLoad:
    rounds: int
    sent: int
    flood_sent: int


def nest_on_one_cpu(sandbox, run, until: str, round_flows: int = ROUND_FLOWS, max_rounds: int = MAX_ROUNDS,
                    timeout: float = 300, echo: bool = False, flood_size: int = 1) -> NestedLoad:
    """Datagrams from the host namespace on one CPU while a flood from the peer, sent on the other
    CPU, is steered by RPS into the first CPU's softirq; in rounds, until the stream of `run` (a
    watch --json) shows the loss counter `until` move, at most max_rounds. The flood is datagrams
    to closed ports, or with echo=True ICMP echo requests, each answered from that softirq, of
    flood_size bytes of payload."""
    sender_cpu, flood_cpu = two_cpus()
    subprocess.run(["ip", "netns", "exec", sandbox.host, "sh", "-c",
                    f"echo {1 << sender_cpu:x} > /sys/class/net/eth0/queues/rx-0/rps_cpus"], check=True)
    flood = subprocess.Popen(["ip", "netns", "exec", sandbox.peer, sys.executable, "-m", "routetrace.storm",
                              sandbox.own_addr, "1000", *(["--echo"] if echo else []), "--cpu", str(flood_cpu),
                              "--size", str(flood_size),
                              "--until-stopped"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rounds = sent = 0
        # A bound on rounds, not on time.
        while rounds < max_rounds and not largest_loss_seen(run.output_so_far(), until):
            out = subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-m", "routetrace.storm",
                                  sandbox.peer_addr, str(round_flows), "--cpu", str(sender_cpu)],
                                 capture_output=True, text=True, timeout=timeout)
            assert out.returncode == 0, out.stderr
            sent += json.loads(out.stdout)["sent"]
            rounds += 1
    finally:
        flood.send_signal(signal.SIGTERM)
        flood_out, flood_err = flood.communicate(timeout=timeout)
    assert flood.returncode == 0, flood_err
    flood_sent = json.loads(flood_out)["sent"]
    assert sent > 0 and flood_sent > 0
    return NestedLoad(rounds, sent, flood_sent)


def test_fib_lookups_nested_on_one_cpu_are_counted_as_fib_missed_and_no_packet_is_lost(quiet, live, tmp_path):
    path = tmp_path / "trace.jsonl"
    traced = Traced(live, quiet, "--record", str(path))
    load = nest_on_one_cpu(quiet, traced.run, "fib_missed")
    t = traced.stop()

    lost = t.summary["lost"]
    print(f"fib_missed {lost['fib_missed']} after {load.rounds} rounds of {ROUND_FLOWS} sends, "
          f"{load.flood_sent} flood datagrams")
    assert lost["fib_missed"] > 0, (load, lost)
    # Seen moving in the stream: a line when it first happened and whenever it grew, the last one
    # equal to the summary.
    streamed = [o["lost"]["fib_missed"] for o in t.loss_lines]
    assert streamed and streamed == sorted(streamed) and streamed[-1] == lost["fib_missed"]
    assert t.loss_lines[-1]["lost"]["total"] == lost["total"]     # (undecoded is no loss: no line of its own)
    # A missed lookup loses a route answer, never a packet; the transmit program cannot nest
    # (tracepoint plan): every packet is accounted.
    assert EXPECTED_BACKEND == "tracepoint"
    assert lost["xmit_missed"] == 0 and lost["packets_lost"] == 0, lost
    assert t.transmitted >= load.sent
    t.assert_every_packet_explained()
    # In the recording: each loss record and the trailer.
    trace = read_trace(path)
    assert trace.losses.fib_missed == lost["fib_missed"]
    recorded = [o["lost"]["fib_missed"] for o in json_objects(path.read_text()) if o["type"] == "loss"]
    assert recorded == streamed
    report = subprocess.run([sys.executable, "-m", "routetrace", "report", str(path)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert f"{lost['fib_missed']} FIB lookups missed" in report.stdout
