"""bcc's command-line conventions (-p PID, -P PORT, -4/-6, -j), --netns that takes only real
network namespaces, and help written for users."""
import os
from types import SimpleNamespace
import subprocess
import sys

import click
import pytest

from routetrace import cli, kernel, netns, probes


@pytest.fixture
def captured(monkeypatch):
    """Run commands up to the point where they would trace, and keep what they were given."""
    seen = {}

    class Plan:
        backend = "tracepoint"

        def render(self, cannot_see=()):
            return "plan"

    def choose(_facts, filters, backend="auto", limits=None):
        seen["filters"], seen["backend"], seen["limits"] = filters, backend, limits
        return Plan()

    monkeypatch.setattr(kernel, "gather", lambda **_: SimpleNamespace(limits=lambda backend: {}))
    monkeypatch.setattr(probes, "choose", choose)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli, "_prepare", lambda command, filters, backend="auto", limits=None: (filters, None))

    import routetrace.bench
    import routetrace.prove
    import routetrace.watch
    monkeypatch.setattr(routetrace.watch, "watch",
                        lambda plan, headers, **kw: seen.update(watch=kw, filters=plan) or SimpleNamespace(recording_error=None))
    monkeypatch.setattr(routetrace.prove, "experiment", lambda prepare, **kw: seen.update(prove=kw) or 0)
    monkeypatch.setattr(routetrace.bench, "experiment", lambda prepare, **kw: seen.update(bench=kw))
    return seen


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_watch_short_flags_are_bccs(capsys, captured):
    me = str(os.getpid())
    code, _, err = run(capsys, "watch", "-p", me, "-P", "8888", "-4", "--dry-run")
    assert code == 0, err
    f = captured["filters"]
    assert (f.pid, f.port, f.family) == (os.getpid(), 8888, 4)
    assert f.describe() == {"port": 8888, "pid": os.getpid(), "family": 4}
    assert "family=4" in f.text()
    code, _, err = run(capsys, "watch", "-6", "--dry-run")
    assert code == 0 and captured["filters"].family == 6
    code, _, err = run(capsys, "watch", "--dry-run")
    assert code == 0 and captured["filters"].family is None and "family" not in captured["filters"].describe()


def test_watch_long_flags_unchanged_and_json_short(capsys, captured):
    code, _, err = run(capsys, "watch", "--port", "8888", "--pid", str(os.getpid()), "--ipv6", "--json",
                       "--duration", "1")
    assert code == 0, err
    assert (captured["filters"].port, captured["filters"].family) == (8888, 6)
    assert captured["watch"]["as_json"] is True and captured["watch"]["duration"] == 1
    code, _, err = run(capsys, "watch", "-j", "-d", "1")
    assert code == 0, err
    assert captured["watch"]["as_json"] is True


def test_four_and_six_together_are_a_usage_error(capsys, captured):
    code, _, err = run(capsys, "watch", "-4", "-6", "--dry-run")
    assert code == 2
    assert err == "routetrace: -4 and -6 exclude each other: give one of them, or neither for both families\n"


def test_metrics_spec_is_passed_to_the_live_session(capsys, captured):
    code, _, err = run(capsys, "watch", "--metrics", "9464", "-d", "1")
    assert code == 0, err
    assert captured["watch"]["metrics"] == "9464"


def test_prove_and_bench_take_capital_p_for_the_port(capsys, captured):
    code, _, err = run(capsys, "prove", "-P", "9999", "-j")
    assert code == 0, err
    assert captured["prove"]["port"] == 9999 and captured["prove"]["as_json"] is True
    code, _, err = run(capsys, "prove", "--port", "9998", "--json")
    assert code == 0 and captured["prove"]["port"] == 9998
    code, _, err = run(capsys, "bench", "-P", "9200", "-r", "2")
    assert code == 0, err
    assert captured["bench"]["port"] == 9200
    code, _, err = run(capsys, "prove", "-p", "9999")     # -p is a PID in bcc's tools, never a port
    assert code == 2 and "No such option" in err and "-p" in err


def _user_run(*args):
    """As a user would run it: a new process, from outside the checkout."""
    return subprocess.run([sys.executable, "-m", "routetrace", *args], capture_output=True, text=True,
                          cwd="/", timeout=120)


