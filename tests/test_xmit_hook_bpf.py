"""The transmit program on its two hooks: the BTF-typed tracepoint (plain loads of the skb, its
device and namespace) must count exactly what the raw tracepoint (every read a helper call)
counts, and a kernel that refuses the typed one gets the raw one, saying why.

Both programs are attached at once to the same traffic in a namespace of the test's own, and
their drained entries are compared key for key.
"""
import os
import subprocess
import sys

import pytest

from routetrace import kernel, netns, probes
from routetrace.bench import bpf_stats_enabled
from routetrace.events import decode_entry
from routetrace.tracer import Tracer

pytestmark = pytest.mark.bpf

TRAFFIC = r"""
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(40):
    udp.sendto(b'x' * (10 + i), (sys.argv[1], 20000 + i % 8))      # 8 flows to the peer (veth)
    udp.sendto(b'y' * 30, (sys.argv[2], 20100 + i % 4))            # 4 flows to the own address (lo)
six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(12):
    six.sendto(b'z' * 20, ('::1', 20200 + i % 3))
for i in range(3):      # refused by the peer: a SYN routed by its socket (an IPv6 one, v4-mapped)
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.settimeout(2)
    try:
        t.connect(('::ffff:' + sys.argv[1], 20300 + i))
    except OSError:
        pass
    t.close()
"""


def _facts_and_headers():
    facts = kernel.gather(prepare_headers=True)
    return facts, (None if facts.headers.matches else facts.headers.path)


def _plan(facts, filters, hook: str, monkeypatch):
    if hook == "raw":
        monkeypatch.setenv(probes.XMIT_HOOK_ENV, "raw")
    else:
        monkeypatch.delenv(probes.XMIT_HOOK_ENV, raising=False)
    return probes.choose(facts, filters, backend="tracepoint")


def _entries(tracer: Tracer) -> dict:
    out = {}
    for keys, values, count in tracer.drain(final=True):
        ksize, vsize = len(keys) // count, len(values) // count
        for i in range(count):
            flow, _ = decode_entry(keys[i * ksize:(i + 1) * ksize], values[i * vsize:(i + 1) * vsize], "tracepoint")
            dev = flow.devices[0]
            out[(flow.key, dev["ifindex"])] = (flow.packets, flow.bytes, flow.segments, dev["name"], dev["loopback"],
                                              flow.route_type, flow.route_dev, flow.route_src, flow.comm,
                                              flow.extra.get("v4_mapped_socket", False))
    return out


