"""The live trace: attach, stream new flows, stop on Ctrl-C / SIGTERM / --duration, summarise."""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from . import netns
from .events import Flow, LossCounters
from .flows import FlowTable, Verdict, verdict
from .probes import AttachPlan
from .render import (STREAM_HEADER, clock_offset_ns, json_line, stream_line, summary_object,
                     summary_text)
from .tracer import Tracer


class OwnAddresses:
    """Own addresses per network namespace, looked up once each and on demand."""

    def __init__(self):
        self._cache: dict[int, set[str]] = {}

    def __call__(self, inode: int) -> set[str]:
        if inode not in self._cache:
            self._cache[inode] = netns.addresses(inode)
        return self._cache[inode]


@dataclass
class TraceResult:
    flows: list[Flow]
    verdict: Verdict
    losses: LossCounters
    own: OwnAddresses = field(repr=False, default_factory=OwnAddresses)


class _Stop(Exception):
    pass


def _raise_stop(_signum, _frame):
    raise _Stop()


def watch(plan: AttachPlan, headers_path, *, as_json: bool = False, duration: float | None = None,
          out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> TraceResult:
    table, own = FlowTable(), OwnAddresses()
    offset = clock_offset_ns()
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with Tracer(plan, headers_path) as tracer:
            filters = " ".join(f"{k}={v}" for k, v in plan.filters.describe().items()) or "none"
            print(f"Tracing route decisions ({plan.backend} plan, filters: {filters})... "
                  f"{'Hit Ctrl-C to end.' if duration is None else f'for {duration:g}s.'}",
                  file=err if as_json else out, flush=True)
            if not as_json:
                print(STREAM_HEADER, file=out, flush=True)
            deadline = None if duration is None else time.monotonic() + duration
            try:
                while deadline is None or time.monotonic() < deadline:
                    for flow in tracer.poll(200):
                        if table.update(flow):
                            print(json_line(flow.to_dict()) if as_json else stream_line(flow, offset),
                                  file=out, flush=True)
            except (KeyboardInterrupt, _Stop):
                pass
            for flow in tracer.poll(0):          # notices that arrived while stopping
                table.update(flow)
            for flow in tracer.snapshot():
                table.update(flow)
            losses = tracer.losses()
    finally:
        signal.signal(signal.SIGTERM, previous)
    flows = list(table)
    result = TraceResult(flows, verdict(flows, own), losses, own)
    if as_json:
        print(json_line(summary_object(result.flows, result.verdict, result.losses)), file=out, flush=True)
    else:
        print(summary_text(result.flows, result.verdict, result.losses, own), file=out, flush=True)
    return result
