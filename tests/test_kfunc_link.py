"""bcc cannot emit a kfunc call: bpf/common.c calls a marker helper number and bpfsys rewrites
each such call into a call of the kernel function (BPF_PSEUDO_KFUNC_CALL, the function's BTF
id), leaving every other instruction as it was."""
import struct

from routetrace.bpfsys import BPF_CALL, BPF_PSEUDO_KFUNC_CALL, KFUNC_MARKS, link_kfunc_calls

INSN = struct.Struct("<BBhi")


def test_marker_calls_become_kfunc_calls_and_nothing_else_changes():
    mark = KFUNC_MARKS["bpf_rdonly_cast"]
    prog = [
        INSN.pack(0xB7, 2, 0, mark),              # r2 = mark: a constant, not a call
        INSN.pack(BPF_CALL, 0, 0, 6),             # a real helper (bpf_trace_printk)
        INSN.pack(BPF_CALL, 0, 0, mark),          # the marker
        INSN.pack(0x18, 1, 0, 0), INSN.pack(0, 0, 0, mark),   # a 16-byte ld_imm64 whose 2nd half holds the number
        INSN.pack(BPF_CALL, 1 << 4, 0, mark),     # a call to a subprogram (src_reg 1): not a helper call
        INSN.pack(BPF_CALL, 0, 0, mark),
        INSN.pack(0x95, 0, 0, 0),
    ]
    out = link_kfunc_calls(b"".join(prog), {mark: 65486})
    got = [INSN.unpack_from(out, i * 8) for i in range(len(prog))]
    linked = (BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, 65486)
    assert got[2] == linked and got[6] == linked
    for i in (0, 1, 3, 4, 5, 7):
        assert got[i] == INSN.unpack(prog[i]), i
    assert len(out) == len(b"".join(prog))
