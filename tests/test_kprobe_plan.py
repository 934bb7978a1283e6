"""The design card's kprobe plan: chosen when it can run, verified here, run for real in VMs."""
import dataclasses
from pathlib import Path

import pytest

from routetrace import kernel, probes
from routetrace.kernel import Headers, KernelFacts
from routetrace.tracer import missed_by_role


def facts(**kw):
    base = dict(release="6.1.0-56-amd64", is_root=True, btf=True, tracefs=Path("/sys/kernel/tracing"),
                kprobes=True, raw_tracepoints=True,
                tracepoints={"fib/fib_table_lookup": True, "net/net_dev_queue": True,
                                           "fib6/fib6_table_lookup": True},
                symbols={"ip_route_output_key_hash": "T", "ip_route_output_flow": "T", "__dev_queue_xmit": "T",
                         "dev_queue_xmit": "t"},
                headers=Headers(Path("/lib/modules/6.1.0-56-amd64/build"), "6.1.0-56-amd64", True))
    return KernelFacts(**{**base, **kw})


def test_auto_takes_kprobes_when_they_exist_and_the_symbols_resolve():
    plan = probes.choose(facts(), probes.Filters(port=8888))
    assert plan.backend == "kprobe"
    assert [str(a) for a in plan.attachments] == [
        "kprobe ip_route_output_key_hash", "kretprobe ip_route_output_key_hash",
        "kprobe ip_route_output_flow", "kretprobe ip_route_output_flow",
        "kprobe __dev_queue_xmit", "raw_tracepoint fib_table_lookup", "raw_tracepoint fib6_table_lookup"]
    assert plan.attachments[1].maxactive == plan.attachments[3].maxactive == probes.KRETPROBE_MAXACTIVE
    assert "-DROUTE_DECISIONS=1" in plan.cflags and "-DFILTER_PORT=8888" in plan.cflags
    assert plan.offsets[0].source == ("btf" if Path("/sys/kernel/btf/vmlinux").exists() else "headers")
    assert [p.name for p in plan.sources] == ["common.c", "fib.c", "kprobe.c"]
    assert plan.reasons[0].startswith("auto: kprobes available")


def test_transmit_function_is_never_the_local_copy():
    # 5.10: dev_queue_xmit is the real exported function, __dev_queue_xmit is static
    old = facts(symbols={"ip_route_output_key_hash": "T", "ip_route_output_flow": "T", "dev_queue_xmit": "T",
                         "__dev_queue_xmit": "t"})
    assert old.xmit_function == "dev_queue_xmit"
    assert str(probes.choose(old, probes.Filters()).attachments[4]) == "kprobe dev_queue_xmit"
    # 6.18: only a local out-of-line copy of the inline wrapper besides __dev_queue_xmit
    assert facts().xmit_function == "__dev_queue_xmit"
    only_local = facts(symbols={"ip_route_output_key_hash": "T", "dev_queue_xmit": "t"})
    assert only_local.xmit_function is None
    plan = probes.choose(only_local, probes.Filters())
    assert plan.backend == "tracepoint" and "dev_queue_xmit" in plan.reasons[0]


def test_auto_falls_back_to_tracepoints_and_says_why():
    plan = probes.choose(facts(kprobes=False), probes.Filters())
    assert plan.backend == "tracepoint"
    assert plan.reasons[0] == "auto: kprobes are not available on this kernel (CONFIG_KPROBES off)"
    from routetrace.errors import EnvironmentProblem
    with pytest.raises(EnvironmentProblem, match="--backend kprobe: kprobes are not available"):
        probes.choose(facts(kprobes=False), probes.Filters(), "kprobe")
    assert probes.choose(facts(), probes.Filters(), "tracepoint").backend == "tracepoint"


