"""The per-CPU flow cache against real traffic: a packet of a cached flow is counted in a slot of
its CPU, not in the map, so every count a slot holds must reach its flow -- written back when
another flow takes the slot, or added by user space when the epoch's map is drained. Many flows
in bursts on one CPU contend for its few slots (write-backs), and a drain in the middle of the
traffic moves counts across both epochs; every flow's packets and bytes must come out exact.
"""
import subprocess
import sys

import pytest

from routetrace import kernel, netns, probes
from routetrace.events import decode_entry
from routetrace.tracer import Tracer

pytestmark = pytest.mark.bpf

FLOWS = 200                  # more than a CPU has slots (64): flows must share them
# Flow i's burst in round r: 1 + (i + r) % 4 packets of 20 + i bytes, all from one CPU.
SENDER = r"""
import os, socket, sys
os.sched_setaffinity(0, {0})
phase, rounds = int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for r in range(phase * rounds, (phase + 1) * rounds):
    for i in range(%d):
        for _ in range(1 + (i + r) %% 4):
            s.sendto(b'x' * (20 + i), (sys.argv[1], 21000 + i))
""" % FLOWS
ROUNDS = 5


def _expected(phases: int) -> dict[int, int]:
    return {21000 + i: sum(1 + (i + r) % 4 for r in range(phases * ROUNDS)) for i in range(FLOWS)}


def _udp_to_peer(counts: dict, drained, peer: str) -> None:
    """Packets and bytes of the drained UDP flows to the peer, added to counts by port."""
    for keys, values, count in drained:
        ksize, vsize = len(keys) // count, len(values) // count
        for i in range(count):
            flow, _ = decode_entry(keys[i * ksize:(i + 1) * ksize], values[i * vsize:(i + 1) * vsize], "tracepoint")
            if flow.key.proto == "udp" and flow.key.daddr == peer:
                got = counts.setdefault(flow.key.dport, [0, 0])
                got[0] += flow.packets
                got[1] += flow.bytes


def test_every_cached_count_reaches_its_flow_across_write_backs_and_a_drain_mid_traffic(sandbox):
    facts = kernel.gather(prepare_headers=True)
    headers = None if facts.headers.matches else facts.headers.path
    plan = probes.choose(facts, probes.Filters(netns=netns.inode_of(sandbox.host)), backend="tracepoint")
    with Tracer(plan, headers) as t:
        assert t._table(b"flow_cache") is not None
        counts: dict[int, list[int]] = {}
        for phase in range(2):
            out = subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-c", SENDER,
                                  sandbox.peer_addr, str(phase), str(ROUNDS)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            if phase == 0:
                # The first phase's counts sit in the map and the slots of the epoch in use: this
                # drain empties the other epoch and flips, so they are taken by the final one.
                _udp_to_peer(counts, t.drain(), sandbox.peer_addr)
        t.set_attached(False)
        _udp_to_peer(counts, t.drain(final=True), sandbox.peer_addr)
        losses = t.losses()
    expected = _expected(2)
    assert {port: got[0] for port, got in counts.items()} == expected
    assert {port: got[1] for port, got in counts.items()} == {
        port: n * (28 + 20 + port - 21000) for port, n in expected.items()}
    assert losses.flow_map_full == 0


def test_the_slots_are_empty_after_a_final_drain(sandbox):
    """What user space took is gone from the slots: a second drain finds nothing to add."""
    facts = kernel.gather(prepare_headers=True)
    headers = None if facts.headers.matches else facts.headers.path
    plan = probes.choose(facts, probes.Filters(netns=netns.inode_of(sandbox.host)), backend="tracepoint")
    with Tracer(plan, headers) as t:
        out = subprocess.run(["ip", "netns", "exec", sandbox.host, sys.executable, "-c", SENDER,
                              sandbox.peer_addr, "0", "1"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        t.set_attached(False)
        counts: dict[int, list[int]] = {}
        _udp_to_peer(counts, t.drain(final=True), sandbox.peer_addr)
        assert sum(v[0] for v in counts.values()) == sum(1 + i % 4 for i in range(FLOWS))
        assert t._take_cached(0) == {} and t._take_cached(1) == {}
