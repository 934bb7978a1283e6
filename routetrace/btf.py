"""Minimal reader for the kernel's BTF: enough to turn a field path into a byte offset.

bcc compiles against whatever headers it finds; on these machines those are not the
running kernel's, so every struct member the BPF code reads is located here instead.
Format: Documentation/bpf/btf.rst (header, type section, string section).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import EnvironmentProblem

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes of kind-specific data that follow each 12-byte btf_type record.
_FIXED_EXTRA = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_MEMBER_EXTRA = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8,
                     KIND_DATASEC: 12, KIND_ENUM64: 12}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    type_id: int          # referenced type (modifiers, pointers); size for struct/union
    members: tuple[Member, ...] = ()


class Btf:
    """Types of one BTF blob, indexed by id and (for structs/unions) by name."""

    def __init__(self, data: bytes):
        pos, end, strings = _sections(data)
        self.types: list[BtfType | None] = [None]   # id 0 is void
        self.by_name: dict[str, int] = {}
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kind_flag = info >> 31
            name = _cstr(strings, name_off)
            members: tuple[Member, ...] = ()
            if kind in (KIND_STRUCT, KIND_UNION):
                ms = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                    # With kind_flag set, the low 24 bits are the offset, the high 8 a bitfield size.
                    bit_off = m_off & 0xFFFFFF if kind_flag else m_off
                    ms.append(Member(_cstr(strings, m_name), m_type, bit_off))
                members = tuple(ms)
            pos += _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER_EXTRA.get(kind, 0) * vlen
            self.types.append(BtfType(kind, name, size_or_type, members))
            if kind in (KIND_STRUCT, KIND_UNION) and name and name not in self.by_name:
                self.by_name[name] = len(self.types) - 1
            elif kind == KIND_TYPEDEF and name and ("typedef " + name) not in self.by_name:
                self.by_name["typedef " + name] = len(self.types) - 1

    @classmethod
    def load(cls, path: Path = VMLINUX_BTF) -> "Btf":
        # Not kept: parsed, the kernel's BTF holds ~35 MB of Python objects. Callers take what
        # they need (offsets, a tracepoint's id) and let it go.
        return cls(_read(path))

    def _strip(self, type_id: int) -> int:
        while True:
            t = self.types[type_id]
            if t is None or t.kind not in _MODIFIERS:
                return type_id
            type_id = t.type_id

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type id) of `name` in a struct/union, looking through anonymous members."""
        t = self.types[self._strip(type_id)]
        if t is None or t.kind not in (KIND_STRUCT, KIND_UNION):
            return None
        for m in t.members:
            if m.name == name:
                return m.bit_offset, m.type_id
        for m in t.members:
            if not m.name:
                found = self._find_member(m.type_id, name)
                if found:
                    return m.bit_offset + found[0], found[1]
        return None

    def offsetof(self, path: str) -> int:
        """Byte offset of a dotted path such as "net_device.nd_net.net" (embedded members only)."""
        struct_name, *members = path.split(".")
        type_id = self.by_name.get(struct_name) or self.by_name.get("typedef " + struct_name)
        if type_id is None:
            raise EnvironmentProblem(f"BTF has no struct {struct_name}")
        bits = 0
        for name in members:
            found = self._find_member(type_id, name)
            if found is None:
                raise EnvironmentProblem(f"BTF: {struct_name} has no member {path.split('.', 1)[1]}")
            bits += found[0]
            type_id = found[1]
        if bits % 8:
            raise EnvironmentProblem(f"BTF: {path} is a bitfield, not byte addressable")
        return bits // 8


def _sections(data: bytes) -> tuple[int, int, bytes]:
    """Where a BTF blob's type records start and end, and its string section."""
    if len(data) < 24:
        raise EnvironmentProblem("BTF blob is truncated")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise EnvironmentProblem("not a BTF blob (bad magic)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    return hdr_len + type_off, hdr_len + type_off + type_len, data[hdr_len + str_off: hdr_len + str_off + str_len]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read BTF at {path}: {exc.strerror}") from exc


def _records(data: bytes):
    """(type id, offset, name offset, kind, vlen) of each type record, in order, without building
    any type: how the quick lookups below walk the kernel's BTF in milliseconds, where parsing it
    whole (Btf) takes a quarter of a second and ~35 MB."""
    pos, end, _ = _sections(data)
    header = struct.Struct("<III").unpack_from
    type_id = 0
    while pos < end:
        name_off, info, _ = header(data, pos)
        type_id += 1
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        yield type_id, pos, name_off, kind, vlen
        pos += 12 + _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER_EXTRA.get(kind, 0) * vlen


def _name_offset(data: bytes, name: str) -> int | None:
    """Where `name` starts in the blob's string section, or None when no string is exactly it."""
    at = _sections(data)[2].find(b"\0" + name.encode() + b"\0")
    return None if at < 0 else at + 1


def type_ids(wanted: dict[str, int], path: Path = VMLINUX_BTF) -> dict[str, int]:
    """The BTF ids of named types, each asked as name -> kind (KIND_STRUCT, KIND_FUNC, ...), in one
    walk: those found (the first of a name and kind), by name."""
    data = _read(path)
    by_offset = {off: (name, kind) for name, kind in wanted.items()
                 if (off := _name_offset(data, name)) is not None}
    found: dict[str, int] = {}
    for type_id, _pos, rec_name, kind, _vlen in _records(data):
        hit = by_offset.get(rec_name)
        if hit is not None and hit[1] == kind and hit[0] not in found:
            found[hit[0]] = type_id
            if len(found) == len(by_offset):
                break
    return found


def struct_has_member(struct_name: str, member: str, path: Path = VMLINUX_BTF) -> bool:
    """Whether the kernel's BTF has a struct of that name with a member of that name."""
    data = _read(path)
    struct_off, member_off = _name_offset(data, struct_name), _name_offset(data, member)
    if struct_off is None or member_off is None:
        return False
    member_name = struct.Struct("<I").unpack_from
    return any(kind == KIND_STRUCT and rec_name == struct_off
               and any(member_name(data, pos + 12 + 12 * i)[0] == member_off for i in range(vlen))
               for _id, pos, rec_name, kind, vlen in _records(data))


def _cstr(strings: bytes, off: int) -> str:
    end = strings.find(b"\0", off)
    return strings[off:end if end >= 0 else None].decode("ascii", "replace")
