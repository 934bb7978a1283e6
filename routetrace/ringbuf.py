"""A reader of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) that maps the ring itself.

bcc reads a ring through libbpf, which calls back into Python once per record (a ctypes
trampoline, a copy, a decode): in a storm of new flows that per-record cost was most of the
reader's time. Here the ring is read in runs: every notice has the same size, so a run of them
is one copy out of the ring and one `struct.iter_unpack` later (events.decode_notices).

The ring's layout and protocol (kernel/bpf/ringbuf.c, libbpf's src/ringbuf.c):
  - mmap offset 0, one page, read/write: the consumer position (u64), written only by us;
  - mmap offset PAGE_SIZE, read-only: one page holding the producer position (u64), then the
    data area of `size` bytes (a power of two) mapped twice in a row, so a record that wraps
    around the end reads as one contiguous span;
  - a record is an 8-byte header (u32 length with BUSY bit 31 and DISCARD bit 30, u32 page
    offset) and its data, padded to 8 bytes; positions grow forever, `pos & (size - 1)` is the
    offset in the data area.
  A producer reserves (header written BUSY, producer position advanced), copies, then commits
  (header rewritten without BUSY, a full barrier). The reader reads the producer position, then
  headers up to the first BUSY one, then the data, and only then stores the consumer position:
  the kernel may overwrite what lies behind it.

Memory order: on x86 (TSO) loads are not reordered with other loads, nor stores with earlier
loads, so the order of the Python statements is the order the CPU performs them (libbpf's
smp_load_acquire / smp_store_release compile to plain moves there). Python has no barriers, so
`supported()` is true on x86-64 only; elsewhere tracer.py keeps libbpf's reader.

No bcc here (only tracer.py imports bcc): the tracer hands over the map's file descriptor.
"""
from __future__ import annotations

import mmap
import platform
import select
import struct

from .errors import EnvironmentProblem

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_BYTES = 8
BPF_MAP_TYPE_RINGBUF = 27

# struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags (u32 each), ...
_MAP_INFO = struct.Struct("=IIIIII")


def supported() -> bool:
    """Whether this reader is safe here: x86-64's memory order makes plain loads and stores
    acquire and release (see the module's docstring)."""
    return platform.machine() == "x86_64"


def record_stride(sample_bytes: int) -> int:
    """Bytes a record of `sample_bytes` takes in the ring: header and data, padded to 8."""
    return (sample_bytes + HEADER_BYTES + 7) // 8 * 8


def records_in(data_bytes: int, sample_bytes: int) -> int:
    """How many records of `sample_bytes` a ring of `data_bytes` holds when full."""
    return data_bytes // record_stride(sample_bytes)


def map_info(fd: int) -> tuple[int, int]:
    """(map type, max_entries) of a BPF map, from bpf(BPF_OBJ_GET_INFO_BY_FD)."""
    from .bpfsys import obj_info
    info = obj_info(fd, _MAP_INFO.size)
    if info is None or len(info) < _MAP_INFO.size:
        raise EnvironmentProblem(f"cannot read the ring buffer map's info (fd {fd})")
    map_type, _id, _key, _value, max_entries, _flags = _MAP_INFO.unpack_from(info)
    return map_type, max_entries