def test_the_typed_and_the_raw_hook_count_the_same_packets_the_same_way(sandbox, monkeypatch):
    facts, headers = _facts_and_headers()
    if not facts.btf_tracepoints:
        # CI runs on the kernel these machines have (6.18), which loads them: there it is a failure.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "this kernel does not load BTF-typed tracepoint programs (the raw hook is the only one)")
    subprocess.run(["ip", "netns", "exec", sandbox.host, "ip", "link", "set", "lo", "up"], check=True)
    filters = probes.Filters(netns=netns.inode_of(sandbox.host))
    typed_plan = _plan(facts, filters, "btf", monkeypatch)
    raw_plan = _plan(facts, filters, "raw", monkeypatch)
    assert typed_plan.attachments[-1] == probes.XMIT_BTF_TRACEPOINT
    # Where the kernel takes bpf_rdonly_cast (6.2+; 6.18 here, in CI), the typed program reads the
    # packet headers and the GSO count through casts: that is what is compared with the raw hook.
    assert typed_plan.kfuncs == (["bpf_rdonly_cast"] if facts.packet_casts else [])
    if os.environ.get("CI") and not facts.packet_casts:
        pytest.fail("this kernel does not take bpf_rdonly_cast in a BTF-typed tracepoint program")
    # run_cnt moves only with kernel.bpf_stats_enabled=1: set here, not left to whatever ran before.
    with bpf_stats_enabled() as enabled, Tracer(typed_plan, headers) as typed, Tracer(raw_plan, headers) as raw:
        assert enabled, "kernel.bpf_stats_enabled cannot be set: runs would not be counted"
        assert typed.plan.attachments[-1].kind == "btf_tracepoint", typed.plan.reasons
        assert raw.plan.attachments[-1].kind == "raw_tracepoint"
        out = subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-c", TRAFFIC,
                              sandbox.peer_addr, sandbox.own_addr], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        typed.set_attached(False)
        raw.set_attached(False)
        from_typed, from_raw = _entries(typed), _entries(raw)
        stats = {p.name: p.run_cnt for p in typed.program_stats()}
    # The test's own packets (the kernel's own, MLD and the like, may fall between the two attaches).
    mine = {"udp", "tcp"}
    from_typed = {k: v for k, v in from_typed.items() if k[0].proto in mine}
    from_raw = {k: v for k, v in from_raw.items() if k[0].proto in mine}
    assert from_typed == from_raw
    # What the traffic sent, on the devices it must have used (identity: ifindex and IFF_LOOPBACK).
    to_peer = {k: v for k, v in from_typed.items() if k[0].daddr == sandbox.peer_addr and k[0].proto == "udp"}
    to_own = {k: v for k, v in from_typed.items() if k[0].daddr == sandbox.own_addr and k[0].proto == "udp"}
    six = {k: v for k, v in from_typed.items() if k[0].daddr == "::1"}
    assert len(to_peer) == 8 and sum(v[0] for v in to_peer.values()) == 40
    assert len(to_own) == 4 and sum(v[0] for v in to_own.values()) == 40
    assert len(six) == 3 and sum(v[0] for v in six.values()) == 12
    # Unconnected UDP: the veth dropped the skb's route before the tracepoint and the socket keeps
    # none, so only the device is known there; lo keeps the route (LOCAL) on the skb.
    assert all(not v[4] and v[3] == "eth0" for v in to_peer.values()), to_peer
    assert all(v[4] and v[5] == "LOCAL" and v[7] == "packet" for v in to_own.values()), to_own
    assert sum(v[1] for v in to_peer.values()) == sum(28 + 10 + i for i in range(40))   # IP bytes
    # The SYNs: the route the connecting socket keeps (read from the socket), the v4-mapped flag.
    syns = {k: v for k, v in from_typed.items() if k[0].proto == "tcp" and k[0].daddr == sandbox.peer_addr}
    assert len(syns) == 3, from_typed
    assert all(v[5] == "UNICAST" and v[6] == "eth0" and v[7] == "socket" and v[9] for v in syns.values()), syns
    assert stats["xmit_btf"] > 0


def test_a_refused_typed_program_falls_back_to_the_raw_hook_and_says_why(sandbox, monkeypatch):
    from routetrace import bpfsys
    from routetrace.errors import EnvironmentProblem
    facts, headers = _facts_and_headers()
    facts.btf_tracepoints = True       # as if the kernel had said yes to the trivial program
    plan = _plan(facts, probes.Filters(netns=netns.inode_of(sandbox.host)), "btf", monkeypatch)

    def refuse(*_a, **_kw):
        raise EnvironmentProblem("the kernel refused xmit_btf as a BTF-typed tracepoint program: Permission denied")
    monkeypatch.setattr(bpfsys, "load_btf_tracepoint", refuse)
    with Tracer(plan, headers) as t:
        assert t.plan.attachments[-1] == probes.XMIT_TRACEPOINT
        assert any("refused xmit_btf" in r and "xmit_raw on the raw tracepoint instead" in r for r in t.plan.reasons)
        out = subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-c", TRAFFIC,
                              sandbox.peer_addr, sandbox.own_addr], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        t.set_attached(False)
        entries = _entries(t)
    assert sum(v[0] for k, v in entries.items() if k[0].daddr == sandbox.peer_addr and k[0].proto == "udp") == 40
