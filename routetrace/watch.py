"""The live trace: attach, stream new flows, stop on Ctrl-C / SIGTERM / --duration, summarise."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import TextIO

from .probes import AttachPlan
from .record import TraceWriter
from . import metrics as metrics_mod
from . import netns, privileges
from .flows import DEFAULT_KEEP_FLOWS
from .render import (STREAM_HEADER, clock_offset_ns, json_line, live_flow_json_line, loss_object, losses_line, stream_line,
                     summary_object, summary_text, write_stream)
from .session import Session, TraceResult
from .tracer import kprobe_pmu


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def watch(plan: AttachPlan, headers_path, *, as_json: bool = False, duration: float | None = None,
          record: str | None = None, force: bool = False, keep_flows: int | None = None,
          metrics: str | None = None, drop_root: bool = True, out: TextIO = sys.stdout,
          err: TextIO = sys.stderr) -> TraceResult:
    offset = clock_offset_ns()
    recorder = TraceWriter(record, force=force) if record else None
    # Forked while root, before anything is loaded: looks up namespaces met after the drop.
    helper = privileges.NetnsHelper() if drop_root and os.geteuid() == 0 else None
    dropped = None
    previous = signal.getsignal(signal.SIGTERM)

    def write(text: str) -> None:
        write_stream(out, text)

    def emit(flows):
        # One write per batch: a storm of new flows must not cost a system call each.
        if flows:
            # The session's own flows: live_flow_json_line may skip the checks a file's flow needs.
            write("".join((live_flow_json_line(f) if as_json else stream_line(f, offset)) + "\n" for f in flows))

    def lost(losses):
        # Live, in the stream itself: the first loss and every growth are visible as they happen.
        write((json_line(loss_object(losses)) if as_json else f"LOST     {losses_line(losses)}") + "\n")

    try:
        with Session(plan, headers_path, recorder, keep_flows=keep_flows or DEFAULT_KEEP_FLOWS,
                     addresses=helper.addresses if helper else netns.addresses) as session, \
                metrics_mod.serving(metrics, session, info={"backend": plan.backend}) as server:
            if helper is not None:
                # Programs attached, maps and the recording open: the rest needs no root.
                if any(a.kind in ("kprobe", "kretprobe") for a in plan.attachments) and not kprobe_pmu():
                    dropped = {"dropped": False, "reason": "this kernel's kprobes live in tracefs' kprobe_events, "
                                                          "whose detach needs root"}
                else:
                    dropped = privileges.drop_privileges(privileges.capabilities_for_maps())
            session.on_loss = lost
            session.on_flows = emit
            session.serve_metrics = server is not None
            if server is not None:
                print(f"Serving metrics at {metrics_mod.url(server)}", file=err, flush=True)
            print(f"Tracing route decisions ({plan.backend} plan, {plan.reasons[0]}; filters: {plan.filters.text()})... "
                  f"{'Hit Ctrl-C to end.' if duration is None else f'for {duration:g}s.'}",
                  file=err if as_json else out, flush=True)
            if not as_json:
                print(STREAM_HEADER, file=out, flush=True)
            deadline = None if duration is None else time.monotonic() + duration
            # From here Ctrl-C and SIGTERM only ask the loop to stop: an exception raised in the
            # middle of a drain would lose counts already taken out of the kernel's map, or cut
            # a line of output in half. Before, they unwind as an error would.
            stop: list[int] = []
            for sig in STOP_SIGNALS:
                signal.signal(sig, lambda signum, _frame: stop.append(signum))
            while not stop and (deadline is None or time.monotonic() < deadline):
                session.pump(200)
            # A second Ctrl-C while finishing must not lose the summary or the trailer.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            result = session.finish()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if helper is not None:
            helper.close()
    if as_json:
        print(json_line(summary_object(result.flows, result.verdict, result.losses, result.table, result.programs)), file=out, flush=True)
    else:
        print(summary_text(result.flows, result.verdict, result.losses, result.own, result.table), file=out, flush=True)
    if dropped is not None:
        print(privileges.describe(dropped), file=err, flush=True)
    return result
