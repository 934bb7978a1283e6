"""The only module that imports bcc. Loads an attach plan, turns what the kernel counted into
typed records, and detaches on exit. Everything downstream sees Flow and LossCounters only.

Counting follows bpf/common.c: two flow maps alternate by epoch. `drain()` empties the map not
in use (lookup-and-delete in batches), then flips the epoch; the map just retired keeps taking
the increments of programs already running, and is drained one interval later.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from .errors import EnvironmentProblem
from . import ringbuf
from .events import KEY_STRUCT, NOTICE_BYTES, VALUE_STRUCT, LossCounters, add_cached_counts, cached_counts
from .probes import AttachPlan

BCC_MISSING = ("bcc (python3-bpfcc) is not importable from this Python: run scripts/setup, or "
               "apt install python3-bpfcc and use a venv made with /usr/bin/python3 --system-site-packages")

# The stable (append-only) layout of struct bpf_prog_info: where run time, runs and recursion misses sit.
_PROG_INFO_SIZE = 256
_RUN_TIME_NS, _RUN_CNT, _RECURSION_MISSES = 192, 200, 208

POLL_BUDGET = 4096
_RING_HEADER = bytes(ringbuf.HEADER_BYTES)
# Entries taken out of a flow map per batch call, and handed on before the next: bounds the
# memory a drain holds (a full map of 65,536 entries decoded at once was ~200 MB).
DRAIN_CHUNK = 4096

(STAT_EVENTS_DROPPED, STAT_LOST_PACKETS, STAT_LOST_BYTES, STAT_UNDECODED, STAT_CREATED_0, STAT_CREATED_1,
 STAT_ROUTE_UNPAIRED) = range(7)


def import_bcc():
    try:
        import bcc  # noqa: PLC0415 - bcc is optional until something is traced
    except ImportError:
        raise EnvironmentProblem(BCC_MISSING) from None
    return bcc


@dataclass(frozen=True)
class ProgramStats:
    """The kernel's own accounting of one BPF program (kernel.bpf_stats_enabled=1 for time)."""
    name: str
    run_time_ns: int
    run_cnt: int
    recursion_misses: int | None      # None: the kernel does not report it (before 5.12)

    @property
    def ns_per_run(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def program_info(fd: int) -> tuple[int, int, int | None]:
    """(run time ns, runs, recursion misses or None before 5.12) of a loaded program."""
    from .bpfsys import obj_info
    info = obj_info(fd, _PROG_INFO_SIZE)
    if info is None or len(info) < _RUN_CNT + 8:
        return 0, 0, None
    run_time, run_cnt = struct.unpack_from("=QQ", info, _RUN_TIME_NS)
    misses = struct.unpack_from("=Q", info, _RECURSION_MISSES)[0] if len(info) >= _RECURSION_MISSES + 8 else None
    return run_time, run_cnt, misses


class Tracer:
    """`with Tracer(plan, headers_path) as t:` attaches on enter and detaches on exit."""

    def __init__(self, plan: AttachPlan, headers_path: str | None = None, attach: bool = True):
        """attach=False loads every program through the verifier but attaches only the
        tracepoints (which bcc attaches on load): a check that a plan would load here."""
        self.plan = plan
        self.attach = attach
        self.headers_path = headers_path
        self._bpf = None
        self._pending: list[bytes] = []     # notice records read by libbpf (not x86-64)
        self._behind = False
        self._epoch = 0
        self._created_base = [0, 0]
        self._orphaned = [0, 0]                   # cached packets, bytes with no drained entry
        self._buffers = None
        self._btf_progs: dict[str, int] = {}     # BTF-typed tracepoint programs: fn -> program fd
        self._btf_links: dict[str, int] = {}     # ... and their attachments while attached
        self._reaper = None                       # privileges.ProbeEventReaper of this plan's tracefs events

    def __enter__(self) -> "Tracer":
        bcc = import_bcc()
        if self.headers_path:
            # Only this process: other bcc tools keep compiling against what they find.
            os.environ["BCC_KERNEL_SOURCE"] = str(self.headers_path)
        # Before anything is compiled or attached (the reaper is forked without them).
        self._reaper = self._start_reaper() if self.attach else None
        try:
            self._bpf = bcc.BPF(text=self.plan.program_text().encode(), cflags=self.plan.cflags)
            # (RAW_)TRACEPOINT_PROBE functions attach themselves on load; the rest by the plan.
            for i, a in enumerate(self.plan.attachments):
                if a.kind == "btf_tracepoint":
                    a = self._load_btf(i, a)           # loaded here (bcc cannot), or its fallback
                if not _attached_by_plan(a):
                    continue                           # bcc attached it on load
                if self.attach:
                    self._attach(a)
                elif a.kind != "btf_tracepoint":       # loaded through the verifier, not attached
                    self._bpf.load_func(a.fn.encode(), bcc.BPF.KPROBE if a.kind in ("kprobe", "kretprobe")
                                        else bcc.BPF.RAW_TRACEPOINT)
        except Exception as exc:  # bcc raises bare Exception on compile or attach failure
            self._close_btf()
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None
            self._remove_probe_events()
            if isinstance(exc, EnvironmentProblem):
                raise
            raise EnvironmentProblem(f"could not load the {self.plan.backend} BPF program: {exc}") from None
        if self._table(b"new_flows") is not None:
            self._notices = self._open_notices()
        # Opened now, read (from offset 0) at every loss check: still readable after the session
        # drops root, so the missed-probe counter keeps moving (tracefs is root's).
        self._profile_fd = None
        if any(a.kind in ("kprobe", "kretprobe") for a in self.plan.attachments):
            from .kernel import find_tracefs
            tracefs = find_tracefs()
            try:
                self._profile_fd = os.open(tracefs / "kprobe_profile", os.O_RDONLY | os.O_CLOEXEC) if tracefs else None
            except OSError:
                self._profile_fd = None
        return self

    def _load_btf(self, index: int, a):
        """Load a BTF-typed tracepoint program from bcc's compiled instructions (bcc cannot load
        this kind). If the kernel refuses it, the plan's fallback -- the same code on the raw
        tracepoint, compiled in the same unit -- takes its place, and the plan says why."""
        from .bpfsys import KFUNC_MARKS, link_kfunc_calls, load_btf_tracepoint
        from .btf import KIND_FUNC, KIND_TYPEDEF, type_ids
        try:
            # The tracepoint's id and those of the kfuncs the program calls, from one walk.
            typedef = "btf_trace_" + a.target
            ids = type_ids({typedef: KIND_TYPEDEF, **{name: KIND_FUNC for name in self.plan.kfuncs}})
            missing = [name for name in (typedef, *self.plan.kfuncs) if name not in ids]
            if missing:
                raise EnvironmentProblem(f"no {', '.join(missing)} in the kernel's BTF")
            from bcc.libbcc import lib
            insns = self._bpf.dump_func(a.fn.encode())
            if self.plan.kfuncs:
                insns = link_kfunc_calls(insns, {KFUNC_MARKS[name]: ids[name] for name in self.plan.kfuncs})
            self._btf_progs[a.fn] = load_btf_tracepoint(insns, a.fn, ids[typedef],
                                                        lib.bpf_module_license(self._bpf.module) or b"GPL")
            return a
        except EnvironmentProblem as exc:
            fallback = a.fallback
            if fallback is None:
                raise
            self.plan.attachments[index] = fallback
            self.plan.reasons.append(f"{exc}; {fallback.fn} on the raw tracepoint instead")
            return fallback

    def _close_btf(self) -> None:
        for fd in list(self._btf_links.values()) + list(self._btf_progs.values()):
            os.close(fd)
        self._btf_links.clear()
        self._btf_progs.clear()

    def _table(self, name: bytes):
        """A map of the plan, or None when the plan has none by that name (bench's floor)."""
        try:
            return self._bpf[name]
        except KeyError:
            return None

    def __exit__(self, *exc) -> None:
        if getattr(self, "_profile_fd", None) is not None:
            os.close(self._profile_fd)
            self._profile_fd = None
        self._close_btf()
        if getattr(self, "_notices", None) is not None:
            self._notices.close()            # the ring's mappings (they keep the map alive)
            self._notices = None
        if self._bpf is not None:
            if kprobe_pmu() or getattr(self, "_reaper", None) is not None:
                self._release_kprobes()
            self._bpf.cleanup()
            self._bpf = None
        self._remove_probe_events()

    # ---- tracefs probe events: removed however the process ends ---------------------------

    def _tracefs_event_names(self) -> list[str]:
        """GROUP/NAME of every kprobe event bcc may make for this plan through tracefs
        (bcc 0.26: every kretprobe given maxactive; any probe where the kprobe PMU is missing)."""
        tag = f"_bcc_{os.getpid()}"
        return sorted({f"kprobes/{'r' if a.kind == 'kretprobe' else 'p'}_"
                       f"{a.target.replace('+', '_').replace('.', '_')}{tag}"
                       for a in self.plan.attachments if a.kind in ("kprobe", "kretprobe")})

    def _start_reaper(self):
        """A kprobe_events line outlives the process that wrote it until it is removed, which
        needs root: watch has dropped it by the end, and a killed process removes nothing.
        privileges.ProbeEventReaper, forked now while root, removes this plan's events at the
        end or after this process died (SIGKILL included). None when there is nothing to remove
        or no right to (then bcc cannot make tracefs events either)."""
        names = self._tracefs_event_names()
        if not names:
            return None
        from .kernel import find_tracefs
        from .privileges import ProbeEventReaper
        tracefs = find_tracefs()
        events = tracefs / "kprobe_events" if tracefs else None
        if events is None or not os.access(events, os.W_OK):
            return None
        return ProbeEventReaper(str(events), names)

    def _remove_probe_events(self) -> None:
        """Ask the reaper to remove this plan's tracefs events (their perf events are closed by
        now); whatever it could not remove is named on stderr with the command that removes it."""
        reaper = getattr(self, "_reaper", None)
        if reaper is None:
            return
        self._reaper = None
        done = reaper.remove()
        reaper.close()
        if done["failed"]:
            import sys
            from .kernel import find_tracefs
            from .sanitize import text as safe_text
            where = find_tracefs() or "/sys/kernel/tracing"
            names = [f.split(":", 1)[0] for f in done["failed"]]
            print(safe_text(f"routetrace: could not remove tracefs probe events ({'; '.join(done['failed'])}); "
                            f"as root: " + " && ".join(f"echo '-:{n}' >> {where}/kprobe_events" for n in names)),
                  file=sys.stderr, flush=True)

    def _release_kprobes(self) -> None:
        """Detach the kprobes by closing their perf events: no privilege needed, so it works after
        watch dropped root (bcc's own detach reads root's tracefs kprobe_events). What that leaves
        in tracefs -- the kretprobes bcc made there -- the reaper removes (_remove_probe_events)."""
        from bcc.libbcc import lib
        for ev_name in list(self._bpf.kprobe_fds):
            for fd in self._bpf.kprobe_fds[ev_name].values():
                lib.bpf_close_perf_event_fd(fd)
            del self._bpf.kprobe_fds[ev_name]

    def _attach(self, a) -> None:
        if a.kind == "btf_tracepoint":
            from .bpfsys import attach_btf_tracepoint
            if a.fn not in self._btf_links:
                self._btf_links[a.fn] = attach_btf_tracepoint(self._btf_progs[a.fn])
        elif a.kind == "raw_tracepoint":
            self._bpf.attach_raw_tracepoint(tp=a.target.encode(), fn_name=a.fn.encode())
        elif a.kind == "tracepoint":
            self._bpf.attach_tracepoint(tp=a.target.encode(), fn_name=a.fn.encode())
        elif a.kind == "kprobe":
            self._bpf.attach_kprobe(event=a.target.encode(), fn_name=a.fn.encode())
        elif a.kind == "kretprobe":
            self._bpf.attach_kretprobe(event=a.target.encode(), fn_name=a.fn.encode(),
                                       maxactive=a.maxactive)

    def _detach(self, a) -> None:
        if a.kind == "btf_tracepoint":
            fd = self._btf_links.pop(a.fn, None)
            if fd is not None:
                os.close(fd)
        elif a.kind == "raw_tracepoint":
            self._bpf.detach_raw_tracepoint(tp=a.target.encode())
        elif a.kind == "tracepoint":
            self._bpf.detach_tracepoint(tp=a.target.encode())
        elif a.kind == "kprobe":
            self._bpf.detach_kprobe(event=a.target.encode())
        elif a.kind == "kretprobe":
            self._bpf.detach_kretprobe(event=a.target.encode())

    def set_attached(self, attached: bool) -> None:
        """Detach or re-attach the probes without unloading (bench measures their cost this way)."""
        for a in self.plan.attachments:
            (self._attach if attached else self._detach)(a)

    # ---- new flows, promptly ---------------------------------------------------------------

    def _open_notices(self) -> ringbuf.RingReader | None:
        """The new-flow ring, mapped and read by routetrace.ringbuf in runs of records; where
        that reader is not safe (see ringbuf.supported), libbpf's reader calling _on_new_flow."""
        ring = self._bpf[b"new_flows"]
        if ringbuf.supported():
            return ringbuf.RingReader.open(ring.map_fd, NOTICE_BYTES)
        ring.open_ring_buffer(self._on_new_flow)
        return None

    def _on_new_flow(self, _ctx, data, size) -> int:
        # The record as the ring holds it (a header in front: what events.decode_notices reads).
        self._pending.append(_RING_HEADER + ctypes.string_at(data, size))
        # libbpf keeps reading while the kernel keeps writing: past the budget, a negative return
        # ends this poll (the record is consumed and kept), so the caller gets to drain the maps.
        return -1 if len(self._pending) >= POLL_BUDGET else 0

    def poll(self, timeout_ms: int = 200) -> list[bytes]:
        """Notices of new flows since the last call, at most POLL_BUDGET, as runs of raw ring
        records (events.decode_notices; no counts: those come from drain())."""
        if self._table(b"new_flows") is None:
            return []
        reader = self._notices
        if reader is None:
            return self._poll_libbpf(timeout_ms)
        if not self._behind:
            # Stopped at the budget last time: records are waiting, and the kernel wakes a reader
            # only when it had caught up. Waiting in epoll now would sleep the whole timeout.
            reader.wait(timeout_ms)
        # Notices submitted without a wakeup (bpf/common.c limits them) are read here, at the
        # latest when the wait times out.
        chunks, count = reader.read(POLL_BUDGET)
        self._behind = count >= POLL_BUDGET
        return chunks

    def _poll_libbpf(self, timeout_ms: int) -> list[bytes]:
        if not self._behind:
            self._bpf.ring_buffer_poll(timeout_ms)
        if len(self._pending) < POLL_BUDGET:
            self._bpf.ring_buffer_consume()
        out, self._pending = self._pending, []
        self._behind = len(out) >= POLL_BUDGET
        return [b"".join(out)] if out else []

    # ---- counts, exactly -------------------------------------------------------------------

    def _stat(self, index: int) -> int:
        stats = self._bpf[b"stats"]
        return int(sum(stats[stats.Key(index)]))

    def created_since_drain(self) -> int:
        """Entries made in the map in use since it was last drained: a drain is due before it fills."""
        index = STAT_CREATED_1 if self._epoch else STAT_CREATED_0
        return self._stat(index) - self._created_base[self._epoch]

    def _drain_map(self, table):
        """Empty one flow map in chunks of at most DRAIN_CHUNK entries: yields (keys, values,
        count), the raw structs back to back, each chunk handed on before the next is taken
        out of the kernel -- a drain that finds a full map never holds it all in memory."""
        from bcc.libbcc import lib
        ksize, vsize = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        if (ksize, vsize) != (KEY_STRUCT.size, VALUE_STRUCT.size):
            raise EnvironmentProblem(f"flow map entry is {ksize}+{vsize} bytes, expected "
                                     f"{KEY_STRUCT.size}+{VALUE_STRUCT.size}: bpf/common.c and events.py disagree")
        if self._buffers is None:
            n = min(DRAIN_CHUNK, table.max_entries)
            self._buffers = (n, ctypes.create_string_buffer(n * ksize), ctypes.create_string_buffer(n * vsize))
        n, keys, values = self._buffers
        out_batch, count = ctypes.c_uint32(0), ctypes.c_uint32(0)
        in_batch = ctypes.c_uint32(0)
        first = True
        while True:
            count.value = n
            res = lib.bpf_lookup_and_delete_batch(
                table.map_fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
                keys, values, ctypes.byref(count))
            err = ctypes.get_errno()
            first = False
            if count.value:
                yield (ctypes.string_at(keys, count.value * ksize), ctypes.string_at(values, count.value * vsize),
                       count.value)
            if res != 0:
                # ENOENT: the walk reached the end (count said how many came with it).
                if err == errno.ENOENT:
                    return
                raise EnvironmentProblem(f"draining the flow map failed: {os.strerror(err)} "
                                         "(batch map operations need Linux 5.6 or later)")
            in_batch.value = out_batch.value

    def drain(self, final: bool = False):
        """Counts since the last drain, as chunks (keys, values, count) of raw flow_key and
        flow_value structs (decode them with events.iter_entries). Empties the map not in use,
        then flips to it. final=True also empties the other one (after a short grace for
        programs still running): nothing counted stays behind. A generator: each chunk is
        handed on (decoded, streamed, folded) before the next leaves the kernel."""
        import time
        yield from self._drain_one(1 - self._epoch)
        self._flip()
        if final:
            time.sleep(0.05)             # programs run for nanoseconds, preemption off
            yield from self._drain_one(1 - self._epoch)

    def _drain_one(self, epoch: int):
        table = self._bpf[b"flows1" if epoch else b"flows0"]
        # Everything made in that map until now is gone with the drain (read first: entries
        # made during the drain would only make the next drain come sooner).
        created = self._stat(STAT_CREATED_1 if epoch else STAT_CREATED_0)
        # The epoch is not in use: its cache slots are still, and their counts belong to
        # entries of this map.
        pending = self._take_cached(epoch)
        for keys, values, count in self._drain_map(table):
            yield keys, add_cached_counts(keys, values, count, pending), count
        for packets, nbytes, _segments, _fragments in pending.values():
            self._orphaned[0] += packets          # never expected (struct cached_flow): lost, not dropped
            self._orphaned[1] += nbytes
        self._created_base[epoch] = created

    def _take_cached(self, epoch: int) -> dict[bytes, list[int]]:
        """The counts in the per-CPU flow cache's slots of one epoch (summed by key), and the
        slots emptied."""
        cache = self._table(b"flow_cache")
        if cache is None:
            return {}
        slots = len(cache) // 2
        raw = []
        for i in range(epoch * slots, (epoch + 1) * slots):
            k = cache.Key(i)
            raw.append(bytes(cache.getvalue(k)))
            cache[k] = cache.Leaf()
        return cached_counts(b"".join(raw))

    def _flip(self) -> None:
        control = self._bpf[b"control"]
        self._epoch = 1 - self._epoch
        control[control.Key(0)] = control.Leaf(self._epoch)

    # ---- what was missed ---------------------------------------------------------------------

    def losses(self) -> LossCounters:
        stats = {name: 0 for name in ("xmit", "route", "fib")}
        for p in self.program_stats():
            if p.recursion_misses:
                stats[_program_role(p.name)] += p.recursion_misses
        missed = self._kprobe_misses()
        return LossCounters(
            events_dropped=self._stat(STAT_EVENTS_DROPPED),
            flow_map_full=self._stat(STAT_LOST_PACKETS) + self._orphaned[0],
            flow_map_full_bytes=self._stat(STAT_LOST_BYTES) + self._orphaned[1],
            undecoded=self._stat(STAT_UNDECODED),
            probes_missed=missed["route"] + stats["route"],
            xmit_missed=missed["xmit"] + stats["xmit"],
            fib_missed=stats["fib"],
            route_unpaired=self._stat(STAT_ROUTE_UNPAIRED),
            uncountable=tuple(self.plan.uncountable),
        )

    def program_stats(self) -> list[ProgramStats]:
        out, seen = [], set()
        for a in self.plan.attachments:
            if a.fn in seen:              # one program on two functions (route_entry): count it once
                continue
            seen.add(a.fn)
            # Not "if self._bpf": bcc's BPF object is falsy until one of its maps is opened.
            fn = self._bpf.funcs.get(a.fn.encode()) if self._bpf is not None else None
            fd = self._btf_progs.get(a.fn, fn.fd if fn is not None else None)
            if fd is None:
                continue
            run_time, run_cnt, misses = program_info(fd)
            out.append(ProgramStats(a.fn, run_time, run_cnt, misses))
        return out

    def _kprobe_misses(self) -> dict[str, int]:
        """kprobe/kretprobe instances that did not run (nmissed), from tracefs' kprobe_profile."""
        if not any(a.kind in ("kprobe", "kretprobe") for a in self.plan.attachments):
            return {"xmit": 0, "route": 0}
        if self._profile_fd is None:
            if not self.attach:
                return {"xmit": 0, "route": 0}      # loaded for the verifier only: nothing can miss
            raise EnvironmentProblem("cannot read kprobe_profile: missed kprobes would go uncounted")
        chunks, offset = [], 0
        while chunk := os.pread(self._profile_fd, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        text = b"".join(chunks).decode(errors="replace")
        xmit = {a.target for a in self.plan.attachments if a.fn == "xmit_entry"}
        return missed_by_role(text, os.getpid(), xmit)


KPROBE_PMU = "/sys/bus/event_source/devices/kprobe/type"


def _attached_by_plan(a) -> bool:
    """bcc attaches (RAW_)TRACEPOINT_PROBE functions (named tracepoint__*/raw_tracepoint__*) on
    load; every other function (kprobes, xmit_raw, the BTF-typed ones) the plan attaches itself."""
    if a.kind in ("kprobe", "kretprobe"):
        return True
    return not a.fn.startswith(("tracepoint__", "raw_tracepoint__"))


def kprobe_pmu() -> bool:
    """Kprobes are perf events of the kprobe PMU (not tracefs kprobe_events entries)."""
    return os.path.exists(KPROBE_PMU)


def _program_role(fn: str) -> str:
    if "fib" in fn:
        return "fib"
    return "route" if fn.startswith("route_") else "xmit"


def missed_by_role(text: str, pid: int, xmit_functions: set[str]) -> dict[str, int]:
    """bcc names its probe events "p_<function>_bcc_<pid>" / "r_<function>_bcc_<pid>"."""
    tag = f"_bcc_{pid}"
    out = {"xmit": 0, "route": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(tag) and parts[-1].isdigit():
            function = parts[0][2:-len(tag)]
            out["xmit" if function in xmit_functions else "route"] += int(parts[-1])
    return out

