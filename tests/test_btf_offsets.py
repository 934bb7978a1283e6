import struct
from pathlib import Path

import pytest

from routetrace import offsets
from routetrace.btf import Btf, KIND_INT, KIND_PTR, KIND_STRUCT, KIND_TYPEDEF, KIND_UNION, VMLINUX_BTF, type_ids
from routetrace.errors import EnvironmentProblem


class BtfBuilder:
    """Writes a tiny BTF blob in the kernel's format (Documentation/bpf/btf.rst)."""

    def __init__(self):
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def _name(self, name):
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def int(self, name, size):
        self.types += struct.pack("<III", self._name(name), KIND_INT << 24, size) + struct.pack("<I", size * 8)
        self.count += 1
        return self.count

    def ptr(self, target):
        self.types += struct.pack("<III", 0, KIND_PTR << 24, target)
        self.count += 1
        return self.count

    def typedef(self, name, target):
        self.types += struct.pack("<III", self._name(name), KIND_TYPEDEF << 24, target)
        self.count += 1
        return self.count

    def composite(self, kind, name, size, members, bitfields=False):
        info = (kind << 24) | len(members) | (1 << 31 if bitfields else 0)
        self.types += struct.pack("<III", self._name(name), info, size)
        for m_name, m_type, bit_off in members:
            self.types += struct.pack("<III", self._name(m_name), m_type, bit_off)
        self.count += 1
        return self.count

    def blob(self):
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


@pytest.fixture
def tiny_btf():
    b = BtfBuilder()
    u32 = b.int("u32", 4)
    u16 = b.int("u16", 2)
    inner = b.composite(KIND_STRUCT, "ns_common", 8, [("stashed", u32, 0), ("inum", u32, 32)])
    net = b.composite(KIND_STRUCT, "net", 24, [("refcnt", u32, 0), ("ns", inner, 128)])
    pnet = b.typedef("possible_net_t", b.composite(KIND_STRUCT, "", 8, [("net", b.ptr(net), 0)]))
    anon = b.composite(KIND_UNION, "", 8, [("dev", b.ptr(u32), 0), ("dev_rcu", b.ptr(u32), 0)])
    b.composite(KIND_STRUCT, "dst_entry", 16, [("ops", u32, 0), ("", anon, 64)])
    b.composite(KIND_STRUCT, "net_device", 320, [("flags", u32, 0), ("nd_net", pnet, 264 * 8),
                                                ("name", u32, 280 * 8)])
    # kind_flag set: offsets carry a bitfield size in the top 8 bits
    b.composite(KIND_STRUCT, "sk_buff", 200, [("bits", u16, (1 << 24) | 3), ("protocol", u16, 176 * 8)],
                bitfields=True)
    return Btf(b.blob())


def test_offsets_walk_embedded_members_typedefs_and_anonymous_unions(tiny_btf):
    assert tiny_btf.offsetof("net.ns.inum") == 20
    assert tiny_btf.offsetof("net_device.nd_net.net") == 264
    assert tiny_btf.offsetof("net_device.name") == 280
    assert tiny_btf.offsetof("dst_entry.dev") == 8
    assert tiny_btf.offsetof("sk_buff.protocol") == 176


def test_missing_struct_member_and_bitfield_are_errors(tiny_btf):
    with pytest.raises(EnvironmentProblem, match="no struct rtable"):
        tiny_btf.offsetof("rtable.rt_type")
    with pytest.raises(EnvironmentProblem, match="net_device has no member ifindex"):
        tiny_btf.offsetof("net_device.ifindex")
    with pytest.raises(EnvironmentProblem, match="bitfield"):
        tiny_btf.offsetof("sk_buff.bits")


def test_garbage_is_not_btf():
    with pytest.raises(EnvironmentProblem, match="bad magic"):
        Btf(b"\0" * 64)
    with pytest.raises(EnvironmentProblem, match="truncated"):
        Btf(b"\x9f\xeb")


