"""bench: parsers of the load tools' real output (fixtures/bench, captured on this machine),
percentiles, ratio and interval arithmetic, interleaving, regimes, the plot's data, and short
end-to-end runs in the sandbox with the tools and without them."""
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, namespaces, sandbox_namespaces
from routetrace import bench, loadgen

BENCH_FIXTURES = FIXTURES / "bench"


# ---- the tools' output ---------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_sockperf_full_log_parses_and_our_percentiles_match_sockperfs_own(proto):
    text = (BENCH_FIXTURES / f"sockperf-pp-{proto}.csv").read_text()
    lat = loadgen.parse_sockperf_full_log(text)
    summary = loadgen.parse_sockperf_pp_summary(text)
    assert len(lat) == summary["received"] == summary["sent"]     # one row per valid message
    assert all(x > 0 for x in lat)
    ours = loadgen.latency_values(list(lat))
    for key in ("p50", "p90", "p99", "p99.9"):
        # sockperf prints 3 decimals in both places, rounding the summary and the log apart
        assert ours[key] == pytest.approx(summary[key], abs=0.002), key
    assert ours["samples"] == len(lat)


def test_sockperf_stdout_summary_is_the_same_as_the_logs():
    out = loadgen.parse_sockperf_pp_summary((BENCH_FIXTURES / "sockperf-pp-tcp.out").read_text())
    log = loadgen.parse_sockperf_pp_summary((BENCH_FIXTURES / "sockperf-pp-tcp.csv").read_text())
    assert out == log


def test_sockperf_full_log_without_its_table_is_an_error():
    with pytest.raises(ValueError, match="full-log"):
        loadgen.parse_sockperf_full_log((BENCH_FIXTURES / "sockperf-tp-tcp.out").read_text())
    head = (BENCH_FIXTURES / "sockperf-pp-tcp.csv").read_text().split("packet,")[0]
    with pytest.raises(ValueError):
        loadgen.parse_sockperf_full_log(head + "packet, txTime(sec), rxTime(sec), rtt(usec)\n")


@pytest.mark.parametrize("proto,size", [("tcp", loadgen.TCP_TP_SIZE), ("udp", loadgen.UDP_TP_SIZE)])
def test_sockperf_throughput_summary(proto, size):
    text = (BENCH_FIXTURES / f"sockperf-tp-{proto}.out").read_text()
    values = loadgen.parse_sockperf_tp(text, size)
    # our rate (messages over the run time it states) and its own "Message Rate" agree
    assert values["msg_per_s"] == pytest.approx(values["sockperf_msg_per_s"], rel=0.01)
    assert values["mb_per_s"] == pytest.approx(values["msg_per_s"] * size / 1e6)
    with pytest.raises(ValueError):
        loadgen.parse_sockperf_tp("sockperf: Test ended\n", size)


def test_iperf3_json_receiver_side():
    text = (BENCH_FIXTURES / "iperf3-tcp.json").read_text()
    values = loadgen.parse_iperf3_json(text)
    rx = json.loads(text)["end"]["sum_received"]
    assert values["mb_per_s"] == pytest.approx(rx["bytes"] / rx["seconds"] / 1e6)
    assert values["sent_mb_per_s"] > 0 and values["retransmits"] >= 0
    with pytest.raises(ValueError, match="iperf3: unable to connect"):
        loadgen.parse_iperf3_json('{"start": {}, "intervals": [], "end": {}, "error": "unable to connect"}')


# ---- statistics ---------------------------------------------------------------------------

def test_percentile_ranks():
    values = list(range(1, 101))                    # 1..100
    assert loadgen.percentile(values, 50) == 50     # rank 49.5: the tie goes down
    assert loadgen.percentile(values, 90) == 90     # rank 89.1
    assert loadgen.percentile(values, 99) == 99
    assert loadgen.percentile(values, 99.9) == 100  # rank 98.9
    assert loadgen.percentile(values, 100) == 100
    assert loadgen.percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError):
        loadgen.percentile([], 50)
    with pytest.raises(ValueError):
        loadgen.percentile(values, 101)