@pytest.mark.parametrize("spec,message", [
    ("/etc/passwd", "routetrace: --netns /etc/passwd is not a network namespace (a path must be one, "
                    "such as /run/netns/NAME or /proc/PID/ns/net)"),
    ("5", "routetrace: --netns 5: no network namespace has inode 5 (no process is in one, and no entry "
          "under /run/netns holds one)"),
    ("/proc/self/ns/mnt", "routetrace: --netns /proc/self/ns/mnt is a mount namespace, not a network namespace"),
    ("/proc/self/ns/uts", "routetrace: --netns /proc/self/ns/uts is a uts namespace, not a network namespace"),
    ("/no/such/file", "routetrace: --netns /no/such/file: no such file (give a name under /run/netns, "
                      "a path such as /proc/PID/ns/net, or an inode)"),
    ("/tmp", "routetrace: --netns /tmp is not a network namespace (a path must be one, such as "
             "/run/netns/NAME or /proc/PID/ns/net)"),
    ("no-such-ns-routetrace", "routetrace: unknown network namespace 'no-such-ns-routetrace' (not a name "
                              "under /run/netns, a path or an inode)"),
])
def test_netns_must_be_a_real_network_namespace(spec, message):
    # --dry-run: as root this would otherwise go on to gather facts and print the plan.
    out = _user_run("watch", "--netns", spec, "--dry-run")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == message + "\n"
    assert out.stdout == ""


def test_netns_accepts_paths_names_and_inodes_of_real_ones():
    own = netns.current_inode()
    assert netns.resolve("/proc/self/ns/net")[0] == own
    assert netns.resolve(f"/proc/{os.getpid()}/ns/net")[0] == own
    assert netns.resolve(str(own))[0] == own


@pytest.mark.skipif(os.geteuid() != 0, reason="ip netns add needs root")
def test_netns_by_name_and_by_its_inode():
    name = f"rt-conv-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        inode = os.stat(f"/run/netns/{name}").st_ino
        assert netns.resolve(name) == (inode, name)
        assert netns.resolve(str(inode)) == (inode, name)     # nobody is in it: the /run/netns entry holds it
        assert netns.resolve(f"/run/netns/{name}") == (inode, name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _all_help(command, path=("routetrace",)):
    ctx = click.Context(command, info_name=" ".join(path))
    yield " ".join(path), command.get_help(ctx)
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _all_help(sub, (*path, name))


def test_help_is_written_for_users():
    texts = dict(_all_help(cli.cli))
    assert set(texts) >= {"routetrace", "routetrace watch", "routetrace prove", "routetrace bench",
                          "routetrace report", "routetrace export", "routetrace doctor"}
    for where, text in texts.items():
        assert "design card" not in text.lower(), where
    assert "-p, --pid PID" in texts["routetrace watch"]
    assert "-P, --port PORT" in texts["routetrace watch"]
    assert "-4, --ipv4" in texts["routetrace watch"] and "-6, --ipv6" in texts["routetrace watch"]
    assert "-j, --json" in texts["routetrace watch"] and "-j, --json" in texts["routetrace prove"]
    assert "--metrics [ADDR:]PORT" in texts["routetrace watch"]


def test_doctor_shows_the_plan_of_the_backend_asked_for_and_what_it_cannot_see(monkeypatch):
    """doctor --backend (or ROUTETRACE_BACKEND, as watch reads it) shows that plan and its blind
    spots: the VM matrix compares them with what each cell's plan says."""
    import json
    from pathlib import Path
    from click.testing import CliRunner
    from routetrace.kernel import KernelFacts
    fixture = Path(__file__).parent / "fixtures" / "kernel-facts" / "6.12.117+deb12-amd64.json"
    facts = KernelFacts.from_dict(json.loads(fixture.read_text()))
    monkeypatch.setattr(kernel, "gather", lambda **kw: facts)
    monkeypatch.setattr(kernel, "mount_tracefs", lambda: None)
    kprobe_blind_spot = f"cannot see: {facts.limits('kprobe')['xmit_missed']}"
    result = CliRunner().invoke(cli.cli, ["doctor"], env={"ROUTETRACE_BACKEND": "kprobe"})
    assert "attach plan: kprobe" in result.output and kprobe_blind_spot in result.output, result.output
    result = CliRunner().invoke(cli.cli, ["doctor", "--backend", "tracepoint"])
    assert "attach plan: tracepoint" in result.output and kprobe_blind_spot not in result.output, result.output


def test_doctor_and_dry_run_say_each_blind_spot_once_and_before_the_offsets(monkeypatch):
    """The sandbox kernel's PID 1 skip is a reason of the plan and a thing it cannot see: said
    once, inside the plan, not again under the offsets table."""
    import json
    from pathlib import Path
    from click.testing import CliRunner
    from routetrace.kernel import KernelFacts
    fixture = Path(__file__).parent / "fixtures" / "kernel-facts" / "6.18.44-fc-v669.json"
    facts = KernelFacts.from_dict(json.loads(fixture.read_text()))
    monkeypatch.setattr(kernel, "gather", lambda **kw: facts)
    monkeypatch.setattr(kernel, "mount_tracefs", lambda: None)
    pid1 = facts.limits("tracepoint")["pid1"]
    for args in (["doctor", "--backend", "tracepoint"], ["watch", "--dry-run", "--backend", "tracepoint"]):
        result = CliRunner().invoke(cli.cli, args)
        assert "attach plan: tracepoint" in result.output, result.output
        assert result.output.count(pid1) == 1, result.output
        assert result.output.index(pid1) < result.output.index("\noffsets:"), result.output