def test_a_tracepoint_typedef_is_found_without_parsing_every_type(tmp_path):
    b = BtfBuilder()
    u32 = b.int("u32", 4)
    b.composite(KIND_STRUCT, "sk_buff", 8, [("len", u32, 0), ("dev", b.ptr(u32), 32)])
    b.typedef("not_btf_trace_net_dev_queue", u32)           # the name inside another: not it
    want = b.typedef("btf_trace_net_dev_queue", b.ptr(u32))
    blob = tmp_path / "vmlinux"
    blob.write_bytes(b.blob())
    typedef = "btf_trace_net_dev_queue"
    assert type_ids({typedef: KIND_TYPEDEF}, blob) == {typedef: want}
    assert want == Btf(b.blob()).by_name["typedef " + typedef]
    # Found by name and kind: a struct of that name would not be it, nor a name the blob lacks.
    assert type_ids({typedef: KIND_STRUCT, "btf_trace_fib_table_lookup": KIND_TYPEDEF}, blob) == {}
    assert type_ids({"sk_buff": KIND_STRUCT, typedef: KIND_TYPEDEF}, blob) == {
        "sk_buff": Btf(b.blob()).by_name["sk_buff"], typedef: want}
    blob.write_bytes(b"\0" * 64)
    with pytest.raises(EnvironmentProblem, match="bad magic"):
        type_ids({typedef: KIND_TYPEDEF}, blob)


@pytest.mark.skipif(not VMLINUX_BTF.exists(), reason="this kernel exposes no BTF")
def test_the_running_kernels_tracepoint_typedef_is_the_one_the_full_parse_finds():
    typedef = "btf_trace_net_dev_queue"
    assert type_ids({typedef: KIND_TYPEDEF})[typedef] == Btf.load().by_name["typedef " + typedef] > 0


@pytest.mark.skipif(not VMLINUX_BTF.exists(), reason="this kernel exposes no BTF")
def test_every_field_resolves_on_the_running_kernel():
    resolved = offsets.from_btf(Btf.load())
    assert [o.define for o in resolved] == list(offsets.FIELDS)
    assert all(o.value.isdigit() and o.source == "btf" for o in resolved)


@pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").exists() or
                    not Path("/proc/version").read_text().startswith("Linux version 6.18"),
                    reason="the table of known offsets is for 6.18")
def test_known_6_18_layout_from_kernel_notes():
    got = {o.path: int(o.value) for o in offsets.from_btf(Btf.load())}
    assert got["net_device.name"] == 280
    assert got["net_device.ifindex"] == 224
    assert (got["sk_buff.dev"], got["sk_buff.sk"], got["sk_buff._skb_refdst"]) == (16, 24, 88)
    assert got["sk_buff.network_header"] == 180
    assert got["rtable.rt_type"] == 144


def test_header_offsets_are_offsetof_expressions_and_flagged():
    hdr = offsets.from_headers()
    by_define = {o.define: o.value for o in hdr}
    assert by_define["OFF_NETDEV_NET"] == "offsetof(struct net_device, nd_net.net)"
    assert "-DOFFSETS_FROM_HEADERS=1" in offsets.cflags(hdr)


def test_resolve_prefers_btf_and_falls_back_to_matching_headers(tiny_btf, monkeypatch):
    monkeypatch.setattr(offsets, "FIELDS", {"OFF_NET_INUM": "net.ns.inum"})
    assert offsets.resolve(True, tiny_btf)[0].source == "btf"
    assert offsets.resolve(False, tiny_btf)[0].value == "20"
    assert offsets.resolve(True, None)[0].source == "headers"
    assert offsets.resolve(True, tiny_btf, "headers")[0].source == "headers"
    with pytest.raises(EnvironmentProblem, match="no BTF"):
        offsets.resolve(False, None)
    with pytest.raises(EnvironmentProblem, match="not the running kernel's"):
        offsets.resolve(False, tiny_btf, "headers")
    with pytest.raises(EnvironmentProblem, match="ROUTETRACE_OFFSETS=btf"):
        offsets.resolve(True, None, "btf")
