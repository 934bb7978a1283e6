"""The per-CPU flow cache's counts, as user space takes them at a drain (no root): summed over
CPUs by key, added to the drained entry of the same key, and whatever matches no entry left over.
bpf/common.c (struct cached_flow) and events.py must agree on the layout; test_flow_cache_bpf.py
checks the whole path against real traffic."""
import struct

from routetrace.events import (CACHED_FLOW_STRUCT, COUNTS_STRUCT, KEY_STRUCT, VALUE_STRUCT, add_cached_counts,
                               cached_counts)


def _key(port: int, family: int = 4, ifindex: int = 2) -> bytes:
    return KEY_STRUCT.pack(4026531840, ifindex, bytes([198, 51, 100, 1]) + bytes(12),
                           bytes([198, 51, 100, 2]) + bytes(12), 40000, port, 17, family, 0)


def _slot(key: bytes, *counts: int) -> bytes:
    return CACHED_FLOW_STRUCT.pack(key, *counts)


def _value(packets: int, nbytes: int, segments: int, fragments: int = 0) -> bytes:
    return COUNTS_STRUCT.pack(packets, nbytes, segments, fragments) + bytes(VALUE_STRUCT.size - COUNTS_STRUCT.size)


def test_a_cached_flow_is_a_key_then_four_counts():
    assert CACHED_FLOW_STRUCT.size == KEY_STRUCT.size + 32 == 80


def test_counts_are_summed_over_cpus_and_empty_slots_are_skipped():
    a, b = _key(1), _key(2)
    empty = _slot(bytes(KEY_STRUCT.size), 0, 0, 0, 0)
    stale = _slot(bytes(KEY_STRUCT.size)[:45] + b"\0" + bytes(2), 5, 5, 5, 5)   # family 0: no slot
    slots = _slot(a, 3, 300, 3, 0) + empty + _slot(b, 1, 60, 2, 1) + _slot(a, 2, 200, 4, 0) + stale
    assert cached_counts(slots) == {a: [5, 500, 7, 0], b: [1, 60, 2, 1]}
    # A slot holding a key whose counts were written back (0 packets) adds nothing.
    assert cached_counts(_slot(a, 0, 0, 0, 0)) == {}


def test_cached_counts_are_added_to_the_drained_entry_of_their_key():
    keys = [_key(p) for p in (1, 2, 3)]
    values = [_value(1, 100, 1), _value(4, 400, 4), _value(1, 64, 3)]
    pending = {keys[1]: [6, 600, 6, 0], keys[2]: [2, 128, 2, 1]}
    out = add_cached_counts(b"".join(keys), b"".join(values), 3, pending)
    got = [COUNTS_STRUCT.unpack_from(out, i * VALUE_STRUCT.size) for i in range(3)]
    assert got == [(1, 100, 1, 0), (10, 1000, 10, 0), (3, 192, 5, 1)]
    # The rest of each value is untouched, and every pending key was used.
    assert all(out[i * VALUE_STRUCT.size + 32:(i + 1) * VALUE_STRUCT.size] == values[i][32:] for i in range(3))
    assert pending == {}


def test_a_key_matches_only_at_an_entry_boundary_and_the_unmatched_stay_pending():
    # A key whose bytes also occur straddling two other keys must not patch either of them.
    wanted = _key(7)
    half = KEY_STRUCT.size // 2
    first = bytes(half) + wanted[:half]
    second = wanted[half:] + bytes(KEY_STRUCT.size - (KEY_STRUCT.size - half))
    keys = first + second[:KEY_STRUCT.size] + wanted
    assert keys.find(wanted) == half            # the straddling copy comes first
    values = _value(1, 1, 1) * 3
    pending = {wanted: [2, 2, 2, 0], _key(8): [9, 9, 9, 0]}
    out = add_cached_counts(keys, values, 3, pending)
    assert [COUNTS_STRUCT.unpack_from(out, i * VALUE_STRUCT.size)[0] for i in range(3)] == [1, 1, 3]
    assert pending == {_key(8): [9, 9, 9, 0]}


def test_nothing_pending_returns_the_chunk_as_it_was():
    values = _value(1, 1, 1)
    assert add_cached_counts(_key(1), values, 1, {}) is values
