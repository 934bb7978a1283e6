"""`routetrace bench`: is 127.0.0.1 faster than an own address, and ::1 than an own IPv6
address? Measured with the field's own load generators (loadgen.py), interleaved, with
intervals; and what tracing costs.

A comparison is one family's pair of targets: its loopback address against an own address
(IPv4: 127.0.0.1 against 198.51.100.1 in the sandbox; IPv6: ::1 against 2001:db8::1). Both
families by default, -4 / -6 restrict (bcc's convention). Every target is one more slot in
the same interleaved rounds, and each family's pair is compared as a lone pair would be.

Each round measures every (condition, target, mode) slot once in a shuffled order, so drift
(CPU frequency, other load) hits both targets alike; a comparison is the per-round ratio,
summarised as a geometric mean with a 95% t-interval, "measurable" only when that interval
excludes 1.

Conditions: "untraced"; with --trace also "traced" (routetrace's real session, pumped from a
background thread as watch pumps it) and the floor: one per-CPU increment on the same tracepoint,
the way routetrace's transmit program is attached ("floor-btf" for the BTF-typed tracepoint,
"floor-raw" for the raw one) and as a regular tracepoint ("floor-tp", which copies its record
first). Only one set of programs is attached at a time; the others stay loaded and detached.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

from tabulate import tabulate

from . import loadgen, netns
from .errors import UsageError
from .experiment import enter_sandbox
from .probes import Filters

# Two-sided 95% Student t critical values by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    if df < 1:
        raise ValueError("need at least two rounds for an interval")
    if df > 120:
        return 1.960
    return _T95[max(k for k in _T95 if k <= df)]      # between table rows: the wider interval


@dataclass(frozen=True)
class Ratio:
    """Geometric mean of paired ratios b/a and its 95% confidence interval."""
    mean: float
    low: float
    high: float
    n: int

    @property
    def measurable(self) -> bool:
        """The interval excludes 1: the difference is larger than the run-to-run noise."""
        return self.low > 1.0 or self.high < 1.0

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def paired_ratio(a: list[float], b: list[float]) -> Ratio:
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired ratio needs two equally long series of at least two values")
    logs = [math.log(y / x) for x, y in zip(a, b)]
    mean = statistics.fmean(logs)
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def geo_interval(values: list[float]) -> Ratio:
    """Geometric mean of one series and its 95% interval (the plot's bands)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return Ratio(v, v, v, len(values))
    return paired_ratio([1.0] * len(values), values)


# ---- what is compared ------------------------------------------------------------------------

FAMILIES = (4, 6)
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


@dataclass(frozen=True)
class Comparison:
    """One family's question: is its loopback address faster than the own address `own`?"""
    family: int
    own: str

    @property
    def loopback(self) -> str:
        return LOOPBACK[self.family]

    @property
    def name(self) -> str:
        return FAMILY_NAMES[self.family]

    @property
    def targets(self) -> list[str]:
        return [self.loopback, self.own]

    def to_dict(self) -> dict:
        return {"family": self.name, "loopback": self.loopback, "own": self.own}


def _checked_own(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Whether an address given with --to can stand for "an own address" in a comparison."""
    if addr.is_loopback:
        raise UsageError(f"--to {addr} is a loopback address: give an own address to compare with "
                         f"{LOOPBACK[addr.version]}")
    if addr.version == 6 and addr.ipv4_mapped is not None:
        raise UsageError(f"--to {addr} is an IPv4-mapped address: give the IPv4 address {addr.ipv4_mapped}")
    if addr.version == 6 and addr.is_link_local:
        raise UsageError(f"--to {addr} is link-local: a connection to it needs a scope (%dev), "
                         f"give a global IPv6 address")
    if addr.is_multicast or addr.is_unspecified:
        raise UsageError(f"--to {addr} is not a unicast address")


def host_ipv6(inode: int | None = None) -> list[str]:
    """This namespace's own IPv6 addresses a client can reach without a scope, in order: every
    configured one except ::1 and the link-local ones (unique-local addresses count: they are
    scope global to the kernel, as 10/8 is an own IPv4 address)."""
    out = []
    for text in netns.addresses(netns.current_inode() if inode is None else inode):
        addr = ipaddress.ip_address(text)
        if addr.version == 6 and not (addr.is_loopback or addr.is_link_local or addr.is_multicast):
            out.append(addr)
    return [str(a) for a in sorted(out)]


def _none_of(family: int) -> str:
    return ("this host has no IPv4 address besides loopback" if family == 4 else
            "this host has no global IPv6 address (only ::1 and link-local ones)")


def choose_comparisons(family: int | None, given: list[str], own4: list[str],
                       own6: list[str]) -> tuple[list[Comparison], list[str]]:
    """The comparisons to measure, IPv4 first, and notes on a family left out.
    family: 4 or 6 (-4/-6), None for both; given: --to addresses (at most one per family);
    own4/own6: the own addresses found, used when nothing is given."""
    picked: dict[int, str] = {}
    for value in given:
        addr = ipaddress.ip_address(value)
        if family is not None and addr.version != family:
            raise UsageError(f"--to {addr} is an {FAMILY_NAMES[addr.version]} address, but "
                             f"-{family} measures {FAMILY_NAMES[family]} only")
        _checked_own(addr)
        if addr.version in picked:
            raise UsageError(f"--to takes one address per family: {picked[addr.version]} and {addr} are both "
                             f"{FAMILY_NAMES[addr.version]}")
        picked[addr.version] = str(addr)
    notes = []
    if not picked:
        found = {4: own4, 6: own6}
        for fam in ([family] if family else FAMILIES):
            if found[fam]:
                picked[fam] = found[fam][0]
            elif family:
                raise UsageError(f"{_none_of(fam)}: give one with --to, or use --sandbox")
            else:
                notes.append(f"{_none_of(fam)}: {FAMILY_NAMES[fam]} is not measured (give one with --to)")
        if not picked:
            raise UsageError("this host has no own address besides loopback: give one with --to, or use --sandbox")
    return [Comparison(f, picked[f]) for f in FAMILIES if f in picked], notes


# ---- what is measured -----------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    mode: str
    key: str          # in loadgen.Result.values
    label: str
    unit: str
    lower_is_better: bool

    @property
    def name(self) -> str:
        return f"{self.mode} {self.label}"


def _latency(mode: str, what: str) -> list[Metric]:
    return [Metric(mode, f"p{q:g}", f"{what} p{q:g}", "us", True) for q in loadgen.PERCENTILES]


METRICS: list[Metric] = [
    *_latency("tcp-rr", "TCP round trip"),
    *_latency("udp-rr", "UDP round trip"),
    Metric("tcp-tp", "mb_per_s", "TCP throughput", "MB/s", False),
    Metric("udp-tp", "mb_per_s", "UDP send rate", "MB/s", False),
    Metric("tcp-bulk", "mb_per_s", "TCP bulk throughput", "MB/s", False),
    Metric("conn", "per_s", "connection rate", "conn/s", False),
]
MODES = tuple(loadgen.MODES)


def conditions_for(xmit_kind: str) -> tuple[str, ...]:
    """The conditions of a --trace run: the first floor sits on the transmit program's own hook."""
    return ("untraced", "traced", "floor-btf" if xmit_kind == "btf_tracepoint" else "floor-raw", "floor-tp")


CONDITIONS = conditions_for("raw_tracepoint")   # where the transmit program is on the raw hook
# The observer-effect goals (a benchmark output, not an assertion): the largest acceptable
# cost on one metric each, as a fraction.
GOALS = {("tcp-rr", "p50"): 0.02, ("conn", "per_s"): 0.05, ("tcp-bulk", "mb_per_s"): 0.01}
CDF_POINTS = 2000          # latencies kept per slice (evenly spaced ranks) for the plot
REGIME_GAP = 1.15          # untraced round-trip p50s further apart than this: separate regimes


def metrics_for(modes) -> list[Metric]:
    return [m for m in METRICS if m.mode in modes]


@dataclass
class Samples:
    """values[(condition, target, mode, key)] = one value per round, in round order;
    latencies[(condition, target, mode)] = kept round trips, pooled over rounds;
    tools[(target, mode)] = the tool that measured it (the families may differ)."""
    values: dict[tuple[str, str, str, str], list[float]] = field(default_factory=dict)
    latencies: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    tools: dict[tuple[str, str], str] = field(default_factory=dict)
    extras: dict[tuple[str, str, str], list[dict]] = field(default_factory=dict)

    def add(self, condition: str, target: str, result: loadgen.Result) -> None:
        self.tools[(target, result.mode)] = result.tool
        for key, value in result.values.items():
            self.values.setdefault((condition, target, result.mode, key), []).append(float(value))
        if result.latencies_us:
            self.latencies.setdefault((condition, target, result.mode), []).extend(thin(result.latencies_us))

    def get(self, condition, target, metric: Metric) -> list[float]:
        return self.values.get((condition, target, metric.mode, metric.key), [])


def thin(sorted_values: list[float], points: int = CDF_POINTS) -> list[float]:
    """Evenly spaced order statistics (the first and the last always among them)."""
    n = len(sorted_values)
    if n <= points:
        return list(sorted_values)
    return [sorted_values[round(i * (n - 1) / (points - 1))] for i in range(points)]


def run(measure, targets: list[str], *, modes=MODES, rounds: int, seconds: float,
        conditions=("untraced",), set_condition=lambda c: None, progress=sys.stderr,
        shuffle=random.shuffle) -> Samples:
    """measure(condition, mode, target, seconds) -> loadgen.Result. Every round visits every
    (condition, target, mode) once, in a fresh random order; one condition's slots stay
    together within a round (switching probes costs time), and the conditions' order
    alternates between rounds."""
    samples = Samples()
    slots = [(c, t, m) for c in conditions for t in targets for m in modes]
    for r in range(1, rounds + 1):
        order = list(slots)
        shuffle(order)
        cond_order = list(conditions)
        shuffle(cond_order)
        order.sort(key=lambda s: cond_order.index(s[0]))
        for i, (cond, target, mode) in enumerate(order, start=1):
            set_condition(cond)
            print(f"\r[round {r}/{rounds}] {i}/{len(order)} {mode:<8} {target:<15} {cond:<9}",
                  end="", file=progress, flush=True)
            samples.add(cond, target, measure(cond, mode, target, seconds))
    print(file=progress, flush=True)
    return samples


# ---- reading the samples ---------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) < 1e5 else f"{value:.0f}"


def regimes(values: list[float], gap: float = REGIME_GAP) -> list[list[int]]:
    """Round indexes grouped by level: sorted values split wherever the next one is more than
    `gap` times the previous. One group: a stable machine."""
    if not values:
        return []
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups = [[order[0]]]
    for prev, cur in zip(order, order[1:]):
        if values[prev] > 0 and values[cur] / values[prev] > gap:
            groups.append([])
        groups[-1].append(cur)
    return groups


def stable_rounds(samples: Samples, targets) -> tuple[list[int] | None, str | None]:
    """Rounds in which the untraced TCP round trip sat at its usual level, for every target,
    and a note when some did not (None, None: no TCP round trip measured)."""
    m = next((m for m in METRICS if m.mode == "tcp-rr" and m.key == "p50"), None)
    series = [samples.get("untraced", t, m) for t in targets]
    if not all(series):
        return None, None
    n = len(series[0])
    keep = set(range(n))
    notes = []
    for target, values in zip(targets, series):
        groups = regimes(values)
        if len(groups) > 1:
            main = max(groups, key=len)
            keep &= set(main)
            levels = ", ".join(f"{statistics.median(values[i] for i in g):.1f} us in round"
                               f"{'s' if len(g) > 1 else ''} {', '.join(str(i + 1) for i in sorted(g))}"
                               for g in groups)
            notes.append(f"{target}: {levels}")
    if not notes:
        return sorted(keep), None
    kept = sorted(keep)
    note = ("the untraced TCP round trip sat in more than one regime (" + "; ".join(notes) +
            "): a cost of a few percent cannot be resolved across them. " +
            (f"Costs below use only rounds {', '.join(str(i + 1) for i in kept)}." if len(kept) >= 2
             else "Too few rounds in one regime: costs below are over all rounds and unreliable."))
    return (kept if len(kept) >= 2 else list(range(n))), note


def _pick(values: list[float], rounds: list[int] | None) -> list[float]:
    return values if rounds is None else [values[i] for i in rounds if i < len(values)]


def comparison_rows(samples: Samples, comparison: Comparison, modes) -> list[dict]:
    loopback, own = comparison.loopback, comparison.own
    rows = []
    for metric in metrics_for(modes):
        a, b = samples.get("untraced", loopback, metric), samples.get("untraced", own, metric)
        if len(a) < 2 or len(a) != len(b):
            continue
        ratio = paired_ratio(a, b)
        if ratio.measurable:
            faster = own if (ratio.mean < 1) == metric.lower_is_better else loopback
            note = f"measurable: {faster} is faster by {abs(ratio.mean - 1) * 100:.1f}%"
        else:
            note = "no measurable difference"
        rows.append({"family": comparison.name, "targets": comparison.targets,
                     "mode": metric.mode, "metric": metric.label, "unit": metric.unit,
                     "tool": samples.tools.get((own, metric.mode), "?"), "loopback": _median(a), "own": _median(b),
                     "ratio": ratio.to_dict(), "measurable": ratio.measurable, "note": note,
                     "rounds_loopback": a, "rounds_own": b})
    return rows


def cost_of(untraced: list[float], traced: list[float], metric: Metric) -> Ratio | None:
    """Ratio oriented so that > 1 is a cost: traced/untraced for latency, untraced/traced for
    rates."""
    if len(untraced) < 2 or len(untraced) != len(traced):
        return None
    return paired_ratio(untraced, traced) if metric.lower_is_better else paired_ratio(traced, untraced)


def goal_verdict(cost: Ratio | None, goal: float | None) -> str:
    if cost is None or goal is None:
        return ""
    limit = 1 + goal
    if cost.high < 1.0:
        # Tracing cannot make the kernel faster: a drift between the condition groups, or noise.
        return f"goal <= {goal:.0%}: not resolved (traced measurably faster: drift between slices)"
    if cost.high <= limit:
        return f"goal <= {goal:.0%}: met"
    if cost.low > limit:
        return f"goal <= {goal:.0%}: missed"
    return f"goal <= {goal:.0%}: not resolved (interval reaches {cost.high - 1:+.1%})"


def cost_rows(samples: Samples, targets, modes, conditions, rounds: list[int] | None) -> list[dict]:
    rows = []
    for target in targets:
        for metric in metrics_for(modes):
            base = _pick(samples.get("untraced", target, metric), rounds)
            row = {"target": target, "mode": metric.mode, "metric": metric.label, "unit": metric.unit,
                   "tool": samples.tools.get((target, metric.mode), "?"), "untraced": _median(base)}
            for cond in conditions[1:]:
                vals = _pick(samples.get(cond, target, metric), rounds)
                cost = cost_of(base, vals, metric)
                row[cond] = _median(vals)
                row[f"{cond}_cost"] = cost.to_dict() if cost else None
                if cond == "traced":
                    row["goal"] = goal_verdict(cost, GOALS.get((metric.mode, metric.key)))
            rows.append(row)
    return rows


def _ratio_text(d: dict | None) -> str:
    return "-" if d is None else str(Ratio(d["mean"], d["low"], d["high"], d["n"]))


def _cost_text(d: dict | None) -> str:
    """A cost as a signed percentage with its interval: +3.1% [+1.0, +5.2]."""
    if d is None:
        return "-"
    return f"{(d['mean'] - 1) * 100:+.1f}% [{(d['low'] - 1) * 100:+.1f}, {(d['high'] - 1) * 100:+.1f}]"


# ---- the observer: session, pumping, BPF statistics, own CPU ---------------------------------

class Pumper:
    """Pumps a Session from a background thread while a traced slice runs (as watch pumps it),
    and adds up that thread's CPU time. Only this thread touches the session while it runs."""

    def __init__(self, session, interval_ms: int = 200):
        self.session, self.interval_ms = session, interval_ms
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.flows = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        t0 = time.thread_time()
        try:
            while not self._stop.is_set():
                self.flows += self.session.pump(self.interval_ms)
        except BaseException as exc:     # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.cpu_s += time.thread_time() - t0

    def __enter__(self) -> "Pumper":
        self._stop.clear()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="routetrace-pump", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s += time.monotonic() - self._started
        if self.error is not None:
            err, self.error = self.error, None
            raise err


@contextlib.contextmanager
def bpf_stats_enabled():
    """kernel.bpf_stats_enabled=1 for the run (run_time_ns is 0 without it), restored after.
    It adds two clock reads to every BPF program run on the machine while on."""
    path = "/proc/sys/kernel/bpf_stats_enabled"
    try:
        with open(path) as fh:
            before = fh.read().strip()
        with open(path, "w") as fh:
            fh.write("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError), open(path, "w") as fh:
            fh.write(before)


def stats_delta(before, after) -> dict[str, tuple[int, int]]:
    """program name -> (runs, ns) between two program_stats() lists."""
    b = {p.name: p for p in before}
    out = {}
    for p in after:
        q = b.get(p.name)
        out[p.name] = (p.run_cnt - (q.run_cnt if q else 0), p.run_time_ns - (q.run_time_ns if q else 0))
    return out


def floor_plan(hook: str):
    """The floor on one way onto net_dev_queue: "raw", "tp" (regular) or "btf" (BTF-typed)."""
    from .probes import BPF_DIR, AttachPlan, Attachment
    att, flags = {
        "raw": (Attachment("raw_tracepoint", "net_dev_queue", "raw_tracepoint__net_dev_queue"), ["-DFLOOR_RAW=1"]),
        "tp": (Attachment("tracepoint", "net:net_dev_queue", "tracepoint__net__net_dev_queue"), []),
        "btf": (Attachment("btf_tracepoint", "net_dev_queue", "floor_btf"), ["-DFLOOR_BTF=1"]),
    }[hook]
    return AttachPlan(backend="floor", sources=[BPF_DIR / "floor.c"], attachments=[att], offsets=[],
                      filters=Filters(), extra_cflags=flags)


@dataclass
class Observer:
    """The programs each condition attaches, and what they cost, slice by slice."""
    programs: dict = field(default_factory=dict)        # condition -> Session or Tracer
    session: object = None
    pumper: Pumper | None = None
    current: str = "untraced"
    per_slot: dict = field(default_factory=dict)        # (cond, target, mode) -> {prog: [runs, ns]}
    slot_seconds: dict = field(default_factory=dict)    # (cond, target, mode) -> seconds
    floor_counts: dict = field(default_factory=dict)    # floor condition -> its count map
    cpu: dict = field(default_factory=lambda: {"pump_cpu_s": 0.0, "process_cpu_s": 0.0, "traced_wall_s": 0.0})

    def set_condition(self, cond: str) -> None:
        if cond == self.current:
            return
        if self.current in self.programs:
            self.programs[self.current].set_attached(False)
        if cond in self.programs:
            self.programs[cond].set_attached(True)
        self.current = cond

    @contextlib.contextmanager
    def slice(self, cond: str, target: str, mode: str):
        prog = self.programs.get(cond)
        if prog is None:
            yield
            return
        before = prog.program_stats()
        ru0 = _process_cpu()
        t0 = time.monotonic()
        if cond == "traced":
            with self.pumper:
                yield
        else:
            yield
        wall = time.monotonic() - t0
        if cond == "traced":
            self.cpu["process_cpu_s"] += _process_cpu() - ru0
            self.cpu["traced_wall_s"] += wall
        slot = self.per_slot.setdefault((cond, target, mode), {})
        for name, (runs, ns) in stats_delta(before, prog.program_stats()).items():
            acc = slot.setdefault(name, [0, 0])
            acc[0] += runs
            acc[1] += ns
        self.slot_seconds[(cond, target, mode)] = self.slot_seconds.get((cond, target, mode), 0.0) + wall


def _process_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def bpf_rows(obs: Observer, samples: Samples) -> list[dict]:
    """Per condition, target, mode and program: runs, ns per run, runs per unit of work."""
    rows = []
    for (cond, target, mode), progs in sorted(obs.per_slot.items()):
        work = None
        if mode == "conn":
            work = sum(samples.values.get((cond, target, mode, "connections"), [])) or None
        for name, (runs, ns) in sorted(progs.items()):
            rows.append({"condition": cond, "target": target, "mode": mode, "program": name, "runs": runs,
                         "ns_per_run": ns / runs if runs else None,
                         "bpf_ms_per_s": ns / 1e6 / obs.slot_seconds[(cond, target, mode)],
                         "runs_per_connection": runs / work if work else None})
    return rows


# ---- output ------------------------------------------------------------------------------------

PIN_CHOICES = ("same", "split", "none")


def pinning_for(pin: str, cpus: int) -> loadgen.Pinning:
    """same: client and servers share the last CPU (a loopback round trip then wakes its peer on
    the CPU it runs on: no cross-CPU wakeup, the stable regime); split: client on CPU 0, servers
    on CPU 1; none: the scheduler decides, and a slice lands in either regime."""
    last = str(cpus - 1)
    if pin == "same":
        return loadgen.Pinning(last, last)
    if pin == "split" and cpus >= 2:
        return loadgen.Pinning("0", "1")
    return loadgen.Pinning()


def machine_facts() -> dict:
    facts = {"kernel": os.uname().release, "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        facts["loadavg"] = open("/proc/loadavg").read().split()[:3]
    return facts


def _steal_jiffies() -> int | None:
    try:
        fields = open("/proc/stat").readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def render(report: dict) -> str:
    out = [f"load: {', '.join(f'{m} {t}' for m, t in report['tools'].items())}; {report['pinning']}"]
    for i, comp in enumerate(report["comparisons"]):
        loopback, own = comp["loopback"], comp["own"]
        rows = [(r["family"], f"{r['mode']} {r['metric']} ({r['unit']})", r["tool"], _fmt(r["loopback"]),
                 _fmt(r["own"]), _ratio_text(r["ratio"]), r["note"])
                for r in report["comparison"] if r["family"] == comp["family"]]
        # One table per family: its columns are named by that family's two addresses.
        out.append(("\n" if i else "") + tabulate(rows, headers=(
            "FAMILY", "METRIC (median of rounds)", "TOOL", loopback, own, f"{own} / {loopback} [95% CI]", "")))
    if report.get("regime_note"):
        out.append("\nnote: " + report["regime_note"])
    if report.get("cost"):
        conds = report["conditions"][1:]
        for r in report["cost"]:
            key = next(((m.mode, m.key) for m in METRICS if m.mode == r["mode"] and m.label == r["metric"]), None)
            c = r.get("traced_cost")
            r["goal"] = goal_verdict(Ratio(c["mean"], c["low"], c["high"], c["n"]) if c else None, GOALS.get(key))
        trows = [(r["target"], f"{r['mode']} {r['metric']} ({r['unit']})", _fmt(r["untraced"]),
                  *(x for c in conds for x in (_fmt(r.get(c)), _cost_text(r.get(f"{c}_cost")))), r.get("goal", ""))
                 for r in report["cost"]]
        heads = ("TARGET", "METRIC (median)", "untraced",
                 *(x for c in conds for x in (c, f"{c} cost [95% CI]")), "")
        out.append("\ncost of tracing (cost > 0 is worse: slower round trip, lower rate); "
                   "floor = one increment on the same hook:\n" + tabulate(trows, headers=heads))
    if report.get("bpf"):
        brows = [(r["condition"], r["target"], r["mode"], r["program"], r["runs"],
                  "-" if r["ns_per_run"] is None else f"{r['ns_per_run']:.0f}", f"{r['bpf_ms_per_s']:.2f}",
                  "-" if r["runs_per_connection"] is None else f"{r['runs_per_connection']:.2f}")
                 for r in report["bpf"]]
        out.append("\nBPF statistics (kernel.bpf_stats_enabled=1 during the run; runs count every packet and "
                   "lookup on the machine during the slice, other namespaces' too: routetrace's filter runs "
                   "inside its programs, the floor has none):\n" + tabulate(
            brows, headers=("CONDITION", "TARGET", "MODE", "PROGRAM", "RUNS", "NS/RUN", "BPF MS/S", "RUNS/CONN")))
    if report.get("observer"):
        o = report["observer"]
        out.append(f"\nroutetrace's own CPU over {o['traced_wall_s']:.1f}s of traced slices: pump thread "
                   f"{o['pump_cpu_s'] * 1e3:.0f} ms ({o['pump_cpu_pct']:.2f}% of one CPU), whole process "
                   f"{o['process_cpu_s'] * 1e3:.0f} ms; session saw {o['flows']} flows, losses: {o['losses']}")
    for note in report.get("notes", []):
        out.append("note: " + note)
    return "\n".join(out)


# ---- the experiment -----------------------------------------------------------------------------

def tools_per_family(families, modes, load: str) -> dict[int, dict[str, str]]:
    """family -> mode -> the tool that drives it (auto: the best installed one that can address
    that family; python: the Python clients everywhere)."""
    if load != "auto":
        return {f: {m: "python" for m in modes} for f in families}
    return {f: loadgen.tools_available(modes, f) for f in families}


def tool_notes(tools: dict[int, dict[str, str]], load: str = "auto") -> list[str]:
    """Where a family had to fall back from an installed tool that cannot address it (with
    --load python nothing fell back: Python was asked for)."""
    notes = []
    if load != "auto":
        return notes
    for family, chosen in tools.items():
        fell_back: dict[str, list[str]] = {}
        for mode, tool in chosen.items():
            for better in loadgen.MODES[mode][1]:
                if better == tool:
                    break
                if loadgen.tool_path(better) and not loadgen.tool_supports(better, family):
                    fell_back.setdefault(better, []).append(mode)
                    break
        for better, modes in fell_back.items():
            notes.append(f"{loadgen.tool_version(better)} cannot address {FAMILY_NAMES[family]} (its -i takes IPv4 "
                         f"only; sockperf 3.8 added IPv6): the {FAMILY_NAMES[family]} rows of {', '.join(modes)} come "
                         f"from the Python clients. Compare those rows within their family, not across families.")
    return notes


def _describe_tools(tools: dict[int, dict[str, str]], modes) -> dict[str, str]:
    """mode -> the tool behind it, naming the family where the families' tools differ."""
    out = {}
    for mode in modes:
        names = {f: loadgen.tool_version(t[mode]) for f, t in tools.items()}
        if len(set(names.values())) == 1:
            out[mode] = next(iter(names.values()))
        else:
            out[mode] = " / ".join(f"{name} ({FAMILY_NAMES[f]})" for f, name in names.items())
    return out


def experiment(prepare, *, sandbox: bool, own: list[str] | None = None, family: int | None = None, port: int,
               rounds: int, seconds: float, modes=MODES, load: str = "auto", pin: str = "same",
               floor: bool = True, as_json: bool = False, plot: str | None = None, out=None, err=None) -> dict:
    """Set the stage (sandbox or this host, the load's servers), optionally the probes
    (prepare(filters) -> (plan, headers); None: untraced only), then measure and print.
    own: --to addresses (at most one per family); family: 4 or 6 (-4/-6), None for both."""
    out, err = out or sys.stdout, err or sys.stderr
    modes = tuple(m for m in MODES if m in modes)
    cpus = os.cpu_count() or 1
    pinning = pinning_for(pin, cpus)
    facts = machine_facts()
    steal0, t_start = _steal_jiffies(), time.monotonic()
    with contextlib.ExitStack() as stack:
        if sandbox:
            sb = enter_sandbox(stack)
            ns = sb.host
            comparisons, notes = choose_comparisons(family, [], [sb.own_addr], [sb.own_addr6])
        else:
            ns = None
            comparisons, notes = choose_comparisons(family, list(own or []), netns.own_ipv4(), host_ipv6())
        tools = tools_per_family([c.family for c in comparisons], modes, load)
        notes = tool_notes(tools, load) + notes
        targets = [t for c in comparisons for t in c.targets]
        # On a real host only the targets are served; in the sandbox, its private namespace.
        stack.enter_context(loadgen.Servers(ns, port, tools, pinning, None if sandbox else targets))
        obs = Observer()
        conditions = ("untraced",)
        if prepare is not None:
            from .session import Session
            from .tracer import Tracer
            stack.enter_context(bpf_stats_enabled())
            plan, headers = prepare(Filters(netns=netns.inode_of(ns)))
            print("loading routetrace's programs" + (" and the floor's" if floor else "") + "...", file=err, flush=True)
            session = stack.enter_context(Session(plan, headers))
            session.set_attached(False)
            obs.programs["traced"], obs.session, obs.pumper = session, session, Pumper(session)
            conditions = ("untraced", "traced")
            if floor:
                conditions = conditions_for(session.plan.xmit.kind)
                for cond in conditions[2:]:
                    hook = cond.removeprefix("floor-")
                    tracer = stack.enter_context(Tracer(floor_plan(hook), headers))
                    # Opening the count map also makes bcc's BPF object truthy (its len() counts
                    # opened maps), which Tracer.program_stats() tests before it reports anything.
                    obs.floor_counts[cond] = tracer._bpf[b"floor_count"]
                    tracer.set_attached(False)
                    obs.programs[cond] = tracer
        family_by_target = {t: c.family for c in comparisons for t in c.targets}

        def measure(cond, mode, target, secs):
            with obs.slice(cond, target, mode):
                return loadgen.measure(mode, tools[family_by_target[target]][mode], ns, target, port, secs, pinning)

        def slot_seconds(tool):
            return (2.2 + loadgen.sockperf_seconds(seconds) if tool == "sockperf" else
                    loadgen.iperf3_seconds(seconds) + 0.1 if tool == "iperf3" else seconds + 0.1)

        total = rounds * len(conditions) * sum(2 * slot_seconds(tools[c.family][m]) for c in comparisons for m in modes)
        pairs = " and ".join(f"{c.loopback} against {c.own}" for c in comparisons)
        print(f"Measuring {pairs}: {rounds} rounds x {len(conditions)} condition(s), about {total:.0f}s...",
              file=err, flush=True)
        samples = run(measure, targets, modes=modes, rounds=rounds, seconds=seconds,
                      conditions=conditions, set_condition=obs.set_condition, progress=err)
        obs.set_condition("untraced")
        result = None
        if obs.session is not None:
            result = obs.session.finish()
    steal1 = _steal_jiffies()
    facts["loadavg_after"] = machine_facts().get("loadavg")
    if steal0 is not None and steal1 is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        facts["steal_pct"] = 100 * (steal1 - steal0) / ticks / ((time.monotonic() - t_start) * cpus)
    report = build_report(samples, comparisons, modes, conditions, tools, pinning, facts, obs, result, notes)
    if plot:
        from . import plot as plotting
        plotting.save(plotting.figure(report, samples), plot)
        print(f"plot written to {plot}", file=err, flush=True)
    if as_json:
        print(json.dumps(report, indent=2), file=out, flush=True)
    else:
        print(render(report), file=out, flush=True)
    return report


def build_report(samples, comparisons: list[Comparison], modes, conditions, tools: dict[int, dict[str, str]],
                 pinning, facts, obs=None, result=None, notes=()) -> dict:
    """Every table of the run. tools: family -> mode -> tool."""
    targets = [t for c in comparisons for t in c.targets]
    report = {"targets": targets, "comparisons": [c.to_dict() for c in comparisons], "modes": list(modes),
              "conditions": list(conditions), "tools": _describe_tools(tools, modes),
              "tools_by_family": {FAMILY_NAMES[f]: {m: loadgen.tool_version(t) for m, t in chosen.items()}
                                  for f, chosen in tools.items()},
              "pinning": pinning.describe(), "machine": facts, "notes": list(notes)}
    for c in comparisons:            # the TOOL column names the tool chosen for each target and mode
        for target in c.targets:
            samples.tools.update({(target, m): tool for m, tool in tools[c.family].items()})
    report["comparison"] = [row for c in comparisons for row in comparison_rows(samples, c, modes)]
    kept, note = stable_rounds(samples, targets)
    report["regime_note"] = note
    report["cost_rounds"] = None if kept is None else [i + 1 for i in kept]
    if len(conditions) > 1:
        report["cost"] = cost_rows(samples, targets, modes, conditions, kept if note else None)
    if obs is not None and obs.per_slot:
        report["bpf"] = bpf_rows(obs, samples)
    if obs is not None and obs.session is not None:
        c = obs.cpu
        report["observer"] = {**c, "pump_cpu_s": obs.pumper.cpu_s,
                              "pump_cpu_pct": 100 * obs.pumper.cpu_s / c["traced_wall_s"] if c["traced_wall_s"] else 0.0,
                              "flows": len(result.flows) if result else 0,
                              "losses": (result.losses.to_dict() if result else {})}
    first = comparisons[0]
    loopback = first.loopback
    if "conn" in modes and tools[first.family].get("conn") == "python":
        user = samples.values.get(("untraced", loopback, "conn", "user_s"), [])
        sys_ = samples.values.get(("untraced", loopback, "conn", "sys_s"), [])
        n = samples.values.get(("untraced", loopback, "conn", "connections"), [])
        if n and sum(n):
            report["conn_client"] = {"user_us_per_conn": 1e6 * sum(user) / sum(n),
                                     "sys_us_per_conn": 1e6 * sum(sys_) / sum(n),
                                     "wall_us_per_conn": 1e6 / statistics.median(
                                         samples.values[("untraced", loopback, "conn", "per_s")])}
            cc = report["conn_client"]
            report["notes"].append(
                f"connection client (Python loop, SO_LINGER 0): {cc['user_us_per_conn']:.1f} us of user CPU "
                f"(the interpreter) and {cc['sys_us_per_conn']:.1f} us of system CPU per connection, "
                f"{cc['wall_us_per_conn']:.1f} us per connection in all (to {loopback})")
    report["samples"] = {"|".join(k): v for k, v in samples.values.items()}
    # every CDF the plot draws, thinned to 1000 points: enough to draw it again from the JSON
    report["cdf_us"] = {"|".join(k): thin(sorted(v), 1000) for k, v in samples.latencies.items()}
    return report
