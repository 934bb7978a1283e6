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

    def __init__(self, plan: AttachPlan, headers_path: str | None = None, attach: bool = True):
        """attach=False loads every program through the verifier but attaches only the
        tracepoints (which bcc attaches on load): a check that a plan would load here."""
        self.plan = plan
        self.attach = attach
        self.headers_path = headers_path
        self._bpf = None
        self._pending: list[Flow] = []

    def __enter__(self) -> "Tracer":
        bcc = import_bcc()
        if self.headers_path:
            # Only this process: other bcc tools keep compiling against what they find.
            os.environ["BCC_KERNEL_SOURCE"] = str(self.headers_path)
        try:
            self._bpf = bcc.BPF(text=self.plan.program_text().encode(), cflags=self.plan.cflags)
            # TRACEPOINT_PROBE functions attach themselves on load; the rest by the plan.
            for a in self.plan.attachments:
                if a.kind != "tracepoint":
                    if self.attach:
                        self._attach(a)
                    else:
                        self._bpf.load_func(a.fn.encode(), bcc.BPF.KPROBE)
        except Exception as exc:  # bcc raises bare Exception on compile or attach failure
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None
            raise EnvironmentProblem(f"could not load the {self.plan.backend} BPF program: {exc}") from None
        flows = self._bpf[b"flows"]

        class NewFlowEvent(ctypes.Structure):   # struct new_flow_event in bpf/common.c
            _pack_ = 1                           # as bcc's own generated types: padding is explicit
            _fields_ = [("key", flows.Key), ("pad", ctypes.c_uint32), ("value", flows.Leaf),
                        ("xmit_dev", ctypes.c_char * 16)]

        self._event_type = NewFlowEvent
        self._bpf[b"new_flows"].open_ring_buffer(self._on_new_flow)
        return self

    def __exit__(self, *exc) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def _attach(self, a) -> None:
        if a.kind == "tracepoint":
            self._bpf.attach_tracepoint(tp=a.target.encode(), fn_name=a.fn.encode())
        elif a.kind == "kprobe":
            self._bpf.attach_kprobe(event=a.target.encode(), fn_name=a.fn.encode())
        elif a.kind == "kretprobe":
            self._bpf.attach_kretprobe(event=a.target.encode(), fn_name=a.fn.encode(),
                                       maxactive=a.maxactive)

    def _detach(self, a) -> None:
        if a.kind == "tracepoint":
            self._bpf.detach_tracepoint(tp=a.target.encode())
        elif a.kind == "kprobe":
            self._bpf.detach_kprobe(event=a.target.encode())
        elif a.kind == "kretprobe":
            self._bpf.detach_kretprobe(event=a.target.encode())

    def set_attached(self, attached: bool) -> None:
        """Detach or re-attach the probes without unloading (bench measures their cost this way)."""
        for a in self.plan.attachments:
            (self._attach if attached else self._detach)(a)

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
        for xk, xv in self._bpf[b"xmits"].items():
            devs = per_flow[bytes(xk.flow)]
            name = xv.dev.decode("ascii", "replace")
            devs[name] = devs.get(name, 0) + xv.packets
        return [decode_flow(k, v, per_flow.get(bytes(k), {}), self.plan.backend)
                for k, v in self._bpf[b"flows"].items()]

    def losses(self) -> LossCounters:
        stats = self._bpf[b"stats"]
        values = [stats[stats.Key(i)].value for i in range(3)]
        return LossCounters(events_dropped=values[0], flow_map_full=values[1], xmit_map_full=values[2],
                            probes_missed=self._kprobe_misses())

    def _kprobe_misses(self) -> int:
        """kretprobe instances that were not available (nmissed), from tracefs' kprobe_profile.
        bcc names its probe events "..._bcc_<pid>"."""
        if not any(a.kind in ("kprobe", "kretprobe") for a in self.plan.attachments):
            return 0
        from .kernel import find_tracefs
        tracefs = find_tracefs()
        try:
            text = (tracefs / "kprobe_profile").read_text() if tracefs else ""
        except OSError:
            return 0
        return missed_from_profile(text, os.getpid())


def missed_from_profile(text: str, pid: int) -> int:
    tag = f"_bcc_{pid}"
    total = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(tag) and parts[-1].isdigit():
            total += int(parts[-1])
    return total
