"""Per-packet cost of the transmit program against the floor, run by scripts/bench-xmit-cost.

The floor (bpf/floor.c: one per-CPU increment on the same hook: the BTF-typed tracepoint and the
raw one), routetrace's programs as the plan chooses them (the BTF-typed tracepoint where the kernel
takes it) and on the raw tracepoint ("routetrace-raw", ROUTETRACE_XMIT_HOOK=raw), and optionally
the programs of another checkout (--against DIR: its bpf/ directory, e.g. from
`git archive OLD | tar -x -C /tmp/old`, on the raw tracepoint, and as "against-typed" on the typed
one where that checkout has it) are loaded together and attached one at a time,
in alternating order, for slices of UDP traffic in a throwaway namespace. The kernel's own
statistics (kernel.bpf_stats_enabled=1) give ns per run of each. --mode known: one flow, every
packet of a known flow; --mode new: distinct flows, every packet a new one, with a reader
polling the notice ring as watch does (the maps are drained between slices).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

from tabulate import tabulate

from . import kernel, netns
from .bench import floor_plan
from .experiment import Sandbox
from .probes import XMIT_HOOK_ENV, Filters, choose
from .tracer import Tracer

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

LOAD_KNOWN = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for _ in range(1000):
        s.sendto(b'x', (sys.argv[1], 9999))
"""
LOAD_NEW = r"""
import socket, sys, time
end = time.monotonic() + float(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
i = 0
while time.monotonic() < end:
    for s in socks:
        for port in range(200):
            s.sendto(b'x', (sys.argv[1], 20000 + port + 200 * (i % 100)))
    i += 1
"""


def xmit_stats(tracer: Tracer) -> tuple[int, int]:
    """Time and runs of the program on net_dev_queue: the plan's transmit program, or the floor."""
    fn = (tracer.plan.xmit or tracer.plan.attachments[-1]).fn
    for p in tracer.program_stats():
        if p.name == fn:
            return p.run_time_ns, p.run_cnt
    raise SystemExit(f"no {fn} in the plan")


def run(against: Path | None, rounds: int, slice_s: float, mode: str) -> list[dict]:
    facts = kernel.gather(prepare_headers=True)
    headers = None if facts.headers.matches else facts.headers.path
    with Sandbox() as sb:
        subprocess.run(["ip", "netns", "exec", sb.host, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                       check=True)
        filters = Filters(netns=netns.inode_of(sb.host))
        plan = choose(facts, filters, backend="tracepoint")
        os.environ[XMIT_HOOK_ENV] = "raw"
        try:
            raw_plan = choose(facts, filters, backend="tracepoint")
        finally:
            del os.environ[XMIT_HOOK_ENV]
        plans = {"floor": floor_plan("raw")}
        if facts.btf_tracepoints:
            plans["floor-btf"] = floor_plan("btf")
        if against is not None:
            # Checkouts before the BTF-typed hook named the raw one for bcc's auto-attach.
            named = "xmit_raw" if "xmit_raw" in (against / "tracepoint.c").read_text() else "raw_tracepoint__net_dev_queue"
            old_xmit = dataclasses.replace(raw_plan.xmit, fn=named)
            plans["against"] = dataclasses.replace(raw_plan, sources=[against / p.name for p in plan.sources],
                                                   attachments=[*raw_plan.attachments[:-1], old_xmit])
            if "xmit_btf" in (against / "tracepoint.c").read_text() and plan.xmit != raw_plan.xmit:
                # ... and where it has the typed hook too, on that hook, as this plan attaches it.
                plans["against-typed"] = dataclasses.replace(plan, sources=[against / p.name for p in plan.sources],
                                                             attachments=list(plan.attachments))
        plans["routetrace"] = plan
        if plan.xmit != raw_plan.xmit:
            plans["routetrace-raw"] = raw_plan
        tracers: dict[str, Tracer] = {}
        try:
            for name, p in plans.items():
                tracers[name] = Tracer(p, headers).__enter__()
                tracers[name].set_attached(False)
            # The hook each transmit program really took (a refused typed program falls back).
            hooks = {n: t.plan.xmit.kind for n, t in tracers.items() if t.plan.xmit}
            totals = {n: [0, 0] for n in tracers}
            per_round: dict[str, list] = {n: [] for n in tracers}
            order = list(tracers)
            dest = sb.own_addr if mode == "known" else sb.peer_addr
            for r in range(rounds):
                for name in (order if r % 2 == 0 else order[::-1]):
                    t = tracers[name]
                    if not name.startswith("floor"):
                        for _ in t.drain(final=True):      # new flows again in every slice
                            pass
                    before = xmit_stats(t)
                    t.set_attached(True)
                    done = threading.Event()

                    def read_ring(t=t):
                        while not done.is_set():
                            t.poll(100)
                    reader = threading.Thread(target=read_ring, daemon=True)
                    if not name.startswith("floor"):
                        reader.start()
                    subprocess.run(["ip", "netns", "exec", sb.host, sys.executable, "-c",
                                    LOAD_KNOWN if mode == "known" else LOAD_NEW, dest, str(slice_s)], check=True)
                    done.set()
                    if not name.startswith("floor"):
                        reader.join()
                    t.set_attached(False)
                    after = xmit_stats(t)
                    ns, cnt = after[0] - before[0], after[1] - before[1]
                    totals[name][0] += ns
                    totals[name][1] += cnt
                    per_round[name].append(round(ns / cnt) if cnt else None)
        finally:
            for t in tracers.values():
                t.__exit__(None, None, None)
    # Each program against the floor on its own hook.
    floors = {n: totals[n][0] / totals[n][1] for n in ("floor", "floor-btf") if n in totals and totals[n][1]}

    def floor_of(name: str) -> float:
        btf = name == "floor-btf" or (name in ("routetrace", "against-typed") and hooks[name] == "btf_tracepoint")
        return floors["floor-btf" if btf else "floor"]
    return [{"program": n, "runs": c, "ns_per_run": ns / c if c else None,
             "x_floor": ns / c / floor_of(n) if c else None, "per_round": per_round[n]}
            for n, (ns, c) in totals.items()]


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench-xmit-cost")
    ap.add_argument("--against", type=Path, help="another checkout's bpf/ directory, measured beside this one")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--slice", type=float, default=1.0, help="seconds of traffic per program per round")
    ap.add_argument("--mode", choices=("known", "new"), default="known")
    args = ap.parse_args()
    previous = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        rows = run(args.against, args.rounds, args.slice, args.mode)
    finally:
        STATS_SYSCTL.write_text(previous)
    print(f"mode {args.mode}: {'a packet of one known flow' if args.mode == 'known' else 'every packet a new flow'}")
    print(tabulate([(r["program"], r["runs"], f"{r['ns_per_run']:.0f}", f"{r['x_floor']:.2f}",
                     " ".join(str(x) for x in r["per_round"])) for r in rows],
                   headers=("PROGRAM", "RUNS", "NS/RUN", "x FLOOR (same hook)", "NS/RUN PER ROUND"), disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
