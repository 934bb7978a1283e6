"""bench: ratio and interval arithmetic, interleaving, and a smoke run in the sandbox."""
import io
import math
import subprocess
import sys

import pytest

from conftest import namespaces, sandbox_namespaces
from routetrace import bench


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


def test_rounds_visit_every_slot_once_each_and_interleave_targets():
    seen = []

    def measure(mode, target, seconds):
        seen.append((mode, target))
        return {"p50_us": 1, "p99_us": 2, "mb_per_s": 3, "per_s": 4}

    conditions_set = []
    samples = bench.run(measure, ["127.0.0.1", "198.51.100.1"], rounds=3, seconds=0.1,
                        conditions=("untraced", "traced"), set_condition=conditions_set.append,
                        progress=io.StringIO())
    assert len(seen) == 3 * 2 * 2 * 3
    per_round = [seen[i:i + 12] for i in range(0, 36, 12)]
    for visits in per_round:
        assert sorted(visits) == sorted((m, t) for t in ("127.0.0.1", "198.51.100.1")
                                        for m in bench.MODES for _ in range(2))
    # probes are switched at most twice per round, not per slot
    switches = sum(1 for a, b in zip(conditions_set, conditions_set[1:]) if a != b)
    assert switches <= 3
    assert samples.get("traced", "127.0.0.1", "bulk throughput") == [3.0, 3.0, 3.0]


def test_render_names_the_faster_target_only_when_measurable():
    s = bench.Samples()
    for x in range(4):
        s.add("untraced", "127.0.0.1", "rr", {"p50_us": 50 + x, "p99_us": 80})
        s.add("untraced", "own", "rr", {"p50_us": 50 + x, "p99_us": 80 + (x % 2)})
        s.add("untraced", "127.0.0.1", "bulk", {"mb_per_s": 1000 + x})
        s.add("untraced", "own", "bulk", {"mb_per_s": 2 * (1000 + x)})
        s.add("untraced", "127.0.0.1", "conn", {"per_s": 100})
        s.add("untraced", "own", "conn", {"per_s": 100 - (x % 2)})
    text = bench.render(s, "127.0.0.1", "own", ("untraced",))
    lines = {line.split("  ")[0]: line for line in text.splitlines()[2:]}
    assert lines["request/response p50 (us)"].endswith("no measurable difference")
    assert "measurable: own is faster by 100.0%" in lines["bulk throughput (MB/s)"]


@pytest.mark.bpf
def test_bench_smoke_in_the_sandbox_with_probe_cost(bpf_ready):
    out = subprocess.run([sys.executable, "-m", "routetrace", "bench", "--sandbox", "-d", "0.2", "-r", "2",
                          "--trace"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[round 2/2]" in out.stderr
    for metric in bench.METRICS:
        assert out.stdout.count(metric) == 3        # comparison + traced/untraced per target
    assert "198.51.100.1 / 127.0.0.1 [95% CI]" in out.stdout
    assert not set(sandbox_namespaces(out.stderr)) & set(namespaces())
