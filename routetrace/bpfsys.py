"""The bpf(2) calls routetrace makes itself: loading and attaching a BTF-typed tracepoint program
(tp_btf), which bcc does not do, and reading an object's info (a program's run statistics, a
map's type and size).

bcc compiles the program (and relocates its maps) but loads tracing programs only for the
attach types its function-name prefixes imply (fentry, fexit, LSM), never BPF_TRACE_RAW_TP. So
tracer.py takes the compiled instructions from bcc and loads them here, with the tracepoint's
BTF id (the `btf_trace_<name>` typedef in /sys/kernel/btf/vmlinux); attaching is
BPF_RAW_TRACEPOINT_OPEN without a name (the kernel takes the tracepoint from the program).
Only ctypes and the syscall: no bcc import here.
"""
from __future__ import annotations

import ctypes
import os
import platform
import struct

from .errors import EnvironmentProblem

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23
# union bpf_attr for BPF_PROG_LOAD, up to attach_btf_id and attach_prog_fd (5.5+):
# prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags,
# prog_name[16], prog_ifindex, expected_attach_type, prog_btf_fd, func_info_rec_size, func_info,
# func_info_cnt, line_info_rec_size, line_info, line_info_cnt, attach_btf_id, attach_prog_fd
_PROG_LOAD = struct.Struct("=IIQQIIQII16sIIIIQIIQIII")
_RAW_TP_OPEN = struct.Struct("=QII")         # name, prog_fd, pad
_OBJ_INFO = struct.Struct("=IIQ")            # bpf_fd, info_len, info
LOG_SIZE = 1 << 20
# r0 = 0; exit: what `btf_tracepoint_loads` asks the kernel to accept.
_RETURN_ZERO = bytes.fromhex("b700000000000000" "9500000000000000")
_INSN = struct.Struct("<BBhi")               # code, dst_reg | src_reg << 4, off, imm
BPF_CALL = 0x85
BPF_PSEUDO_KFUNC_CALL = 2
# bpf/common.c calls kfuncs through these helper numbers (no helper has them; bcc cannot emit a
# kfunc call), rewritten by link_kfunc_calls: -DKFUNC_RDONLY_CAST_MARK
KFUNC_MARKS = {"bpf_rdonly_cast": 0x7FF0}


def link_kfunc_calls(insns: bytes, kfunc_ids: dict[int, int]) -> bytes:
    """The program with each call to a marker helper number (kfunc_ids: marker -> the kfunc's id
    in vmlinux BTF) turned into a call of that kernel function."""
    out = bytearray(insns)
    for pos in range(0, len(out) - 7, 8):
        code, regs, off, imm = _INSN.unpack_from(out, pos)
        if code == BPF_CALL and regs == 0 and imm in kfunc_ids:
            _INSN.pack_into(out, pos, code, BPF_PSEUDO_KFUNC_CALL << 4, 0, kfunc_ids[imm])
    return bytes(out)


def _sys_bpf(cmd: int, attr: bytes) -> tuple[int, int, bytes]:
    """bpf(cmd, attr): its return value, errno, and the attr as the kernel left it."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = libc.syscall(SYS_BPF, cmd, buf, len(attr))
    return ret, ctypes.get_errno(), buf.raw


def obj_info(fd: int, size: int) -> bytes | None:
    """A BPF object's info (struct bpf_prog_info, bpf_map_info): as many of the first `size`
    bytes as this kernel knows (an older kernel's struct is shorter); None when the kernel
    refuses, or bpf(2) is unknown here."""
    if SYS_BPF is None:
        return None
    info = ctypes.create_string_buffer(size)
    ret, _err, attr = _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _OBJ_INFO.pack(fd, size, ctypes.addressof(info)))
    if ret != 0:
        return None
    return info.raw[:_OBJ_INFO.unpack(attr)[1]]


def load_btf_tracepoint(insns: bytes, name: str, btf_id: int, license: bytes = b"GPL",
                        with_log: bool = True) -> int:
    """Load a program for the BTF-typed tracepoint whose `btf_trace_*` typedef is btf_id. Returns
    the program's fd; raises EnvironmentProblem with the verifier's last words when refused."""
    if SYS_BPF is None:
        raise EnvironmentProblem(f"BTF-typed tracepoints: no bpf(2) number known for {platform.machine()}")
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    log = ctypes.create_string_buffer(LOG_SIZE if with_log else 1)
    attr = _PROG_LOAD.pack(BPF_PROG_TYPE_TRACING, len(insns) // 8, ctypes.addressof(code), ctypes.addressof(lic),
                           1 if with_log else 0, LOG_SIZE if with_log else 0,
                           ctypes.addressof(log) if with_log else 0, 0, 0,
                           name.encode()[:15], 0, BPF_TRACE_RAW_TP, 0, 0, 0, 0, 0, 0, 0, btf_id, 0)
    fd, err, _ = _sys_bpf(BPF_PROG_LOAD, attr)
    if fd < 0:
        tail = " / ".join(line for line in log.value.decode(errors="replace").splitlines()[-3:] if line)
        raise EnvironmentProblem(f"the kernel refused {name} as a BTF-typed tracepoint program: "
                                 f"{os.strerror(err)}" + (f" ({tail})" if tail else ""))
    return fd


def attach_btf_tracepoint(prog_fd: int) -> int:
    """Attach a loaded BTF-typed tracepoint program; the returned fd is the attachment (close it
    to detach)."""
    fd, err, _ = _sys_bpf(BPF_RAW_TRACEPOINT_OPEN, _RAW_TP_OPEN.pack(0, prog_fd, 0))
    if fd < 0:
        raise EnvironmentProblem(f"could not attach a BTF-typed tracepoint program: {os.strerror(err)}")
    return fd


def packet_cast_loads(btf_id: int, cast_id: int, struct_id: int) -> bool:
    """Whether this kernel takes bpf_rdonly_cast (kfunc id cast_id) in a BTF-typed tracepoint
    program and a load through its result (a struct_id pointer): what PACKET_CASTS needs."""
    insns = b"".join([
        _INSN.pack(0x79, 1 | 1 << 4, 0, 0),                  # r1 = ctx[0]
        _INSN.pack(0xB7, 2, 0, struct_id),                   # r2 = the struct's BTF id
        _INSN.pack(BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, cast_id),
        _INSN.pack(0x71, 0, 0, 0),                           # r0 = *(u8 *)(r0 + 0)
        _RETURN_ZERO,
    ])
    return btf_tracepoint_loads(btf_id, insns)


def btf_tracepoint_loads(btf_id: int, insns: bytes = _RETURN_ZERO) -> bool:
    """Whether this kernel accepts BTF-typed tracepoint programs (by default a trivial one, for
    btf_id) from this process: tracing programs need 5.5+, BTF, and privileges some machines
    withhold."""
    try:
        fd = load_btf_tracepoint(insns, "rt_probe", btf_id, with_log=False)
    except EnvironmentProblem:
        return False
    os.close(fd)
    return True
