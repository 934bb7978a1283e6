"""Kernel facts as data: `doctor --json` on every kernel scripts/vm-test boots (and on this host),
kept in tests/fixtures/kernel-facts/<release>.json. Without root: every backend's plan, chosen
from each kernel's facts, attaches only to what that kernel has, or is refused with a reason."""
import json
import os
from pathlib import Path

import pytest

from routetrace import kernel, probes
from routetrace.errors import EnvironmentProblem
from routetrace.kernel import KernelFacts

FACTS_DIR = Path(__file__).parent / "fixtures" / "kernel-facts"
FIXTURES = sorted(FACTS_DIR.glob("*.json"))
# The kernels scripts/vm-test boots, and this host's: each must have its facts recorded.
EXPECTED_SERIES = ("5.10.", "6.1.", "6.12.", "6.18.", "7.")


_BTF_CACHE = {}


@pytest.fixture(autouse=True)
def _btf_parsed_once(monkeypatch):
    """choose() reads this host's BTF for offsets (irrelevant here; the plan's attachments are
    what is checked): parse it once for the module, not once per kernel and backend."""
    from routetrace.btf import Btf
    original = Btf.__dict__["load"]
    cache = _BTF_CACHE

    def load(cls, *args, **kw):
        key = (args, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = original.__func__(cls, *args, **kw)
        return cache[key]
    monkeypatch.setattr(Btf, "load", classmethod(load))


def _load(path):
    return KernelFacts.from_dict(json.loads(path.read_text()))


def test_every_kernel_of_the_matrix_has_its_facts_recorded():
    releases = [p.stem for p in FIXTURES]
    for series in EXPECTED_SERIES:
        assert any(r.startswith(series) for r in releases), f"no facts for a {series}x kernel in {FACTS_DIR}"


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_facts_round_trip_and_name_the_kernel_they_came_from(path):
    data = json.loads(path.read_text())
    facts = KernelFacts.from_dict(data)
    assert facts.release == path.stem
    again = facts.to_dict()
    for key, value in again.items():
        assert data[key] == value, key
    # The facts the lead's plans need are recorded, present or not.
    assert set(data["tracepoints"]) >= set(kernel.TRACEPOINTS)
    assert data["xmit_function"] in ("__dev_queue_xmit", "dev_queue_xmit", None)
    for symbol, letter in data["symbols"].items():
        assert symbol in kernel.SYMBOLS and letter in "TtWw", (symbol, letter)
    for tp, present in data["tracepoints"].items():
        assert (tp in data["tracepoint_fields"]) == present, tp


def _kernel_has(facts: KernelFacts, attachment: probes.Attachment) -> bool:
    if attachment.kind == "tracepoint":
        return facts.tracepoints.get(attachment.target.replace(":", "/"), False)
    if attachment.kind == "raw_tracepoint":
        # A raw tracepoint is named by its event alone ("net_dev_queue" of net/net_dev_queue).
        present = any(ok and tp.split("/")[1] == attachment.target for tp, ok in facts.tracepoints.items())
        return present and facts.raw_tracepoints
    if attachment.kind == "btf_tracepoint":
        present = any(ok and tp.split("/")[1] == attachment.target for tp, ok in facts.tracepoints.items())
        return present and facts.btf_tracepoints
    if attachment.kind in ("kprobe", "kretprobe"):
        return facts.kprobes and attachment.target in facts.symbols
    raise AssertionError(f"unknown attachment kind {attachment.kind!r}: teach this test what it needs")


@pytest.mark.parametrize("backend", probes.BACKENDS)
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_each_plan_attaches_only_to_what_that_kernel_has(path, backend):
    facts = _load(path)
    try:
        plan = probes.choose(facts, probes.Filters(), backend)
    except EnvironmentProblem as exc:
        reason = str(exc)
        # A clear reason: it names what is missing and is more than a word.
        assert len(reason) > 20 and any(w in reason for w in ("kprobe", "tracepoint", "headers", "BTF", "kallsyms")), reason
        if backend == "kprobe":
            assert not facts.kprobes or facts.xmit_function is None or "ip_route_output_key_hash" not in facts.symbols
        return
    assert plan.attachments
    missing = [str(a) for a in plan.attachments if not _kernel_has(facts, a)]
    assert not missing, f"{facts.release}: {backend} plan attaches to what the kernel lacks: {missing}"
    if backend != "auto":
        assert plan.backend == backend
    kprobe_targets = {a.target for a in plan.attachments if a.kind == "kprobe"}
    if plan.backend == "kprobe":
        # Never the local copy of the inline wrapper: the transmit probe goes on a global function.
        assert facts.xmit_function in kprobe_targets
        assert facts.symbols[facts.xmit_function] == "T"


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_auto_takes_kprobes_exactly_where_the_kernel_has_them(path):
    facts = _load(path)
    plan = probes.choose(facts, probes.Filters(), "auto")
    assert plan.backend == ("kprobe" if facts.kprobes else "tracepoint")


def test_the_recorded_kernels_differ_where_the_plans_must_adapt():
    """The matrix is worth its time only if the kernels differ: these facts are what differ."""
    by_series = {p.stem.split(".")[0] + "." + p.stem.split(".")[1]: _load(p) for p in FIXTURES}
    old, host = by_series["5.10"], by_series["6.18"]
    assert old.xmit_function == "dev_queue_xmit" and old.fib_name_data_loc
    assert host.xmit_function is None or host.symbols.get("__dev_queue_xmit") == "T"
    assert not host.kprobes
    assert all(f.kprobes for s, f in by_series.items() if s != "6.18")


def test_a_missing_fib6_tracepoint_is_stated_not_hidden():
    """The plans read the FIB lookups' own structures (raw tracepoints), so no record field can
    be missing; a kernel without the fib6 tracepoint (no IPv6) leaves IPv6 flows without a FIB
    column, and says so in the plan that doctor and --dry-run print."""
    facts = _load(FIXTURES[0])
    facts.tracepoints["fib6/fib6_table_lookup"] = False
    statement = facts.limits("tracepoint")["fib_dev/ipv6"]
    assert "IPv6 flows have no FIB column" in statement and facts.release in statement
    plan = probes.choose(facts, probes.Filters(), "tracepoint")
    assert statement in plan.render()
    assert not [a for a in plan.attachments if "fib6" in a.target]


def test_tracefs_formats_parse_with_data_loc_and_arrays():
    fmt = ("name: fib_table_lookup\nID: 1\nformat:\n"
           "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n"
           "\tfield:u32 tb_id;\toffset:8;\tsize:4;\tsigned:0;\n"
           "\tfield:__u8 src[4];\toffset:28;\tsize:4;\tsigned:0;\n"
           "\tfield:__data_loc char[] name;\toffset:60;\tsize:4;\tsigned:1;\n")
    assert kernel.parse_format(fmt) == {
        "tb_id": {"type": "u32", "offset": 8, "size": 4},
        "src": {"type": "__u8[4]", "offset": 28, "size": 4},
        "name": {"type": "__data_loc char[]", "offset": 60, "size": 4}}


def test_facts_from_something_else_are_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": 99}')
    with pytest.raises(EnvironmentProblem, match="not routetrace kernel facts"):
        KernelFacts.load(bad)
    bad.write_text("{")
    with pytest.raises(EnvironmentProblem, match="cannot read kernel facts"):
        KernelFacts.load(bad)


def test_doctor_json_is_one_object_built_from_the_facts(capsys, monkeypatch):
    from routetrace import cli
    facts = _load(FIXTURES[0])
    monkeypatch.setattr(kernel, "gather", lambda **kw: facts)
    assert cli.main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert KernelFacts.from_dict(data).to_dict() == facts.to_dict()
    assert set(data["plans"]) == set(probes.BACKENDS)


@pytest.mark.parametrize("path", [p for p in FIXTURES if _load(p).kprobes], ids=lambda p: p.stem)
def test_the_kprobe_plan_probes_both_route_functions_where_the_kernel_has_them(path):
    """ip_route_output_key_hash is inlined into ip_route_output_flow in route.c: a plan probing
    only the former misses most lookups. Every VM kernel recorded has both."""
    facts = _load(path)
    plan = probes.choose(facts, probes.Filters(), "kprobe")
    targets = {(a.kind, a.target) for a in plan.attachments}
    assert probes.ROUTE_FLOW_FUNCTION in facts.symbols
    for fn in ("ip_route_output_key_hash", probes.ROUTE_FLOW_FUNCTION):
        assert {("kprobe", fn), ("kretprobe", fn)} <= targets, (facts.release, sorted(targets))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_a_kernel_that_skips_bpf_for_pid1_says_so_in_both_plans(path):
    """The 6.18 sandbox kernel returns from bpf_trace_run*() before the program, counting nothing,
    while PID 1 is the current task (README, Limits). Its mark is a bpf_prog_aux member no upstream
    kernel has; where the BTF has it, both plans state what they cannot see, and only there."""
    facts = _load(path)
    assert facts.bpf_skips_pid1 == (path.stem == "6.18.44-fc-v669")
    for backend in ("tracepoint", "kprobe"):
        statement = facts.limits(backend).get("pid1")
        assert (statement is not None) == facts.bpf_skips_pid1
        if statement is None or (backend == "kprobe" and not facts.kprobes):
            continue
        assert "neither accounted nor counted lost" in statement
        assert statement in probes.choose(facts, probes.Filters(), backend).render()


def test_the_pid1_mark_is_read_from_the_btf_struct_itself():
    """struct_has_member walks the type records: the member must belong to that struct, not just
    be a string somewhere in the BTF."""
    from routetrace import btf
    if not btf.VMLINUX_BTF.exists():
        if os.environ.get("CI"):
            pytest.fail("no kernel BTF at /sys/kernel/btf/vmlinux")
        pytest.skip("no kernel BTF here")
    full = btf.Btf.load()
    for struct_name, member in (("bpf_prog_aux", "init_owned"), ("bpf_prog_aux", "load_time"),
                                ("task_struct", "init_owned"), ("task_struct", "tgid")):
        expected = True
        try:
            full.offsetof(f"{struct_name}.{member}")
        except EnvironmentProblem:
            expected = False
        assert btf.struct_has_member(struct_name, member) == expected, (struct_name, member)