def test_latency_values_sorts_and_names_every_percentile():
    v = loadgen.latency_values([5.0, 1.0, 3.0, 2.0, 4.0])
    assert v == {"p50": 3.0, "p90": 5.0, "p99": 5.0, "p99.9": 5.0, "samples": 5.0}


def test_thin_keeps_the_extremes_and_even_ranks():
    values = list(range(10_000))
    kept = bench.thin(values, 101)
    assert len(kept) == 101 and kept[0] == 0 and kept[-1] == 9999 and kept[50] == 5000
    assert bench.thin([1, 2], 101) == [1, 2]


def test_t95_table_and_conservative_lookup():
    assert bench.t95(1) == 12.706
    assert bench.t95(4) == 2.776
    assert bench.t95(22) == bench.t95(20)        # between rows: the wider interval
    assert bench.t95(500) == 1.960
    with pytest.raises(ValueError):
        bench.t95(0)


def test_paired_ratio_geometric_mean_and_interval():
    a = [100.0, 100.0, 100.0, 100.0]
    b = [110.0, 121.0, 100.0, 110.0]
    r = bench.paired_ratio(a, b)
    logs = [math.log(1.1), math.log(1.21), 0.0, math.log(1.1)]
    mean = sum(logs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 3)
    assert r.mean == pytest.approx(math.exp(mean))
    assert r.low == pytest.approx(math.exp(mean - 3.182 * sd / 2))
    assert r.high == pytest.approx(math.exp(mean + 3.182 * sd / 2))
    assert r.n == 4
    assert r.measurable is False                 # 1.0 lies inside [0.97, 1.25]


def test_identical_shift_is_measurable_and_noise_is_not():
    assert bench.paired_ratio([1, 2, 3], [2, 4, 6]).measurable is True
    assert str(bench.paired_ratio([1, 2, 3], [2, 4, 6])) == "2.000 [2.000, 2.000]"
    assert bench.paired_ratio([10, 10, 10], [9, 11, 10]).measurable is False
    with pytest.raises(ValueError):
        bench.paired_ratio([1], [1])


def test_cost_is_oriented_so_that_worse_is_above_one():
    lat = bench.Metric("tcp-rr", "p50", "rt", "us", True)
    rate = bench.Metric("conn", "per_s", "rate", "conn/s", False)
    assert bench.cost_of([10, 10, 10], [11, 11, 11], lat).mean == pytest.approx(1.1)    # slower
    assert bench.cost_of([10, 10, 10], [8, 8, 8], rate).mean == pytest.approx(1.25)     # fewer
    assert bench.cost_of([10], [11], lat) is None


def test_goal_verdict_met_missed_unresolved():
    assert bench.goal_verdict(bench.Ratio(1.01, 1.005, 1.015, 5), 0.02).endswith("met")
    assert bench.goal_verdict(bench.Ratio(1.05, 1.03, 1.07, 5), 0.02).endswith("missed")
    assert "not resolved" in bench.goal_verdict(bench.Ratio(1.01, 0.98, 1.04, 5), 0.02)
    assert bench.goal_verdict(None, 0.02) == ""
    assert "traced measurably faster" in bench.goal_verdict(bench.Ratio(0.8, 0.7, 0.9, 5), 0.05)


