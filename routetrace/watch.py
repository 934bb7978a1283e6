"""The live trace: attach, stream new flows, stop on Ctrl-C / SIGTERM / --duration, summarise."""
from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

from .probes import AttachPlan
from .record import TraceWriter
from .flows import DEFAULT_KEEP_FLOWS
from .render import (STREAM_HEADER, clock_offset_ns, json_line, loss_object, losses_line, stream_line,
                     summary_object, summary_text)
from .session import Session, TraceResult


class _Stop(Exception):
    pass


def _raise_stop(_signum, _frame):
    raise _Stop()


def watch(plan: AttachPlan, headers_path, *, as_json: bool = False, duration: float | None = None,
          record: str | None = None, force: bool = False, keep_flows: int | None = None,
          metrics: str | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> TraceResult:
    offset = clock_offset_ns()
    recorder = TraceWriter(record) if record else None
    previous = signal.getsignal(signal.SIGTERM)

    def emit(flow):
        print(json_line(flow.to_dict()) if as_json else stream_line(flow, offset), file=out, flush=True)

    def lost(losses):
        # Live, in the stream itself: the first loss and every growth are visible as they happen.
        print(json_line(loss_object(losses)) if as_json else f"LOST     {losses_line(losses)}", file=out, flush=True)

    try:
        with Session(plan, headers_path, recorder, keep_flows=keep_flows or DEFAULT_KEEP_FLOWS) as session:
            session.on_loss = lost
            print(f"Tracing route decisions ({plan.backend} plan, {plan.reasons[0]}; filters: {plan.filters.text()})... "
                  f"{'Hit Ctrl-C to end.' if duration is None else f'for {duration:g}s.'}",
                  file=err if as_json else out, flush=True)
            if not as_json:
                print(STREAM_HEADER, file=out, flush=True)
            deadline = None if duration is None else time.monotonic() + duration
            try:
                # From here SIGTERM ends the trace like Ctrl-C; before, it unwinds as an error would.
                signal.signal(signal.SIGTERM, _raise_stop)
                while deadline is None or time.monotonic() < deadline:
                    for flow in session.pump(200):
                        emit(flow)
            except (KeyboardInterrupt, _Stop):
                pass
            # A second Ctrl-C while finishing must not lose the summary or the trailer.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            result, late = session.finish()
            for flow in late:
                emit(flow)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if as_json:
        print(json_line(summary_object(result.flows, result.verdict, result.losses, result.table)), file=out, flush=True)
    else:
        print(summary_text(result.flows, result.verdict, result.losses, result.own, result.table), file=out, flush=True)
    return result
