"""scripts/bench-xmit-cost end to end, briefly: every program it compares runs on the traffic and
gets a row (the figures themselves are the README's, from full runs: no timing is asserted here)."""
import subprocess
import sys
from pathlib import Path

import pytest

from routetrace import kernel

pytestmark = pytest.mark.bpf
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["known", "new"])
def test_bench_xmit_cost_gives_every_program_a_row_with_runs(bpf_ready, mode):
    out = subprocess.run([sys.executable, "-m", "routetrace.bench_xmit", "--rounds", "1", "--slice", "0.3",
                          "--mode", mode, "--against", str(ROOT / "bpf")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[3:] if line.strip()}
    expected = {"floor", "against", "routetrace"}
    if kernel.gather().btf_tracepoints:
        # The typed hook's floor and programs, and the same code on the raw hook beside them.
        expected |= {"floor-btf", "against-typed", "routetrace-raw"}
    assert set(rows) == expected, out.stdout
    for name, row in rows.items():
        assert int(row[1]) > 0 and float(row[2]) > 0, (name, out.stdout)