def test_regimes_split_levels_and_stable_rounds_say_so():
    assert bench.regimes([30.0, 31.0, 29.5, 30.2]) == [[2, 0, 3, 1]]
    assert sorted(map(sorted, bench.regimes([30.0, 38.0, 30.5, 39.0, 30.2]))) == [[0, 2, 4], [1, 3]]
    s = bench.Samples()
    for p50_a, p50_b in ((30, 31), (38, 39), (30.5, 31), (30.2, 30.8), (39, 40)):
        s.add("untraced", "127.0.0.1", loadgen.Result("tcp-rr", "sockperf", {"p50": p50_a}))
        s.add("untraced", "own", loadgen.Result("tcp-rr", "sockperf", {"p50": p50_b}))
    kept, note = bench.stable_rounds(s, ["127.0.0.1", "own"])
    assert kept == [0, 2, 3]
    assert "more than one regime" in note and "rounds 1, 3, 4" in note
    stable = bench.Samples()
    for x in (30, 31, 30.5):
        stable.add("untraced", "127.0.0.1", loadgen.Result("tcp-rr", "sockperf", {"p50": x}))
        stable.add("untraced", "own", loadgen.Result("tcp-rr", "sockperf", {"p50": x}))
    assert bench.stable_rounds(stable, ["127.0.0.1", "own"]) == ([0, 1, 2], None)


# ---- interleaving and rendering -------------------------------------------------------------

def _fake_result(mode, scale=1.0):
    if mode in loadgen.LATENCY_MODES:
        lat = [scale * x for x in (10.0, 11.0, 12.0, 13.0, 50.0)]
        return loadgen.Result(mode, "fake", loadgen.latency_values(list(lat)), lat)
    key = "per_s" if mode == "conn" else "mb_per_s"
    return loadgen.Result(mode, "fake", {key: 100.0 / scale})


def test_rounds_visit_every_slot_once_each_and_interleave_targets():
    seen = []

    def measure(cond, mode, target, seconds):
        seen.append((cond, mode, target))
        return _fake_result(mode)

    conditions_set = []
    targets = ["127.0.0.1", "198.51.100.1"]
    samples = bench.run(measure, targets, rounds=3, seconds=0.1, conditions=bench.CONDITIONS,
                        set_condition=conditions_set.append, progress=io.StringIO())
    per = len(bench.CONDITIONS) * 2 * len(bench.MODES)
    assert len(seen) == 3 * per
    for r in range(3):
        visits = seen[r * per:(r + 1) * per]
        assert sorted(visits) == sorted((c, m, t) for c in bench.CONDITIONS for t in targets for m in bench.MODES)
    # one condition's slots together: probes switched at most once per condition per round
    switches = sum(1 for a, b in zip(conditions_set, conditions_set[1:]) if a != b)
    assert switches <= 3 * len(bench.CONDITIONS)
    assert samples.get("traced", "127.0.0.1", bench.metrics_for(["conn"])[0]) == [100.0] * 3
    assert len(samples.latencies[("floor-raw", "198.51.100.1", "tcp-rr")]) == 3 * 5


def _report(conditions=("untraced", "traced")):
    samples = bench.Samples()
    for r in range(4):
        for cond in conditions:
            for target, scale in (("127.0.0.1", 1.0), ("198.51.100.1", 1.0 + 0.001 * r)):
                for mode in bench.MODES:
                    samples.add(cond, target, _fake_result(mode, scale * (1.05 if cond == "traced" else 1.0)))
    tools = {4: {m: "python" for m in bench.MODES}}
    report = bench.build_report(samples, [bench.Comparison(4, "198.51.100.1")], bench.MODES, conditions, tools,
                                loadgen.Pinning("0", "1"), bench.machine_facts())
    return report, samples


def test_report_rows_and_text_name_tool_cost_and_goal():
    report, _ = _report()
    assert {r["mode"] for r in report["comparison"]} == set(bench.MODES)
    assert all(r["tool"] == "python" and r["family"] == "IPv4" for r in report["comparison"])
    conn = next(r for r in report["cost"] if r["mode"] == "conn" and r["target"] == "127.0.0.1")
    assert conn["traced_cost"]["mean"] == pytest.approx(1.05)
    assert conn["goal"].startswith("goal <= 5%: ")
    text = bench.render(report)
    assert "tcp-rr TCP round trip p99.9 (us)" in text and "traced cost [95% CI]" in text
    assert "+5.0%" in text
    json.dumps(report)                          # --json: every table serialises


