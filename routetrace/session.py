"""The live session, one for every command (watch, prove, bench --trace): attach, drain the
kernel's maps, expire and aggregate flows, record. What bench measures is what users run."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from . import netns
from .events import Flow, LossCounters
from .flows import FlowTable, Verdict, verdict
from .probes import AttachPlan
from .record import TraceWriter
from .tracer import Tracer

RECORD_INTERVAL_S = 1.0


class OwnAddresses:
    """Own addresses per network namespace, looked up once each; `on_learn` sees every lookup
    (the recorder writes it down, so a replay classifies exactly as the live run did)."""

    def __init__(self, on_learn: Callable[[int, set[str]], None] | None = None):
        self._cache: dict[int, set[str]] = {}
        self._on_learn = on_learn

    def __call__(self, inode: int) -> set[str]:
        if inode not in self._cache:
            self._cache[inode] = netns.addresses(inode)
            if self._on_learn:
                self._on_learn(inode, self._cache[inode])
        return self._cache[inode]


@dataclass
class TraceResult:
    flows: list[Flow]
    verdict: Verdict
    losses: LossCounters
    own: OwnAddresses = field(repr=False, default_factory=OwnAddresses)


class Session:
    """A tracer plus what it has seen so far, optionally recorded to a file as it goes."""

    def __init__(self, plan: AttachPlan, headers_path, recorder: TraceWriter | None = None,
                 kernel_release: str = ""):
        self.plan, self.headers_path, self.recorder = plan, headers_path, recorder
        self.kernel_release = kernel_release or os.uname().release
        self.table = FlowTable()
        self.own = OwnAddresses(self._learned if recorder else None)
        self._tracer: Tracer | None = None
        self._last_record = 0.0

    def _learned(self, inode: int, addresses: set[str]) -> None:
        self.recorder.netns(inode, netns.name_of(inode), addresses)

    def __enter__(self) -> "Session":
        self._tracer = Tracer(self.plan, self.headers_path).__enter__()
        if self.recorder:
            self.recorder.header(kernel=self.kernel_release, plan=self.plan.describe(),
                                 filters=self.plan.filters.describe(), start_ns=time.monotonic_ns())
            self._last_record = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.recorder:
                self.recorder.flush()
                self.recorder.close()
        finally:
            self._tracer.__exit__(*exc)

    def pump(self, timeout_ms: int) -> list[Flow]:
        """Wait up to timeout_ms for new flows; returns them. Records changes once a second."""
        new = [f for f in self._tracer.poll(timeout_ms) if self.table.update(f)]
        for flow in new:
            self.own(flow.netns)
        if self.recorder:
            self.recorder.flows(new)
            if time.monotonic() - self._last_record >= RECORD_INTERVAL_S:
                self._refresh()
                self.recorder.flush()
                self._last_record = time.monotonic()
        return new

    def _refresh(self) -> None:
        current = self._tracer.snapshot()
        for flow in current:
            self.table.update(flow)
        if self.recorder:
            self.recorder.flows(current)      # it writes only the flows that changed

    def finish(self) -> TraceResult:
        """Collect the last notices and counters; the trailer closes the recording."""
        for flow in self._tracer.poll(0):
            self.table.update(flow)
        self._refresh()
        losses = self._tracer.losses()
        flows = list(self.table)
        result = TraceResult(flows, verdict(flows, self.own), losses, self.own)
        if self.recorder:
            self.recorder.trailer(losses)
        return result
