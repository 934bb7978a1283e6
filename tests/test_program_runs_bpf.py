"""Every run of the transmit program is accounted or counted as lost -- under the load where the
kernel itself does not run it for every packet.

An ICMP echo flood that RPS steers into the softirq of a CPU that is itself sending. On the 6.18
sandbox kernel here, the softirq work that lands on PID 1's time is not handed to any BPF program
(a patch: tests/test_pid1_skips_bpf.py, README Limits), and the kernel counts nothing for it.
routetrace cannot count what it is never handed, and says so (KernelFacts.limits, doctor,
--dry-run); what it is handed it must account. The kernel's own count of the transmit program's
runs (run_cnt, kernel.bpf_stats_enabled=1), read once the traffic is over and again in the
summary, brackets what the summary explains.
"""
import os
import signal
from pathlib import Path

import pytest

from conftest import json_objects
from routetrace import kernel
from routetrace.bench import bpf_stats_enabled
from test_accounting_bpf import quiet  # noqa: F401  (a fixture used here)
from test_recursion_loss_bpf import nest_on_one_cpu

pytestmark = pytest.mark.bpf

BPF_PROG_TYPE_TRACING = 26           # the typed hook; bpfsys loads xmit_btf as this type


def typed_program_runs(pid: int) -> int:
    """run_cnt of the BPF-typed tracepoint programs the process holds (/proc/PID/fdinfo)."""
    runs = 0
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":", 1) for line in fd.read_text().splitlines() if ":" in line)
        except OSError:
            continue                 # an fd closed meanwhile
        if fields.get("prog_type", "").strip() == str(BPF_PROG_TYPE_TRACING):
            runs += int(fields["run_cnt"])
    return runs


def test_every_run_of_the_transmit_program_is_accounted_under_an_rps_flood(quiet, live):
    with bpf_stats_enabled() as enabled:
        assert enabled, "kernel.bpf_stats_enabled cannot be set: runs would not be counted"
        # Every namespace, no filter: each run either counts its packet or counts it as lost.
        run = live("watch", "--json")
        load = nest_on_one_cpu(quiet, run, "xmit_missed", max_rounds=3, echo=True)
        runs_when_quiet = typed_program_runs(run.proc.pid)
        rc, out, err = run.stop(signal.SIGINT, timeout=300)
    assert rc == 0, err
    summary = json_objects(out)[-1]
    assert summary["type"] == "summary"
    xmit = [p for p in summary["programs"] if p["name"] == "xmit_btf"]
    assert xmit, f"the typed hook was not taken here: {summary['programs']}"
    lost = summary["lost"]
    explained = summary["accounted"]["packets"] + lost["packets_lost"] + lost["undecoded"]
    print(f"runs {runs_when_quiet}..{xmit[0]['run_cnt']}, explained {explained}; "
          f"{load.flood_sent} echo requests, {load.sent} datagrams")
    assert load.flood_sent > 0 and runs_when_quiet >= load.sent
    assert runs_when_quiet <= explained <= xmit[0]["run_cnt"], (runs_when_quiet, explained, xmit, lost)
    assert lost["xmit_missed"] == 0 and xmit[0]["recursion_misses"] == 0
    # What the kernel skips uncounted is said beside the counters, not left out of them.
    assert lost.get("uncountable", []) == kernel.gather().uncountable("tracepoint")
