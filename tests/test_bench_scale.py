"""bench-scale's CPU budget (`--budget`): the arithmetic from two runs' CPU seconds to µs per new
flow and the rate the CPUs can carry, on made-up runs (no root); and /proc/stat's busy time."""
from routetrace.bench_scale import budget_report, machine_busy_s


def run(traced, machine, sender, session, dropped=None, flows=100_000):
    return {"traced": traced, "flows": flows, "sent": flows, "new_flows_per_s": 150_000.0, "machine_cpu_s": machine,
            "sender_cpu_s": sender, "session_cpu_s": session, "rest_cpu_s": machine - sender - session,
            "notices_dropped": dropped, "packets_lost": 0 if traced else None}


def test_budget_splits_the_machine_and_derives_what_is_left():
    # Untraced 0.5 s per 10^5 flows; traced, 0.8 s of kernel and senders and 0.9 s of session.
    text = budget_report(run(False, 0.5, 0.4, 0.0), run(True, 1.7, 0.6, 0.9, dropped=42), cpus=2, rate=200_000)
    lines = text.splitlines()
    untraced = next(line for line in lines if line.startswith("untraced")).split()
    assert untraced[1:6] == ["150000", "5.00", "4.00", "1.00", "0.00"]
    traced = next(line for line in lines if line.startswith("traced")).split()
    assert traced[3:9] == ["150000", "17.00", "6.00", "2.00", "9.00", "42"]
    # 200,000/s x 8 µs = 1.6 CPUs for the kernel and senders; 0.4 CPU left = 2 µs per flow;
    # 2 CPUs / (8 + 9) µs = 117,647 flows/s.
    assert lines[-1] == ("At 200,000 new flows/s the traced senders and kernel alone take 1.60 of 2 CPUs, leaving "
                         "2.00 µs of CPU per new flow for the session, which spent 9.00; these 2 CPUs carry at most "
                         "117,647 new flows/s traced.")


def test_nothing_left_is_said_as_zero():
    text = budget_report(run(False, 0.5, 0.4, 0.0), run(True, 1.5, 0.6, 0.2), cpus=1, rate=200_000)
    assert "take 2.60 of 1 CPUs, leaving 0.00 µs" in text


def test_machine_busy_time_is_work_without_idle_iowait_or_steal(tmp_path):
    import os
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  {100 * tick} {5 * tick} {50 * tick} 9999999 777 {3 * tick} {7 * tick} 5555 0 0\n"
                    "cpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert machine_busy_s(stat) == 165.0
    assert machine_busy_s() > 0          # the real file parses
