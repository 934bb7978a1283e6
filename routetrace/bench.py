"""`routetrace bench`: is 127.0.0.1 faster than an own address? Measured, interleaved, with intervals.

Each round measures every target once per metric, in shuffled order, so drift (CPU frequency,
other load) hits both targets alike; the comparison is the per-round ratio, summarised as a
geometric mean with a 95% t-interval. The clients are Python: absolute numbers include its
overhead, which is the same for both targets, so the ratio is what to read.
"""
from __future__ import annotations

import contextlib
import math
import random
import statistics
import sys
from dataclasses import dataclass, field

from tabulate import tabulate

from . import netns
from .experiment import bench_slice, enter_sandbox, host_addresses, start_listener, stop_process
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


def paired_ratio(a: list[float], b: list[float]) -> Ratio:
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired ratio needs two equally long series of at least two values")
    logs = [math.log(y / x) for x, y in zip(a, b)]
    mean = statistics.fmean(logs)
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


# metric name -> (bench mode, result key, unit, lower is better)
METRICS = {
    "request/response p50": ("rr", "p50_us", "us", True),
    "request/response p99": ("rr", "p99_us", "us", True),
    "bulk throughput": ("bulk", "mb_per_s", "MB/s", False),
    "connection setup rate": ("conn", "per_s", "conn/s", False),
}
MODES = ("rr", "bulk", "conn")


@dataclass
class Samples:
    """values[(condition, target, metric)] = one value per round."""
    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def add(self, condition: str, target: str, mode: str, result: dict) -> None:
        for metric, (m, key, _unit, _lower) in METRICS.items():
            if m == mode:
                self.values.setdefault((condition, target, metric), []).append(float(result[key]))

    def get(self, condition, target, metric) -> list[float]:
        return self.values.get((condition, target, metric), [])


def run(measure, targets: list[str], *, rounds: int, seconds: float, conditions=("untraced",),
        set_condition=lambda c: None, progress=sys.stderr, shuffle=random.shuffle) -> Samples:
    """measure(mode, target, seconds) -> result dict. Every round visits every (condition,
    target, mode) once, in a fresh random order."""
    samples = Samples()
    slots = [(c, t, m) for c in conditions for t in targets for m in MODES]
    for r in range(1, rounds + 1):
        order = list(slots)
        shuffle(order)
        # Keep one condition's slots together within a round: switching probes costs time.
        order.sort(key=lambda s: conditions.index(s[0]))
        if r % 2 == 0:
            order.reverse()
        for i, (cond, target, mode) in enumerate(order, start=1):
            set_condition(cond)
            print(f"\r[round {r}/{rounds}] {i}/{len(order)} {mode:<4} {target:<15} {cond:<9}",
                  end="", file=progress, flush=True)
            samples.add(cond, target, mode, measure(mode, target, seconds))
    print(file=progress, flush=True)
    return samples


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def render(samples: Samples, loopback: str, own: str, conditions) -> str:
    rows = []
    for metric, (_m, _key, unit, lower) in METRICS.items():
        a, b = samples.get("untraced", loopback, metric), samples.get("untraced", own, metric)
        ratio = paired_ratio(a, b)
        if ratio.measurable:
            faster = own if (ratio.mean < 1) == lower else loopback
            note = f"measurable: {faster} is faster by {abs(ratio.mean - 1) * 100:.1f}%"
        else:
            note = "no measurable difference"
        rows.append((f"{metric} ({unit})", _fmt(a), _fmt(b), str(ratio), note))
    out = tabulate(rows, headers=("METRIC (median)", loopback, own, f"{own} / {loopback} [95% CI]", ""))
    if "traced" in conditions:
        trows = []
        for target in (loopback, own):
            for metric, (_m, _key, unit, lower) in METRICS.items():
                ratio = paired_ratio(samples.get("untraced", target, metric), samples.get("traced", target, metric))
                cost = "no measurable cost" if not ratio.measurable else (
                    "measurable cost" if (ratio.mean > 1) == lower else "measurably faster traced (noise?)")
                trows.append((target, f"{metric} ({unit})", _fmt(samples.get("untraced", target, metric)),
                              _fmt(samples.get("traced", target, metric)), str(ratio), cost))
        out += "\n\ncost of routetrace's own probes (traced / untraced):\n" + tabulate(
            trows, headers=("TARGET", "METRIC (median)", "untraced", "traced", "ratio [95% CI]", ""))
    return out


def experiment(prepare, *, sandbox: bool, own: str | None, port: int, rounds: int, seconds: float,
               out=None, err=None) -> None:
    """Set the stage (sandbox or this host, the benchmark server), optionally the probes
    (prepare(filters) -> (plan, headers); None: untraced only), then measure and print."""
    out, err = out or sys.stdout, err or sys.stderr
    with contextlib.ExitStack() as stack:
        if sandbox:
            sb = enter_sandbox(stack)
            ns, own = sb.host, sb.own_addr
        else:
            ns, own = None, host_addresses([own] if own else [])[0]
        stack.callback(stop_process, start_listener(ns, [port], "bench-serve", addresses=["127.0.0.1", own]))
        conditions, tracer, attached = ("untraced",), None, [True]
        if prepare is not None:
            from .tracer import Tracer
            plan, headers = prepare(Filters(netns=netns.inode_of(ns)))
            tracer = stack.enter_context(Tracer(plan, headers))
            conditions = ("untraced", "traced")

        def set_condition(cond):
            """Probes on for "traced" slices, off for the others; switched only on a change."""
            if tracer is not None and attached[0] != (cond == "traced"):
                attached[0] = cond == "traced"
                tracer.set_attached(attached[0])
        total = rounds * len(conditions) * 2 * len(MODES) * seconds
        print(f"Measuring 127.0.0.1 against {own}: {rounds} rounds, about {total:.0f}s...", file=err, flush=True)
        samples = run(lambda mode, target, secs: bench_slice(ns, mode, target, port, secs),
                      ["127.0.0.1", own], rounds=rounds, seconds=seconds, conditions=conditions,
                      set_condition=set_condition, progress=err)
        print(render(samples, "127.0.0.1", own, conditions), file=out, flush=True)
