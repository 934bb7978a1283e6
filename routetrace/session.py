"""The live session, one for every command (watch, prove, bench --trace): attach, stream new
flows, drain the kernel's counts, fold past the table's limit, record. What bench measures is
what users run.

Time: counts reach user space when a flow map is drained -- every DRAIN_INTERVAL_S, or sooner
when the map in use is half full. New flows are streamed from the notice ring as they appear,
or, when a notice was lost, from the drain that finds them: every flow is streamed once.
"""
from __future__ import annotations

import gc
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from . import netns
from .events import (KEY_STRUCT, NOTICE_BYTES, VALUE_COUNTS_STRUCT, VALUE_STRUCT, Flow, LossCounters, decode_notices,
                     decode_unpacked, devices_of, flow_key_of)
from .flows import DEFAULT_KEEP_FLOWS, FlowTable, Verdict, classify, verdict
from .probes import AttachPlan
from .record import TraceWriter
from .ringbuf import records_in
from .tracer import Tracer

RECORD_INTERVAL_S = 1.0
GC_THRESHOLD = 50_000          # allocations between young-generation collections (CPython: 700)
DRAIN_INTERVAL_S = 0.5
PROCESS_BUDGET = 16384         # drained entries processed per pump before notices get a turn
BACKLOG_MAPS = 2               # drained entries that may wait unprocessed, in full maps (15 MB each)


def ring_notices(ring_pages: int) -> int:
    """New-flow notices the ring holds when full."""
    return records_in(ring_pages * 4096, NOTICE_BYTES)


class OwnAddresses:
    """Own addresses per network namespace, looked up once each; `on_learn` sees every lookup
    (the recorder writes it down, so a replay classifies exactly as the live run did)."""

    def __init__(self, on_learn: Callable[[int, set[str]], None] | None = None,
                 lookup: Callable[[int], set[str]] = netns.addresses):
        self._cache: dict[int, set[str]] = {}
        self._on_learn = on_learn
        self._lookup = lookup              # after a privilege drop: privileges.NetnsHelper.addresses

    def __call__(self, inode: int) -> set[str]:
        if inode not in self._cache:
            self._cache[inode] = self._lookup(inode)
            if self._on_learn:
                self._on_learn(inode, self._cache[inode])
        return self._cache[inode]


@dataclass
class TraceResult:
    flows: list[Flow]
    verdict: Verdict
    losses: LossCounters
    own: OwnAddresses = field(repr=False, default_factory=OwnAddresses)
    table: FlowTable | None = field(repr=False, default=None)
    recording_error: str | None = None
    programs: list = field(default_factory=list)   # tracer.ProgramStats of each BPF program


