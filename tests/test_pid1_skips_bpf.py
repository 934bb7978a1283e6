"""What the kernel does not hand to BPF programs, against an independent witness: the
tracepoint's own trace event, which the kernel records for every hit.

Some kernels (the 6.18 sandbox kernel here) carry a patch that returns from bpf_trace_run*()
before the program -- no run, no recursion miss -- while PID 1 is the current task, unless PID 1
loaded the program (its mark in BTF: bpf_prog_aux.init_owned; KernelFacts.bpf_skips_pid1, stated
by doctor and --dry-run). Softirq work runs on whatever task it interrupted, so packets sent from
a softirq that ran on PID 1's time are skipped too: RPS makes that common here, because the IPI
that raises the receive softirq often lands while PID 1's threads (the sandbox's process_api,
relaying our output) are running.

The test floods ICMP echo requests of a distinctive length into the softirq of a busy CPU (RPS),
counts net_dev_queue hits of that length with a bare BPF program and with a tracefs instance of
the trace event, and checks that exactly the hits in PID 1's context are missing -- and on a
kernel without the patch, that none is.
"""
import os
import time
from pathlib import Path

import pytest

from routetrace import btf, kernel
from routetrace.bench import floor_plan
from routetrace.tracer import Tracer
from test_accounting_bpf import quiet  # noqa: F401  (a fixture used here)
from test_recursion_loss_bpf import nest_on_one_cpu

pytestmark = pytest.mark.bpf

PAYLOAD = 333                                   # bytes of echo payload: a length nothing else sends here
SKB_LEN = 14 + 20 + 8 + PAYLOAD                 # what net_dev_queue sees: Ethernet, IPv4, ICMP, payload


class _NoStream:
    def output_so_far(self) -> str:
        return ""                                # no loss counter to wait for: every round runs


def pid1_tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/1/task")}


def witness(sandbox, facts, plan, tracefs) -> tuple[int, int, int, int]:
    """One flood: (hits the trace event witnessed, runs of the bare program, witnessed hits on
    PID 1's time, echo requests sent)."""
    instance = Path(tracefs) / "instances" / f"routetrace-witness-{os.getpid()}"
    tasks = pid1_tasks()
    instance.mkdir()
    event = instance / "events" / "net" / "net_dev_queue"
    try:
        (instance / "buffer_size_kb").write_text("65536")
        (event / "filter").write_text(f"len == {SKB_LEN}")
        with Tracer(plan, None if facts.headers.matches else str(facts.headers.path)) as tracer:
            counter = tracer._table(b"floor_count")
            (event / "enable").write_text("1")
            load = nest_on_one_cpu(sandbox, _NoStream(), "-", max_rounds=2, echo=True, flood_size=PAYLOAD)
            time.sleep(0.5)                      # the RPS backlog drains: its replies are sent
            (event / "enable").write_text("0")
            delivered = sum(counter[counter.Key(0)])
        tasks |= pid1_tasks()
        witnessed = on_pid1 = 0
        for cpu in sorted((instance / "per_cpu").iterdir()):
            stats = dict(line.split(":", 1) for line in (cpu / "stats").read_text().splitlines() if ":" in line)
            assert int(stats["overrun"]) == 0, f"{cpu.name}: the trace buffer overflowed, witness incomplete"
            for line in (cpu / "trace").read_text().splitlines():
                if "net_dev_queue:" not in line:
                    continue
                witnessed += 1
                # "<comm>-<tid> [cpu] flags timestamp: net_dev_queue: ..."
                on_pid1 += int(line.split("[", 1)[0].strip().rsplit("-", 1)[1]) in tasks
    finally:
        try:
            (event / "enable").write_text("0")
        except OSError:
            pass
        instance.rmdir()
    return witnessed, delivered, on_pid1, load.flood_sent


def test_the_hits_bpf_programs_miss_are_exactly_those_on_pid1s_time(quiet):
    facts = kernel.gather()
    tracefs = kernel.mount_tracefs() or facts.tracefs
    plan = floor_plan("raw")
    plan.extra_cflags = [*plan.extra_cflags, f"-DFLOOR_SKB_LEN={SKB_LEN}",
                         f"-DOFF_SKB_LEN={btf.Btf.load().offsetof('sk_buff.len')}"]
    # Where the kernel skips, a few floods, until one lands softirq work on PID 1's time (most do).
    for _ in range(4 if facts.bpf_skips_pid1 else 1):
        witnessed, delivered, on_pid1, requests = witness(quiet, facts, plan, tracefs)
        print(f"witnessed {witnessed}, delivered {delivered}, on PID 1's time {on_pid1}; "
              f"{requests} echo requests; bpf_skips_pid1={facts.bpf_skips_pid1}")
        assert delivered > requests // 2 and witnessed >= delivered
        assert witnessed - delivered == (on_pid1 if facts.bpf_skips_pid1 else 0)
        if on_pid1:
            break