def test_the_transmit_program_takes_the_btf_typed_tracepoint_where_the_kernel_loads_one(monkeypatch):
    monkeypatch.delenv(probes.XMIT_HOOK_ENV, raising=False)
    typed = probes.choose(facts(kprobes=False, btf_tracepoints=True), probes.Filters())
    assert typed.attachments[-1] == probes.XMIT_BTF_TRACEPOINT
    assert typed.attachments[-1].fallback == probes.XMIT_TRACEPOINT
    assert "-DXMIT_BTF=1" in typed.cflags and "-DRAW_XMIT=1" in typed.cflags
    assert any("BTF-typed tracepoint" in r for r in typed.reasons)
    # Without the fact (a kernel before 5.5, or one refusing tracing programs): the raw tracepoint.
    raw = probes.choose(facts(kprobes=False, btf_tracepoints=False), probes.Filters())
    assert raw.attachments[-1] == probes.XMIT_TRACEPOINT and "-DXMIT_BTF=1" not in raw.cflags
    assert any("cannot load BTF-typed" in r for r in raw.reasons)
    # Asked for (tests, benchmarks): raw even where typed would load.
    monkeypatch.setenv(probes.XMIT_HOOK_ENV, "raw")
    forced = probes.choose(facts(kprobes=False, btf_tracepoints=True), probes.Filters())
    assert forced.attachments[-1] == probes.XMIT_TRACEPOINT and "-DXMIT_BTF=1" not in forced.cflags
    # The kprobe plan keeps its kprobe on the transmit function either way.
    assert str(probes.choose(facts(btf_tracepoints=True), probes.Filters()).attachments[4]) == "kprobe __dev_queue_xmit"


def test_packet_headers_are_read_through_casts_only_on_the_typed_hook_of_a_kernel_that_takes_them(monkeypatch):
    """bpf_rdonly_cast (6.2+): the casts' BTF ids come from the running kernel's BTF, which the plan
    also takes its offsets from; the tracer links the kfunc call by name (plan.kfuncs)."""
    from routetrace.btf import Btf
    monkeypatch.delenv(probes.XMIT_HOOK_ENV, raising=False)
    btf = Btf.load()
    casts = probes.choose(facts(kprobes=False, btf_tracepoints=True, packet_casts=True), probes.Filters())
    assert casts.kfuncs == ["bpf_rdonly_cast"] and "-DPACKET_CASTS=1" in casts.cflags
    for define, struct_name in probes.PACKET_CAST_STRUCTS.items():
        assert f"-D{define}={btf.by_name[struct_name]}" in casts.cflags
    assert any("bpf_rdonly_cast" in r for r in casts.reasons)
    # Not without the fact, not on the raw hook, not in the kprobe plan (no typed program there).
    for plan in (probes.choose(facts(kprobes=False, btf_tracepoints=True, packet_casts=False), probes.Filters()),
                 probes.choose(facts(kprobes=False, btf_tracepoints=False, packet_casts=True), probes.Filters()),
                 probes.choose(facts(btf_tracepoints=True, packet_casts=True), probes.Filters())):
        assert not plan.kfuncs and "-DPACKET_CASTS=1" not in plan.cflags, plan.backend
    monkeypatch.setenv(probes.XMIT_HOOK_ENV, "raw")
    forced = probes.choose(facts(kprobes=False, btf_tracepoints=True, packet_casts=True), probes.Filters())
    assert not forced.kfuncs and "-DPACKET_CASTS=1" not in forced.cflags
    # Offsets from headers (no BTF object): no ids to cast to, so no casts.
    monkeypatch.delenv(probes.XMIT_HOOK_ENV)
    monkeypatch.setenv("ROUTETRACE_OFFSETS", "headers")
    headers = probes.choose(facts(kprobes=False, btf_tracepoints=True, packet_casts=True), probes.Filters())
    assert not headers.kfuncs and "-DPACKET_CASTS=1" not in headers.cflags


def test_fib6_is_attached_only_where_the_kernel_has_it():
    with_v6 = probes.choose(facts(), probes.Filters())
    assert "-DHAVE_FIB6=1" in with_v6.cflags
    without = probes.choose(facts(tracepoints={"fib/fib_table_lookup": True, "net/net_dev_queue": True,
                                               "fib6/fib6_table_lookup": False}), probes.Filters())
    assert "-DHAVE_FIB6=1" not in without.cflags
    assert not [a for a in without.attachments if "fib6" in a.target]
    assert "no fib6:fib6_table_lookup tracepoint on 6.1.0-56-amd64: IPv6 flows have no FIB column" in without.reasons


def test_probe_misses_are_read_from_kprobe_profile_by_role():
    profile = ("  p_ip_route_output_key_hash_bcc_4242                    17               0\n"
               "  r_ip_route_output_key_hash_bcc_4242                    17               3\n"
               "  p___dev_queue_xmit_bcc_4242                          900               7\n"
               "  r_ip_route_output_key_hash_bcc_999                     17               5\n")
    assert missed_by_role(profile, 4242, {"__dev_queue_xmit"}) == {"route": 3, "xmit": 7}
    assert sum(missed_by_role(profile, 4242, set()).values()) == 10


