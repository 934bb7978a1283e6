"""The only module that imports bcc. Loads an attach plan, turns what the kernel aggregated into
typed records, and detaches on exit. Everything downstream sees Flow and LossCounters only."""
from __future__ import annotations

import ctypes
import os
from collections import defaultdict

from .errors import EnvironmentProblem
from .events import Flow, LossCounters, decode_flow
from .probes import AttachPlan

BCC_MISSING = ("bcc (python3-bpfcc) is not importable from this Python: run scripts/setup, or "
               "apt install python3-bpfcc and use a venv made with /usr/bin/python3 --system-site-packages")


def import_bcc():
    try:
        import bcc  # noqa: PLC0415 - bcc is optional until something is traced
    except ImportError:
        raise EnvironmentProblem(BCC_MISSING) from None
    return bcc


class Tracer:
    """`with Tracer(plan, headers_path) as t:` attaches on enter and detaches on exit."""

    def __init__(self, plan: AttachPlan, headers_path: str | None = None):
        self.plan = plan
        self.headers_path = headers_path
        self._bpf = None
        self._pending: list[Flow] = []

    def __enter__(self) -> "Tracer":
        bcc = import_bcc()
        if self.headers_path:
            # Only this process: other bcc tools keep compiling against what they find.
            os.environ["BCC_KERNEL_SOURCE"] = str(self.headers_path)
        try:
            self._bpf = bcc.BPF(text=self.plan.program_text(), cflags=self.plan.cflags)
        except Exception as exc:  # bcc raises bare Exception on compile or attach failure
            raise EnvironmentProblem(f"could not load the {self.plan.backend} BPF program: {exc}") from None
        flows = self._bpf["flows"]

        class NewFlowEvent(ctypes.Structure):   # struct new_flow_event in bpf/common.c
            _pack_ = 1                           # as bcc's own generated types: padding is explicit
            _fields_ = [("key", flows.Key), ("pad", ctypes.c_uint32), ("value", flows.Leaf),
                        ("xmit_dev", ctypes.c_char * 16)]

        self._event_type = NewFlowEvent
        self._bpf["new_flows"].open_ring_buffer(self._on_new_flow)
        return self

    def __exit__(self, *exc) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def set_attached(self, attached: bool) -> None:
        """Detach or re-attach the probes without unloading (bench measures their cost this way)."""
        for kind, target in self.plan.attachments:
            if kind != "tracepoint":
                raise EnvironmentProblem(f"cannot toggle {kind} probes")
            if attached:
                category, event = target.split(":")
                self._bpf.attach_tracepoint(tp=target.encode(), fn_name=f"tracepoint__{category}__{event}".encode())
            else:
                self._bpf.detach_tracepoint(tp=target.encode())

    def _on_new_flow(self, _ctx, data, _size) -> None:
        ev = ctypes.cast(data, ctypes.POINTER(self._event_type)).contents
        first_dev = ev.xmit_dev.decode("ascii", "replace")
        # The notice carries the first packet's device; its counts follow in snapshot().
        self._pending.append(decode_flow(ev.key, ev.value, {first_dev: 1} if first_dev else {},
                                         self.plan.backend))

    def poll(self, timeout_ms: int = 200) -> list[Flow]:
        """New flows since the last call (their first packet already counted)."""
        self._bpf.ring_buffer_poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def snapshot(self) -> list[Flow]:
        """Every flow in the kernel's map, with per-device transmit counts."""
        per_flow: dict[bytes, dict[str, int]] = defaultdict(dict)
        for xk, xv in self._bpf["xmits"].items():
            devs = per_flow[bytes(xk.flow)]
            name = xv.dev.decode("ascii", "replace")
            devs[name] = devs.get(name, 0) + xv.packets
        return [decode_flow(k, v, per_flow.get(bytes(k), {}), self.plan.backend)
                for k, v in self._bpf["flows"].items()]

    def losses(self) -> LossCounters:
        stats = self._bpf["stats"]
        values = [stats[stats.Key(i)].value for i in range(3)]
        return LossCounters(events_dropped=values[0], flow_map_full=values[1], xmit_map_full=values[2])
