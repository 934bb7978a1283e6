"""prove: judged rows and exit codes from flows (no root), and the sandboxed run on this kernel."""
import json
import signal
import subprocess
import sys

import pytest

from routetrace.prove import CONTROL, Target, judge, local_entry, render, verdict
from routetrace.record import read_trace
from conftest import FIXTURES, default_sigint, namespaces, sandbox_namespaces

PORT = 8888
TABLE = [  # `ip -j route show table local` in the sandbox namespace
    {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "protocol": "kernel", "scope": "host", "prefsrc": "127.0.0.1"},
    {"type": "local", "dst": "127.0.0.1", "dev": "lo", "protocol": "kernel", "scope": "host", "prefsrc": "127.0.0.1"},
    {"type": "broadcast", "dst": "127.255.255.255", "dev": "lo"},
    {"type": "local", "dst": "198.51.100.1", "dev": "eth0", "protocol": "kernel", "scope": "host"},
]
TARGETS = [Target("127.0.0.1", "loopback", *local_entry("127.0.0.1", TABLE)),
           Target("198.51.100.1", "own-address", *local_entry("198.51.100.1", TABLE)),
           Target("198.51.100.2", CONTROL)]


@pytest.fixture
def flows():
    return read_trace(FIXTURES / "trace-tracepoint-6.18.jsonl").flows


def test_local_table_entry_most_specific_wins():
    assert local_entry("127.0.0.1", TABLE) == ("local 127.0.0.1 dev lo", "lo")
    assert local_entry("127.9.9.9", TABLE) == ("local 127.0.0.0/8 dev lo", "lo")
    assert local_entry("198.51.100.1", TABLE) == ("local 198.51.100.1 dev eth0", "eth0")
    assert local_entry("198.51.100.2", TABLE) == (None, None)


def test_recorded_flows_prove_the_claim(flows):
    rows = [judge(t, "ok", flows, PORT) for t in TARGETS]
    assert [r.ok for r in rows] == [True, True, True]
    code, text = verdict(rows)
    assert code == 0 and text.startswith("the claim holds")
    own = rows[1]
    assert own.fib_devs == ["eth0"] and own.route_devs == ["lo"] and own.xmit_devs == {"lo": 10}
    table = render(rows, code, text, None)
    assert "eth0:0 lo:10" in table          # the zero on eth0 is the tcpdump experiment
    assert "local 198.51.100.1 dev eth0" in table


def test_flows_that_left_on_a_physical_device_exit_1_and_name_the_row(flows):
    for f in flows:
        if f.daddr == "198.51.100.1" and f.dport == PORT:
            f.xmit_devs = {"eth0": f.packets}
    rows = [judge(t, "ok", flows, PORT) for t in TARGETS]
    code, text = verdict(rows)
    assert code == 1
    assert text == ("the claim did NOT hold: 198.51.100.1 (own-address): 5 packets left on eth0, not the loopback "
                    "device: LOCAL route on lo, yet sent on eth0:5 lo:5: a LOCAL route's packets go through the "
                    "loopback device, so eth0 contradicts it")
    assert "FAILED: 5 packets left on eth0, not the loopback device" in render(rows, code, text, None)


def test_a_control_on_lo_or_a_missing_destination_fails(flows):
    on_lo = [f for f in flows if f.daddr != "198.51.100.2"]
    rows = [judge(t, "ok", on_lo, PORT) for t in TARGETS]
    assert rows[2].ok is False and rows[2].why == "no packets were seen for this destination"
    assert verdict(rows)[0] == 1
    assert verdict(rows[:1])[0] == 1        # no own-address row: nothing was tested
    code, text = verdict(rows[:2])
    assert code == 0 and "no non-local control" in text




def _prove(*args):
    return subprocess.run([sys.executable, "-m", "routetrace", "prove", "--sandbox", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.bpf
@pytest.mark.parametrize("args", [[], ["--proto", "udp"], ["--closed"]], ids=["tcp", "udp", "closed"])
def test_sandboxed_prove_holds_on_this_kernel(bpf_ready, args):
    out = _prove("--json", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert [(r["daddr"], r["kind"]) for r in result["rows"]] == [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("198.51.100.1", "own-address"),
        ("2001:db8::1", "own-address"), ("198.51.100.2", "control"), ("2001:db8::2", "control")]
    rows = {r["daddr"]: r for r in result["rows"]}
    for daddr in ("127.0.0.1", "::1", "198.51.100.1", "2001:db8::1"):
        assert rows[daddr]["route_types"] == ["LOCAL"] and rows[daddr]["route_devs"] == ["lo"]
        assert set(rows[daddr]["xmit_devs"]) == {"lo"}
    for own in ("198.51.100.1", "2001:db8::1"):
        assert rows[own]["local_entry"] == f"local {own} dev eth0"
        assert rows[own]["fib_devs"] == ["eth0"]
    for control in ("198.51.100.2", "2001:db8::2"):
        assert rows[control]["route_types"] == ["UNICAST"] and set(rows[control]["xmit_devs"]) == {"eth0"}
    expected_client = "refused" if "--closed" in args else "ok"
    assert {r["client"] for r in result["rows"]} == {expected_client}
    if "--closed" in args:       # SYN out and RST back, both on lo
        assert rows["127.0.0.1"]["xmit_devs"] == {"lo": 2} and rows["::1"]["xmit_devs"] == {"lo": 2}
    assert result["verdict"]["exit"] == 0
    created = sandbox_namespaces(out.stderr)
    assert not set(created) & set(namespaces())      # the sandbox is gone


@pytest.mark.bpf
def test_prove_records_a_trace_that_reports_the_same_flows(bpf_ready, tmp_path):
    path = tmp_path / "prove.jsonl"
    out = _prove("--record", str(path))
    assert out.returncode == 0, out.stderr
    trace = read_trace(path)
    assert trace.complete and trace.header["filters"]["port"] == 8888
    assert {f.daddr for f in trace.flows if f.dport == 8888} == {"127.0.0.1", "198.51.100.1", "198.51.100.2",
                                                                 "::1", "2001:db8::1", "2001:db8::2"}


@pytest.mark.bpf
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupted_prove_removes_its_sandbox(bpf_ready, sig, code):
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "routetrace", "prove", "--sandbox"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
        first = proc.stderr.readline()          # the sandbox announces itself once it exists
        created = sandbox_namespaces(first)
        proc.send_signal(sig)                   # while it sets up listeners and probes
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        # Exit 0: a loaded machine let it finish before the signal landed. Try again.
    else:
        pytest.fail("prove always finished before it could be interrupted")
    assert proc.returncode == code, first + err
    assert "Traceback" not in err
    assert not set(created) & set(namespaces())


def test_prove_usage_errors():
    out = subprocess.run([sys.executable, "-m", "routetrace", "prove", "--closed", "--proto", "udp"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--closed goes with --proto tcp" in out.stderr
    out = subprocess.run([sys.executable, "-m", "routetrace", "prove", "--sandbox", "--to", "10.0.0.1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--sandbox chooses its own addresses" in out.stderr