# ---- the plot ---------------------------------------------------------------------------------

@pytest.fixture
def matplotlib_ready():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("matplotlib missing in CI: scripts/setup installs python3-matplotlib")
        pytest.skip("needs matplotlib (python3-matplotlib)")


def test_plot_has_one_series_per_target_and_condition(matplotlib_ready, tmp_path):
    from routetrace import plot
    conditions = ("untraced", "traced", "floor-raw", "floor-tp")
    report, samples = _report(conditions)
    fig = plot.figure(report, samples)
    assert fig._suptitle.get_text().startswith("routetrace bench: 127.0.0.1 vs 198.51.100.1 (kernel")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(bench.MODES) + len(loadgen.LATENCY_MODES)      # latency: tail and body
    want = {f"{t} {c}" for t in report["targets"] for c in conditions}
    for ax in axes:
        assert {line.get_label() for line in ax.get_lines()} == want
    cdf = next(ax for ax in axes if ax.get_title().startswith("tcp-rr: round-trip CDF"))
    assert cdf.get_xscale() == "log"
    line = next(line for line in cdf.get_lines() if line.get_label() == "127.0.0.1 untraced")
    xs, ys = line.get_data()
    assert list(xs) == sorted(samples.latencies[("untraced", "127.0.0.1", "tcp-rr")])
    assert 0 < ys[0] < ys[-1] < 1 and list(ys) == sorted(ys)
    rate = next(ax for ax in axes if ax.get_title().startswith("conn"))
    line = next(line for line in rate.get_lines() if line.get_label() == "198.51.100.1 traced")
    assert list(line.get_data()[1]) == samples.get("traced", "198.51.100.1", bench.metrics_for(["conn"])[0])
    for name in ("b.png", "b.svg"):
        plot.save(fig, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000


# ---- end to end, in the sandbox ------------------------------------------------------------------

def _bench(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "routetrace", "bench", "--sandbox", "-d", "0.2", "-r", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _check_clean(out):
    assert out.returncode == 0, out.stderr
    assert "[round 2/2]" in out.stderr
    assert not set(sandbox_namespaces(out.stderr)) & set(namespaces())


@pytest.mark.bpf
def test_bench_with_the_tools(bpf_ready, tmp_path):
    for tool in ("sockperf", "iperf3"):
        if not shutil.which(tool):
            if os.environ.get("CI"):
                pytest.fail(f"{tool} missing in CI: scripts/setup installs it")
            pytest.skip(f"needs {tool}")
    out = _bench("--mode", "tcp-rr", "--mode", "udp-tp", "--mode", "tcp-bulk", "--mode", "conn", "--json")
    _check_clean(out)
    report = json.loads(out.stdout)
    # both families by default, in one run (the wildcard servers of both share the ports)
    assert report["targets"] == ["127.0.0.1", "198.51.100.1", "::1", "2001:db8::1"]
    v4 = report["tools_by_family"]["IPv4"]
    assert v4["tcp-rr"].startswith("sockperf") and v4["udp-tp"].startswith("sockperf")
    assert v4["tcp-bulk"].startswith("iperf3") and v4["conn"].startswith("python")
    assert report["tools_by_family"]["IPv6"]["tcp-bulk"].startswith("iperf3")
    rows = {(r["family"], r["mode"], r["metric"]): r for r in report["comparison"]}
    for family in ("IPv4", "IPv6"):
        assert (family, "tcp-rr", "TCP round trip p99.9") in rows and (family, "conn", "connection rate") in rows
    assert rows[("IPv4", "tcp-rr", "TCP round trip p50")]["tool"] == "sockperf"
    assert rows[("IPv6", "tcp-bulk", "TCP bulk throughput")]["tool"] == "iperf3"
    for row in rows.values():
        assert len(row["rounds_loopback"]) == len(row["rounds_own"]) == 2
        assert row["loopback"] > 0 and row["own"] > 0


@pytest.mark.bpf
def test_bench_without_the_tools_falls_back_to_python(bpf_ready, tmp_path):
    # A PATH holding only what bench needs besides the load tools.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ip", "taskset", "ss"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bindir)}
    out = _bench("--plot", str(tmp_path / "b.png"), env=env) if _has_matplotlib() else _bench(env=env)
    _check_clean(out)
    assert "sockperf" not in out.stdout and "iperf3" not in out.stdout
    for mode in bench.MODES:
        assert f"{mode} python" in out.stdout.splitlines()[0]
    table = out.stdout.split("\n", 1)[1]
    for metric in bench.METRICS:
        assert f"{metric.mode} {metric.label} ({metric.unit})" in table
    assert out.stdout.count(" python ") >= len(bench.METRICS)     # the TOOL column
    if _has_matplotlib():
        assert (tmp_path / "b.png").stat().st_size > 1000


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.bpf
def test_bench_trace_reports_cost_floor_bpf_statistics_and_own_cpu(bpf_ready):
    if not shutil.which("iperf3"):
        pytest.skip("needs iperf3") if not os.environ.get("CI") else pytest.fail("iperf3 missing in CI")
    sysctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = sysctl.read_text()
    out = _bench("-4", "--mode", "tcp-bulk", "--mode", "conn", "--trace", "--json", timeout=300)
    _check_clean(out)
    report = json.loads(out.stdout)
    # The first floor on the transmit program's own hook: the BTF-typed tracepoint where it loads.
    from routetrace import kernel
    hook_floor = "floor-btf" if kernel.gather().btf_tracepoints else "floor-raw"
    assert report["conditions"] == ["untraced", "traced", hook_floor, "floor-tp"]
    rows = {(r["target"], r["mode"], r["metric"]): r for r in report["cost"]}
    conn = rows[("127.0.0.1", "conn", "connection rate")]
    for cond in ("traced", hook_floor, "floor-tp"):
        assert conn[f"{cond}_cost"]["n"] == 2
    assert conn["goal"].startswith("goal <= 5%")
    assert rows[("198.51.100.1", "tcp-bulk", "TCP bulk throughput")]["goal"].startswith("goal <= 1%")
    programs = {(r["condition"], r["program"]) for r in report["bpf"]}
    assert (hook_floor, "floor_btf" if hook_floor == "floor-btf" else "raw_tracepoint__net_dev_queue") in programs
    assert ("floor-tp", "tracepoint__net__net_dev_queue") in programs
    assert any(c == "traced" for c, _ in programs)
    traced_runs = sum(r["runs"] for r in report["bpf"] if r["condition"] == "traced")
    assert traced_runs > 0
    obs = report["observer"]
    assert obs["traced_wall_s"] > 0 and obs["pump_cpu_s"] > 0
    assert obs["flows"] > 0                          # the session really traced the load
    assert sysctl.read_text() == before              # the sysctl is put back


def test_plot_title_names_each_family_pair(matplotlib_ready):
    from routetrace import plot
    samples = bench.Samples()
    for r in range(3):
        for target in ("::1", "2001:db8::1"):
            for mode in bench.MODES:
                samples.add("untraced", target, _fake_result(mode, 1.0 + 0.001 * r))
    report = bench.build_report(samples, [bench.Comparison(6, "2001:db8::1")], bench.MODES, ("untraced",),
                                {6: {m: "python" for m in bench.MODES}}, loadgen.Pinning("0", "1"),
                                bench.machine_facts())
    title = plot.figure(report, samples)._suptitle.get_text()
    assert title.startswith("routetrace bench: ::1 vs 2001:db8::1 (kernel") and "127.0.0.1" not in title