class Session:
    """A tracer plus what it has seen so far, optionally recorded to a file as it goes."""

    def __init__(self, plan: AttachPlan, headers_path, recorder: TraceWriter | None = None,
                 kernel_release: str = "", keep_flows: int | None = DEFAULT_KEEP_FLOWS,
                 addresses: Callable[[int], set[str]] = netns.addresses):
        self.plan, self.headers_path, self.recorder = plan, headers_path, recorder
        self.kernel_release = kernel_release or os.uname().release
        limits = plan.limits
        # Drained entries waiting to be processed (raw): at most this many before a kernel
        # drain waits for them.
        self._backlog: deque[tuple[bytes, bytes, int]] = deque()
        self._backlog_entries = 0
        self._backlog_limit = BACKLOG_MAPS * limits.max_flows
        # A flow's notice can be read (and the flow folded) up to three maps' worth of new flows,
        # a full ring and a full backlog before the entry that reports its counts is processed:
        # remember that many folds.
        self.table = FlowTable(keep_flows, remember_folds=(3 + BACKLOG_MAPS) * limits.max_flows
                               + ring_notices(limits.ring_pages))
        self.table.on_fold = self._folded if recorder else None     # only the recorder needs to hear of a fold
        self.own = OwnAddresses(self._learned if recorder else None, addresses)
        self._tracer: Tracer | None = None
        self._last_record = 0.0
        self._last_drain = 0.0
        self._dirty: dict = {}                # flows changed since last recorded (only when recording)
        self._losses = LossCounters()
        self.serve_metrics = False
        self._metrics: list = []
        self.on_loss: Callable[[LossCounters], None] | None = None
        # New flows, a batch at a time (a poll's notices, one drained chunk), each flow once.
        self.on_flows: Callable[[list[Flow]], None] | None = None

    # ---- recording ------------------------------------------------------------------------

    def _learned(self, inode: int, addresses: set[str]) -> None:
        self.recorder.netns(inode, netns.name_of(inode), addresses)

    def _folded(self, flow: Flow) -> None:
        if self.recorder:
            self._dirty.pop(flow.key, None)
            self.recorder.flows([flow])           # its last counts, then it leaves the table
            self.recorder.fold(flow.key)

    def _record(self, force: bool = False) -> None:
        if not self.recorder or not (force or time.monotonic() - self._last_record >= RECORD_INTERVAL_S):
            return
        self.recorder.flows(list(self._dirty.values()))
        self._dirty.clear()
        changed = self.table.take_changed_aggregates()
        if changed:
            self.recorder.aggregates(changed)
        self.recorder.flush()
        self._last_record = time.monotonic()

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "Session":
        self._tracer = Tracer(self.plan, self.headers_path).__enter__()
        # A storm makes and drops hundreds of thousands of acyclic flow records per second;
        # the collector's passes over them (and over everything bcc left from the compile)
        # were a third of the decode time. Collect less often, and never rescan what exists now.
        self._gc_threshold = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *self._gc_threshold[1:])
        if self.recorder:
            self.recorder.header(kernel=self.kernel_release, plan=self.plan.describe(),
                                 filters=self.plan.filters.describe(), start_ns=time.monotonic_ns(),
                                 keep_flows=self.table.limit)
        self._last_record = self._last_drain = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.recorder:
                self.recorder.close()
        finally:
            gc.set_threshold(*self._gc_threshold)
            gc.unfreeze()
            self._tracer.__exit__(*exc)

    def set_attached(self, attached: bool) -> None:
        """Probes off and on without unloading (bench's untraced slices)."""
        self._tracer.set_attached(attached)

    def program_stats(self):
        return self._tracer.program_stats()

    # ---- the loop -------------------------------------------------------------------------

    def _stream(self, flows: list[Flow]) -> int:
        """Hand new flows on (watch prints them) as soon as a batch is complete: a poll's notices
        or one drained chunk -- never a whole drain's worth at once."""
        if not flows:
            return 0
        for inode in {flow.netns for flow in flows}:
            self.own(inode)
        if self.on_flows:
            self.on_flows(flows)
        return len(flows)

    def _take_notices(self, timeout_ms: int) -> int:
        # Runs of raw ring records, decoded in bulk (one iter_unpack per run); a flow already
        # known (a second device's notice, a flow folded meanwhile) is not streamed again.
        notice, backend = self.table.notice, self.plan.backend
        new = []
        for records in self._tracer.poll(timeout_ms):
            for flow in decode_notices(records, backend):
                if notice(flow):
                    new.append(flow)
        if self.recorder:
            for flow in new:
                self._dirty[flow.key] = flow
        return self._stream(new)

    def _drain_kernel(self, final: bool = False) -> None:
        """Take the retired map's entries out of the kernel, every chunk, raw, into the backlog.
        The drain flips the maps as soon as the retired one is empty (tens of milliseconds for a
        full map): the map in use gets the whole interval to fill, instead of the interval
        minus the Python time the retired map's entries take -- in a storm that time let it
        overflow. Raw entries are 224 bytes: a full map waits as 15 MB, not as flow records."""
        now = time.monotonic_ns()
        for keys, values, count in self._tracer.drain(final=final):
            self._backlog.append((keys, values, now))
            self._backlog_entries += count
        self._last_drain = time.monotonic()

    def _process_backlog(self, budget: int | None = None) -> int:
        """Drained entries, oldest first, into the table (new flows streamed), chunk by chunk;
        stops after about `budget` entries (None: all). Returns the flows streamed."""
        streamed = 0
        while self._backlog and (budget is None or budget > 0):
            keys, values, now = self._backlog.popleft()
            count = len(keys) // KEY_STRUCT.size
            self._backlog_entries -= count
            streamed += self._process_chunk(keys, values, now)
            if budget is not None:
                budget -= count
        return streamed

    def _process_chunk(self, keys: bytes, values: bytes, now: int) -> int:
        table, recorder, backend = self.table, self.recorder, self.plan.backend
        add_counts, add_folded_counts = table.add_counts, table.add_folded_counts
        vsize = VALUE_STRUCT.size
        new = []
        for i, (raw_key, counts) in enumerate(zip(KEY_STRUCT.iter_unpack(keys), VALUE_COUNTS_STRUCT.iter_unpack(values))):
            key = flow_key_of(raw_key)
            if add_counts(key, raw_key[1], counts, now):
                if recorder:
                    self._dirty[key] = table.get(key)
                continue
            if add_folded_counts(key, raw_key[1], counts):
                continue
            part, continued = decode_unpacked(raw_key + VALUE_STRUCT.unpack_from(values, i * vsize), backend, key)
            flow = table.add(part, continued, now)
            if flow is not None:
                new.append(flow)
            if recorder and (current := table.get(key)) is not None:
                self._dirty[key] = current
        return self._stream(new)

    def _take_counts(self, final: bool = False) -> int:
        """Drain the kernel and process every drained entry now."""
        self._drain_kernel(final)
        return self._process_backlog()

    def pump(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for new flows and hand them to on_flows; returns how many.
        Drains the kernel's counts when due, reports loss when it grows, records once a second.
        Work is bounded per call (POLL_BUDGET notices, PROCESS_BUDGET drained entries), so a
        storm's notices, the kernel drain and the drained entries each get their turn."""
        new = self._take_notices(0 if self._backlog else timeout_ms)   # no sleeping while work waits
        due = time.monotonic() - self._last_drain >= DRAIN_INTERVAL_S
        if due or self._tracer.created_since_drain() >= self.plan.limits.max_flows // 2:
            if self._backlog_entries >= self._backlog_limit:
                # More than the backlog may hold: catch up before taking more out of the kernel
                # (the map in use may fill meanwhile: its packets are counted as lost).
                new += self._process_backlog()
            new += self._take_notices(0)
            self._drain_kernel()
            self._check_losses()
            if self.serve_metrics:
                self._snapshot_metrics()
        new += self._process_backlog(PROCESS_BUDGET)
        self._record()
        return new

    def _check_losses(self) -> None:
        losses = self._tracer.losses()
        if losses.total > self._losses.total:
            if self.on_loss:
                self.on_loss(losses)
            if self.recorder:
                self.recorder.loss(losses)
        self._losses = losses

    def losses(self) -> LossCounters:
        return self._losses

    def finish(self) -> TraceResult:
        """Collect the last notices and counts (new flows go to on_flows, before the summary);
        the trailer closes the recording."""
        self._take_notices(0)
        self._take_counts(final=True)
        self._take_notices(0)
        self._check_losses()               # a last loss line when it grew since the last one
        losses = self._losses
        flows = list(self.table)
        result = TraceResult(flows, verdict(flows, self.own, self.table.aggregates.values()), losses,
                             self.own, self.table, programs=self._tracer.program_stats())
        if self.recorder:
            self._record(force=True)
            self.recorder.trailer(losses, flows=self.table.seen, folded=self.table.folded)
            result.recording_error = self.recorder.error
        return result

    # ---- what a metrics endpoint reads (from its own thread: snapshots, made by the loop) ----

    METRIC_LABELS = ("netns", "family", "route_type", "route_dev", "xmit_dev", "dest_kind")

    def _snapshot_metrics(self) -> None:
        totals: dict[tuple, list[int]] = {}

        def add(labels: tuple, packets: int, flows: int) -> None:
            slot = totals.setdefault(labels, [0, 0])
            slot[0] += packets
            slot[1] += flows

        for f in self.table:
            kind = classify(f.daddr, self.own(f.netns))
            for d in devices_of(f):
                add((str(f.netns), str(f.family), f.route_type or "-", f.route_dev or "-", d["name"], kind),
                    d["packets"], 1)
        for a in self.table.aggregates.values():
            k = a.key
            add((str(k.netns), str(k.family), k.route_type, k.route_dev, k.dev, classify(k.daddr, self.own(k.netns))),
                a.packets, a.flows)
        self._metrics = [(dict(zip(self.METRIC_LABELS, labels)), p, n) for labels, (p, n) in totals.items()]

    def metric_totals(self):
        return list(self._metrics)

    def loss_totals(self) -> dict[str, int]:
        return {k: v for k, v in self._losses.to_dict().items() if isinstance(v, int)}
