"""The storm cases of the accounting benchmark, run by scripts/bench-scale (see that script)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tabulate import tabulate

from routetrace.experiment import Sandbox

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
CASES = [  # name, flows, packets per flow, storm processes, extra watch flags
    ("1e4 flows x 1", 10_000, 1, 1, []),
    ("1e5 flows x 1", 100_000, 1, 2, []),
    ("1e6 flows x 1", 1_000_000, 1, 2, []),
    ("3e4 flows x 3", 30_000, 3, 1, []),
    ("1e3 flows x 1e3", 1_000, 1_000, 2, []),
    ("1e5 x 1, --max-flows 1024", 100_000, 1, 2, ["--max-flows", "1024"]),
]
# Datagrams per sendmmsg call: one sendto per datagram spent ~2 µs of Python each, and two
# such senders could not offer much over 80,000 new flows/s here.
STORM_BATCH = 64
QUICK = {"1e4 flows x 1", "3e4 flows x 3", "1e5 x 1, --max-flows 1024"}
# --sweep: new flows paced at a steady rate (two senders), to find the rate the session keeps up
# with -- no notice dropped, no packet lost -- on this machine.
SWEEP_SECONDS = 4
SWEEP_RATES = (25_000, 50_000, 75_000, 100_000, 150_000, 200_000)


def handed(ns: str) -> int:
    """Packets the namespace's devices were handed (see tests/test_accounting_bpf.py)."""
    data = json.loads(subprocess.run(["ip", "-n", ns, "-j", "-s", "link"], capture_output=True, text=True,
                                     check=True).stdout)
    return sum(link["stats64"]["tx"]["packets"] + link["stats64"]["tx"]["dropped"]
               + (link["stats64"]["rx"]["dropped"] if link.get("link_type") == "loopback" else 0) for link in data)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare(sb: Sandbox) -> None:
    """IPv4 only in the sandbox, and the peer's address resolved before anything is counted."""
    subprocess.run(["ip", "netns", "exec", sb.host, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=True)
    subprocess.run(["ip", "netns", "exec", sb.host, sys.executable, "-c",
                    f"import socket, time; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'w', "
                    f"('{sb.peer_addr}', 9)); time.sleep(0.3)"], check=True)


class Watch:
    """`routetrace watch --netns NS --json` running, read by a consumer that keeps up (as a
    terminal or `| jq` would): it counts the flow lines and keeps the last line (the summary)."""

    def __init__(self, ns: str, extra=()):
        self.proc = subprocess.Popen([sys.executable, "-m", "routetrace", "watch", "--netns", ns, "--json", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.streamed, self.last = 0, ""
        self._reader = threading.Thread(target=self._consume, daemon=True)
        self._reader.start()
        head = self.proc.stderr.readline()
        if "Tracing" not in head:
            raise SystemExit(f"watch did not start: {head}{self.proc.stderr.read()}")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def _consume(self) -> None:
        for line in self.proc.stdout:
            if line.startswith('{"type":"flow"'):
                self.streamed += 1
            self.last = line

    def stop(self) -> dict:
        """Ctrl-C, then its summary."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=600)
        self._reader.join(60)
        return json.loads(self.last)


def run_case(name, flows, per_flow, procs, extra, rate: float = 0) -> dict:
    with Sandbox() as sb:
        prepare(sb)
        watch = Watch(sb.host, extra)
        attached = proc_status(watch.pid)
        cpu0 = cpu_seconds(watch.pid)
        before = handed(sb.host)
        per_proc = flows // procs
        start = time.perf_counter()
        storms = [subprocess.Popen(["ip", "netns", "exec", sb.host, sys.executable, "-m", "routetrace.storm",
                                    sb.peer_addr, str(per_proc), "--packets", str(per_flow),
                                    "--base-port", str(1024 + i * 30000 if procs > 1 else 20000),
                                    "--sockets", str(-(-per_proc // 25000)),   # at most 25,000 ports per socket
                                    "--batch", str(STORM_BATCH),
                                    *(["--rate", str(rate / procs)] if rate else [])], stdout=subprocess.PIPE, text=True)
                  for i in range(procs)]
        sent = [json.loads(p.communicate()[0]) for p in storms]
        storm_s = time.perf_counter() - start
        time.sleep(2)
        after = handed(sb.host)
        peak = proc_status(watch.pid)
        cpu1 = cpu_seconds(watch.pid)
        summary = watch.stop()
        streamed = watch.streamed
    lost, acc = summary["lost"], summary["accounted"]
    programs = {p["name"]: p for p in summary.get("programs", [])}
    xmit = next((p for n, p in programs.items() if "xmit" in n or "net_dev_queue" in n), None)
    fib = programs.get("raw_tracepoint__fib_table_lookup")
    offered = sum(s["sent"] for s in sent)
    return {
        "case": name, "new_flows_per_s": flows / storm_s, "packets_offered": offered,
        "packets_handed_to_devices": after - before, "accounted": acc["packets"],
        "lost": lost["packets_lost"], "undecoded": lost["undecoded"],
        "unexplained": (after - before) - acc["packets"] - lost["packets_lost"] - lost["undecoded"],
        "notices_dropped": lost["events_dropped"], "flows": acc["flows"], "folded": acc["folded"],
        "streamed": streamed,
        "ns_per_packet": xmit["run_time_ns"] / xmit["run_cnt"] if xmit and xmit["run_cnt"] else None,
        "ns_per_fib_lookup": fib["run_time_ns"] / fib["run_cnt"] if fib and fib["run_cnt"] else None,
        "user_cpu_s": cpu1 - cpu0, "rss_attached_mb": attached.get("VmRSS"), "rss_peak_mb": peak.get("VmHWM"),
    }


def machine_busy_s(stat: Path = Path("/proc/stat")) -> float:
    """CPU seconds all CPUs spent working since boot (/proc/stat: user, nice, system, irq,
    softirq; guest time is inside user). Not idle or iowait, nor steal: time the hypervisor gave
    to others is no work of this machine's."""
    fields = stat.read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pid: int, quiet_s: float = 0.5, longest_s: float = 60) -> None:
    """Until the process has used (almost) no CPU for quiet_s: the session has caught up."""
    deadline = time.monotonic() + longest_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last < 0.05 * quiet_s:
            return
        last = now


BUDGET_FLOWS = 300_000
BUDGET_RATE = 200_000


def run_budget(flows: int = BUDGET_FLOWS, traced: bool = True) -> dict:
    """Where a storm's CPU goes, machine-wide: one sender as fast as it goes (batched), untraced
    or under `watch --json`. The senders' process, the session's, and the rest (the kernel's
    softirq work on the receiving side, kernel threads), from /proc, until the session has
    caught up (2 s after the last datagram untraced)."""
    import resource
    with Sandbox() as sb:
        prepare(sb)
        watch = summary = None
        if traced:
            watch = Watch(sb.host)
            session0 = cpu_seconds(watch.pid)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0 = machine_busy_s()
        start = time.perf_counter()
        sender = subprocess.run(["ip", "netns", "exec", sb.host, sys.executable, "-m", "routetrace.storm",
                                 sb.peer_addr, str(flows), "--base-port", "1024", "--sockets",
                                 str(-(-flows // 60000)), "--batch", str(STORM_BATCH)],
                                capture_output=True, text=True, check=True)
        storm_s = time.perf_counter() - start
        if watch is None:
            time.sleep(2)
        else:
            wait_until_idle(watch.pid)
        busy = machine_busy_s() - busy0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sender_s = (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
        session_s = 0.0
        if watch is not None:
            session_s = cpu_seconds(watch.pid) - session0
            summary = watch.stop()
    sent = json.loads(sender.stdout)["sent"]
    return {"traced": traced, "flows": flows, "sent": sent, "new_flows_per_s": flows / storm_s,
            "machine_cpu_s": busy, "sender_cpu_s": sender_s, "session_cpu_s": session_s,
            "rest_cpu_s": busy - sender_s - session_s,
            "notices_dropped": summary["lost"]["events_dropped"] if summary else None,
            "packets_lost": summary["lost"]["packets_lost"] if summary else None}


def budget_report(untraced: dict, traced: dict, cpus: int, rate: int = BUDGET_RATE) -> str:
    """The table of both runs, then what it means for `rate` new flows/s on `cpus` CPUs."""
    def us(r, k):
        return 1e6 * r[k] / r["flows"]
    rows = [(("traced (watch --json)" if r["traced"] else "untraced"), f"{r['new_flows_per_s']:.0f}",
             f"{us(r, 'machine_cpu_s'):.2f}", f"{us(r, 'sender_cpu_s'):.2f}", f"{us(r, 'rest_cpu_s'):.2f}",
             f"{us(r, 'session_cpu_s'):.2f}", "-" if r["notices_dropped"] is None else r["notices_dropped"])
            for r in (untraced, traced)]
    table = tabulate(rows, headers=("RUN", "NEW FLOWS/S", "MACHINE µs/FLOW", "SENDER µs/FLOW", "OTHER µs/FLOW",
                                    "SESSION µs/FLOW", "NOTICES DROPPED"), disable_numparse=True)
    kernel = (traced["machine_cpu_s"] - traced["session_cpu_s"]) / traced["flows"]      # all but the session
    session = traced["session_cpu_s"] / traced["flows"]
    left = cpus - rate * kernel
    return (f"{table}\n"
            f"At {rate:,} new flows/s the traced senders and kernel alone take {rate * kernel:.2f} of {cpus} CPUs, "
            f"leaving {1e6 * max(left, 0) / rate:.2f} µs of CPU per new flow for the session, "
            f"which spent {1e6 * session:.2f}; these {cpus} CPUs carry at most {cpus / (kernel + session):,.0f} "
            f"new flows/s traced.")


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench-scale")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--case", action="append", help="run only cases whose name contains this")
    ap.add_argument("--budget", action="store_true",
                    help="where a storm's CPU goes, untraced and traced, and what is left per new flow at 200,000/s")
    ap.add_argument("--sweep", action="store_true",
                    help="paced storms at rising rates instead of the cases (--case 25000,50000: these rates)")
    args = ap.parse_args()
    cases = [(name, flows, per, procs, extra, 0) for name, flows, per, procs, extra in CASES]
    if args.sweep:
        rates = [int(r) for c in args.case or [] for r in c.split(",") if r.isdigit()] or SWEEP_RATES
        args.case = None
        cases = [(f"paced {rate // 1000}k/s x {SWEEP_SECONDS} s", rate * SWEEP_SECONDS, 1, 2, [], rate)
                 for rate in rates]
    if args.budget:
        untraced, traced = run_budget(traced=False), run_budget(traced=True)
        if args.json:
            print(json.dumps(untraced), json.dumps(traced), sep="\n")
        else:
            print(budget_report(untraced, traced, os.cpu_count() or 1))
        return 0
    previous = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    rows = []
    try:
        for name, flows, per, procs, extra, rate in cases:
            if args.quick and name not in QUICK or args.case and not any(c in name for c in args.case):
                continue
            r = run_case(name, flows, per, procs, extra, rate)
            rows.append(r)
            print(json.dumps(r) if args.json else f"{name}: done", file=sys.stdout if args.json else sys.stderr,
                  flush=True)
    finally:
        STATS_SYSCTL.write_text(previous)
    if not args.json:
        def f(v, spec="{:.0f}"):
            return "-" if v is None else spec.format(v)
        print(tabulate([(r["case"], f(r["new_flows_per_s"]), r["packets_offered"], r["packets_handed_to_devices"],
                         r["accounted"], r["lost"], r["unexplained"], r["notices_dropped"], r["streamed"],
                         f(r["ns_per_packet"]), f(r["ns_per_fib_lookup"]), f(r["user_cpu_s"], "{:.1f}"),
                         f"{r['rss_attached_mb']}/{r['rss_peak_mb']}") for r in rows],
                       headers=("CASE", "NEW FLOWS/S", "OFFERED", "HANDED", "ACCOUNTED", "LOST", "UNEXPLAINED",
                                "NOTICES DROPPED", "STREAMED", "NS/PKT", "NS/FIB", "CPU S", "RSS MB (attached/peak)"),
                       disable_numparse=True))
    return 1 if any(r["unexplained"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
