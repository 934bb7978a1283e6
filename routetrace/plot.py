"""`routetrace bench --plot FILE`: round-trip CDFs on a log axis, and per-round rates with
their intervals. One line per target and condition; the Figure is returned before it is saved,
so what it holds can be checked (tests read its lines), not only that a file appeared.

matplotlib comes from Debian's python3-matplotlib; only this module imports it, and only when
a plot is asked for. No pyplot: a Figure of its own, no global state, no display needed.
"""
from __future__ import annotations

from .bench import Samples, geo_interval, metrics_for
from .loadgen import LATENCY_MODES, MODES

# Colour says the condition, the line style the target.
COLORS = {"untraced": "black", "traced": "tab:red", "floor-raw": "tab:green", "floor-btf": "tab:olive",
          "floor-tp": "tab:purple"}


def _style(target: str, targets) -> str:
    return "-" if target == targets[0] else "--"


def figure(report: dict, samples: Samples):
    from matplotlib.figure import Figure
    targets, conditions = report["targets"], report["conditions"]
    modes = [m for m in report["modes"] if m in MODES]
    lat_modes = [m for m in modes if m in LATENCY_MODES and any(
        samples.latencies.get((c, t, m)) for c in conditions for t in targets)]
    rate_modes = [m for m in modes if m not in LATENCY_MODES]
    panels = 2 * len(lat_modes) + len(rate_modes)
    cols = 2 if panels > 1 else 1
    rows = (panels + cols - 1) // cols or 1
    fig = Figure(figsize=(6.4 * cols, 4.0 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    machine = report.get("machine", {})
    pairs = ", ".join(f"{c['loopback']} vs {c['own']}" for c in report.get("comparisons", [])) or " vs ".join(targets)
    fig.suptitle(f"routetrace bench: {pairs} (kernel {machine.get('kernel', '?')}, "
                 f"{machine.get('cpus', '?')} CPUs, load {' '.join(machine.get('loadavg', []) or ['?'])}; "
                 f"{report.get('pinning', '')})", fontsize=9)
    for i, mode in enumerate(lat_modes):
        tail, body = axes[2 * i], axes[2 * i + 1]
        _cdf(tail, body, mode, report, samples, targets, conditions)
    _rates(axes[2 * len(lat_modes):], rate_modes, report, samples, targets, conditions)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig


def _cdf(ax, body, mode, report, samples, targets, conditions):
    """The whole distribution on log x / logit y, and its body (to the 95th percentile) on
    linear axes, where a shift of a few percent is visible."""
    lows, top = [], []
    for target in targets:
        for cond in conditions:
            lat = sorted(samples.latencies.get((cond, target, mode), []))
            if not lat:
                continue
            n = len(lat)
            lows.append(lat[0])
            top.append(lat[int(0.95 * (n - 1))])
            # plotting positions (i + 0.5) / n stay inside (0, 1), as the logit axis needs
            ys = [(i + 0.5) / n for i in range(n)]
            for a in (ax, body):
                a.plot(lat, ys, _style(target, targets), color=COLORS.get(cond, "gray"),
                       label=f"{target} {cond}", linewidth=1.1)
    ax.set_xscale("log")
    # logit: the median, p90, p99 and p99.9 get equal room, so the tail shows
    ax.set_yscale("logit")
    ax.set_ylim(0.01, 0.9995)
    ax.set_xlabel("round trip (us, log)")
    ax.set_ylabel("fraction of round trips (logit)")
    ax.set_title(f"{mode}: round-trip CDF ({report['tools'].get(mode, '?')}), all rounds", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    body.set_xlim(min(lows) * 0.98, max(top) * 1.02)
    body.set_ylim(0, 0.95)
    body.set_xlabel("round trip (us)")
    body.set_ylabel("fraction of round trips")
    body.set_title(f"{mode}: the body of the CDF, to the 95th percentile", fontsize=9)
    body.grid(True, alpha=0.3)
    body.legend(fontsize=7, loc="lower right")


def _rates(axes, rate_modes, report, samples, targets, conditions):
    for ax, mode in zip(axes, rate_modes):
        metric = metrics_for([mode])[0]
        top = 0.0
        for target in targets:
            for cond in conditions:
                values = samples.get(cond, target, metric)
                if not values:
                    continue
                color = COLORS.get(cond, "gray")
                x = list(range(1, len(values) + 1))
                top = max(top, *values)
                ax.plot(x, values, _style(target, targets), marker="o" if target == targets[0] else "s",
                        color=color, label=f"{target} {cond}", linewidth=1.0, markersize=4)
                if len(values) >= 2:
                    band = geo_interval(values)
                    ax.axhspan(band.low, band.high, color=color, alpha=0.05)
        # Intervals from few rounds can be huge: the axis follows the measurements, not the bands.
        ax.set_ylim(0, top * 1.25 or 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric.label} ({metric.unit})")
        ax.set_title(f"{mode}: per round ({report['tools'].get(mode, '?')}); bands: 95% interval of the "
                     "geometric mean", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


def save(fig, path: str) -> None:
    fig.savefig(path, dpi=110)