def test_dry_run_prints_the_plan_without_root(capsys, monkeypatch):
    import os
    from routetrace import cli
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(kernel, "gather", lambda **kw: facts())
    monkeypatch.setenv("ROUTETRACE_OFFSETS", "headers")
    code = cli.main(["watch", "--dry-run", "--port", "8888"])
    out = capsys.readouterr().out
    assert code == 0
    assert "attach plan: kprobe" in out and "kretprobe   ip_route_output_key_hash" in out
    assert "OFF_RTABLE_RT_TYPE" in out and "offsetof(struct rtable, rt_type)" in out


@pytest.mark.bpf
@pytest.mark.parametrize("prefer_lookup", ["0", "1"])
def test_kprobe_programs_pass_this_kernels_verifier(bpf_ready, monkeypatch, prefer_lookup):
    """This kernel cannot attach kprobes, but its verifier can still check the programs (also as
    the VM tests build them, paired lookups preferred)."""
    from routetrace.tracer import Tracer
    monkeypatch.setenv(probes.PREFER_LOOKUP_ENV, prefer_lookup)
    kernel.mount_tracefs()
    here = kernel.gather(prepare_headers=True)
    plan = probes.choose(dataclasses.replace(here, kprobes=True, symbols={
        "ip_route_output_key_hash": "T", "ip_route_output_flow": "T", "__dev_queue_xmit": "T"}),
        probes.Filters(port=8888), "kprobe")
    headers = None if here.headers.matches else here.headers.path
    with Tracer(plan, headers, attach=False) as tracer:
        assert tracer.losses().total == 0


def test_kretprobe_maxactive_is_settable_and_dry_run_shows_it(capsys, monkeypatch):
    from routetrace import cli
    monkeypatch.setattr(kernel, "gather", lambda **kw: facts())
    monkeypatch.setenv("ROUTETRACE_OFFSETS", "headers")
    assert cli.main(["watch", "--dry-run"]) == 0
    assert "-> route_return (maxactive 256)" in capsys.readouterr().out
    assert cli.main(["watch", "--dry-run", "--kretprobe-maxactive", "7"]) == 0
    assert "-> route_return (maxactive 7)" in capsys.readouterr().out
    plan = probes.choose(facts(), probes.Filters(), limits=probes.Limits(kretprobe_maxactive=1))
    assert [a.maxactive for a in plan.attachments if a.kind == "kretprobe"] == [1, 1]
    assert plan.describe()["limits"]["kretprobe_maxactive"] == 1
    for bad in ("0", "4097", "x"):
        assert cli.main(["watch", "--dry-run", "--kretprobe-maxactive", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("routetrace: ") and "--kretprobe-maxactive" in err and len(err.splitlines()) == 1, err


def test_the_kprobe_plan_is_x86_64_only_and_says_why():
    assert probes._kprobe_problem(facts(), "x86_64") is None
    why = probes._kprobe_problem(facts(), "aarch64")
    assert "stack pointer" in why and "aarch64" in why


def test_preferring_paired_lookups_is_a_test_switch_of_the_kprobe_plan_only(monkeypatch):
    monkeypatch.delenv(probes.PREFER_LOOKUP_ENV, raising=False)
    assert "-DROUTE_PREFER_LOOKUP=1" not in probes.choose(facts(), probes.Filters()).cflags
    monkeypatch.setenv(probes.PREFER_LOOKUP_ENV, "1")
    plan = probes.choose(facts(), probes.Filters())
    assert "-DROUTE_PREFER_LOOKUP=1" in plan.cflags
    assert any(r.startswith(f"{probes.PREFER_LOOKUP_ENV}=1") for r in plan.reasons)
    assert "-DROUTE_PREFER_LOOKUP=1" not in probes.choose(facts(), probes.Filters(), "tracepoint").cflags


def test_unpaired_route_lookups_are_a_loss_of_their_own():
    from routetrace.events import LossCounters
    from routetrace.render import losses_line
    losses = LossCounters(route_unpaired=3)
    assert losses.total == 3 and losses.to_dict()["route_unpaired"] == 3
    assert "3 route lookups whose entry and return could not be paired" in losses_line(losses)
    assert LossCounters.from_dict({"probes_missed": 1}).route_unpaired == 0      # older recordings


def test_ip_route_output_flow_is_probed_where_kallsyms_has_it_and_its_absence_is_stated():
    without = probes.choose(facts(symbols={"ip_route_output_key_hash": "T", "__dev_queue_xmit": "T"}), probes.Filters())
    assert [a.target for a in without.attachments if a.kind == "kretprobe"] == ["ip_route_output_key_hash"]
    assert any(r.startswith("ip_route_output_flow is not in /proc/kallsyms") for r in without.reasons)