class RingReader:
    """Reads fixed-size records (`sample_bytes` each) from one BPF ring buffer, in runs.

    `read(budget)` returns the records' bytes, each with its 8-byte ring header in front
    (stride `record_stride(sample_bytes)`): decode them with a struct that skips 8 bytes.
    Built over any buffers laid out as the kernel lays them out: `open(fd)` maps a real ring,
    MemoryRing below makes one in memory (tests, the benchmark)."""

    def __init__(self, consumer, producer, data_bytes: int, sample_bytes: int, fd: int | None = None,
                 closers=()):
        if data_bytes <= 0 or data_bytes & (data_bytes - 1):
            raise EnvironmentProblem(f"ring buffer of {data_bytes} bytes: not a power of two")
        page = len(consumer)
        self.sample_bytes = sample_bytes
        self.stride = record_stride(sample_bytes)
        self._expected = sample_bytes            # a committed, kept record's header length
        self._mask = data_bytes - 1
        self._data_bytes = data_bytes
        self._cons_pos = memoryview(consumer).cast("B").cast("Q")      # [0]: aligned 8-byte access
        producer_view = memoryview(producer).cast("B")
        self._prod_pos = producer_view[:8].cast("Q")
        # The data area, twice (positions are offsets into its first copy).
        self._data = producer_view[page:page + 2 * data_bytes]
        self._headers = self._data.cast("I")
        self._epoll = None
        if fd is not None:
            self._epoll = select.epoll()
            self._epoll.register(fd, select.EPOLLIN)
        self._closers = list(closers)

    @classmethod
    def open(cls, fd: int, sample_bytes: int) -> "RingReader":
        """Map the ring behind a BPF_MAP_TYPE_RINGBUF file descriptor (the caller keeps the fd
        open; mmap holds its own reference to the map)."""
        map_type, data_bytes = map_info(fd)
        if map_type != BPF_MAP_TYPE_RINGBUF:
            raise EnvironmentProblem(f"map type {map_type} is not a ring buffer")
        page = mmap.PAGESIZE
        consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            producer = mmap.mmap(fd, page + 2 * data_bytes, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            consumer.close()
            raise
        return cls(consumer, producer, data_bytes, sample_bytes, fd=fd, closers=(consumer, producer))

    def close(self) -> None:
        # Views first: an mmap with exported buffers refuses to close.
        for view in ("_headers", "_data", "_prod_pos", "_cons_pos"):
            getattr(self, view).release()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for m in self._closers:
            m.close()
        self._closers = []

    def __enter__(self) -> "RingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------

    def pending_bytes(self) -> int:
        """Bytes between the consumer and producer positions (records not yet read, committed or not)."""
        return self._prod_pos[0] - self._cons_pos[0]

    def wait(self, timeout_ms: int) -> bool:
        """Sleep until the kernel signals new data (a submit with a wakeup) or timeout_ms pass.
        True when woken. Notices submitted without a wakeup are there to read either way."""
        if self._epoll is None:
            return self.pending_bytes() > 0
        return bool(self._epoll.poll(max(timeout_ms, 0) / 1000))

    def read(self, budget: int) -> tuple[list[bytes], int]:
        """Up to `budget` committed records, oldest first: (chunks of records back to back,
        how many). Stops at the first record still being written (BUSY): the ones behind it
        wait for the next read. Discarded records are skipped. Each run is copied out of the
        ring before the consumer position moves past it."""
        chunks: list[bytes] = []
        count = 0
        stride, expected, mask = self.stride, self._expected, self._mask
        cons_view, headers, data = self._cons_pos, self._headers, self._data
        cons = cons_view[0]
        prod = self._prod_pos[0]
        while count < budget:
            avail = prod - cons
            if avail <= 0:
                # Caught up with what the producer position said: look once more (libbpf does).
                prod = self._prod_pos[0]
                if prod == cons:
                    break
                continue
            off = cons & mask
            n = min(avail // stride, budget - count)
            if n:
                # All headers of the run in one slice; a header other than "committed, kept,
                # our size" ends it (read before any data: x86 keeps loads in order).
                lengths = headers[off >> 2:(off + n * stride) >> 2:stride >> 2].tolist()
                if lengths.count(expected) != n:
                    n = next(i for i, length in enumerate(lengths) if length != expected)
                if n:
                    end = off + n * stride
                    chunks.append(data[off:end].tobytes())
                    cons += n * stride
                    cons_view[0] = cons            # after the copy: the kernel may reuse it now
                    count += n
                    continue
            length = headers[off >> 2]
            if length == expected:
                continue                          # committed since the run's headers were read
            if length & BUSY_BIT:
                break                             # not committed yet; nor may we pass it
            if length & DISCARD_BIT:
                cons += record_stride(length & ~(BUSY_BIT | DISCARD_BIT))
                cons_view[0] = cons
                continue
            raise EnvironmentProblem(f"ring buffer record of {length} bytes, expected {expected}: "
                                     "bpf/common.c and events.py disagree on struct new_flow_event")
        return chunks, count


class MemoryRing:
    """The kernel's side of a ring, in ordinary memory, for tests and the benchmark: the same
    layout (consumer page; producer page, then the data area twice) and the same protocol
    (reserve writes a BUSY header and advances the producer; commit clears BUSY)."""

    def __init__(self, data_bytes: int, page: int = mmap.PAGESIZE):
        self.page, self.size = page, data_bytes
        self.consumer = bytearray(page)
        self.producer = bytearray(page + 2 * data_bytes)
        self._prod = memoryview(self.producer).cast("Q")
        self._cons = memoryview(self.consumer).cast("Q")

    def reader(self, sample_bytes: int) -> RingReader:
        return RingReader(self.consumer, self.producer, self.size, sample_bytes)

    def free_bytes(self) -> int:
        return self.size - (self._prod[0] - self._cons[0])

    def _write(self, pos: int, data: bytes) -> None:
        # Both copies of the data area: what the kernel's double mapping shows.
        off = pos & (self.size - 1)
        first = min(len(data), self.size - off)          # up to the end of the ring; the rest wraps
        for start, part in ((off, data[:first]), (0, data[first:])):
            for base in (self.page + start, self.page + start + self.size):
                self.producer[base:base + len(part)] = part

    def reserve(self, sample: bytes) -> int | None:
        """Reserve room for a sample and copy it in, header still BUSY; its position, or None
        when the ring is full (the kernel's bpf_ringbuf_reserve returns NULL: a dropped notice)."""
        stride = record_stride(len(sample))
        if stride > self.free_bytes():
            return None
        pos = self._prod[0]
        self._write(pos, struct.pack("=II", len(sample) | BUSY_BIT, 0) + sample.ljust(stride - HEADER_BYTES, b"\0"))
        self._prod[0] = pos + stride
        return pos

    def commit(self, pos: int, discard: bool = False) -> None:
        length = struct.unpack_from("=I", self.producer, self.page + (pos & (self.size - 1)))[0] & ~BUSY_BIT
        self._write(pos, struct.pack("=I", length | (DISCARD_BIT if discard else 0)))

    def output(self, sample: bytes) -> bool:
        """bpf_ringbuf_output: reserve, copy and commit; False when the ring was full."""
        pos = self.reserve(sample)
        if pos is None:
            return False
        self.commit(pos)
        return True
