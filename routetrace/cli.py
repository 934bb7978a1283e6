"""Command line: wires the commands to the modules. Every RoutetraceError becomes one line on
stderr and exit code 2, here and nowhere else."""
from __future__ import annotations

import ipaddress
import os
import signal
import sys

import click
from tabulate import tabulate

from . import __version__, kernel, netns, probes, sanitize
from .errors import EnvironmentProblem, RoutetraceError, UsageError
from .flows import DEFAULT_KEEP_FLOWS
from .record import EXIT_RECORDING_INCOMPLETE


def _port(_ctx, _param, value):
    if value is None:
        return None
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise UsageError(f"--port must be a number from 0 to 65535, not {value!r}")
    return int(value)


def _host(_ctx, _param, value):
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise UsageError(f"--host must be an IPv4 or IPv6 address, not {value!r}") from None


def _pid(_ctx, _param, value):
    if value is None:
        return None
    if not value.isdigit() or not os.path.exists(f"/proc/{value}"):
        raise UsageError(f"--pid {value!r} is not a running process")
    return int(value)


def _duration(_ctx, _param, value):
    if value is not None and value <= 0:
        raise UsageError(f"--duration must be positive, not {value:g}")
    return value


def _require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(f"routetrace {command} needs root to load BPF programs: run it with sudo")


def _family(ipv4: bool, ipv6: bool) -> int | None:
    if ipv4 and ipv6:
        raise UsageError("-4 and -6 exclude each other: give one of them, or neither for both families")
    return 4 if ipv4 else 6 if ipv6 else None


def _metrics(_ctx, _param, value):
    if value is None:
        return None
    from . import metrics
    metrics.parse_spec(value)              # a bad spec is a usage error before anything loads
    metrics.require_prometheus_client()
    return value


def build_filters(port, host, pid, netns_spec, family=None) -> probes.Filters:
    inode = None
    if netns_spec is not None:
        inode, _name = netns.resolve(netns_spec)
    if pid is not None and inode is not None:
        pid_ns = os.stat(f"/proc/{pid}/ns/net").st_ino
        if pid_ns != inode:
            raise UsageError(f"--pid {pid} is in network namespace {pid_ns}, not in --netns {netns_spec} ({inode})")
    return probes.Filters(port=port, host=host, pid=pid, netns=inode, family=family)


def kretprobe_maxactive_option():
    # The kernel takes 1 to 4096 (KRETPROBE_MAXACTIVE_MAX).
    return click.option("--kretprobe-maxactive", type=click.IntRange(1, 4096), default=probes.KRETPROBE_MAXACTIVE,
                        show_default=True, metavar="N",
                        help="Kprobe plan: calls of the route function that can be in progress at once; "
                             "past that its answers are missed and counted (probes_missed).")


def backend_option(help="Which probes to attach: kprobes on the routing and transmit functions, or "
                         "tracepoints (for kernels without kprobes); auto picks what this kernel has."):
    return click.option("--backend", type=click.Choice(probes.BACKENDS), default="auto", show_default=True,
                        envvar="ROUTETRACE_BACKEND", help=help)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="routetrace")
def cli():
    """See which device Linux routing picks for each connection, from inside the kernel.

    Connections to 127.0.0.1 and to the machine's own addresses both take a LOCAL route and
    leave on lo; routetrace shows that per flow (route type, route device, what the FIB
    answered, the device every packet was sent on) beside non-local traffic on its real device.

    Live commands (watch, prove, bench --trace) need root and bcc (python3-bpfcc); report and
    export read recorded traces without either. Mistakes print one line and exit 2.
    Run 'routetrace doctor' to see what this machine offers.
    """


@cli.command()
@click.option("--pid", "-p", callback=_pid, metavar="PID",
              help="Only flows started by this process (its PID, the thread group id).")
@click.option("--port", "-P", callback=_port, metavar="PORT", help="Only flows with this source or destination port.")
@click.option("--host", callback=_host, metavar="ADDR", help="Only flows with this source or destination address (IPv4 or IPv6).")
@click.option("-4", "--ipv4", "ipv4", is_flag=True, help="Only IPv4 flows.")
@click.option("-6", "--ipv6", "ipv6", is_flag=True, help="Only IPv6 flows.")
@click.option("--netns", "netns_spec", metavar="NAME|PATH|INODE",
              help="Only this network namespace: a name under /run/netns, a path such as /proc/PID/ns/net, "
                   "or its inode number. Its own addresses are the ones classified as own.")
@click.option("--json", "-j", "as_json", is_flag=True, help="JSON lines: one per new flow, then a summary.")
@click.option("--duration", "-d", type=float, callback=_duration, metavar="SECONDS", help="Stop after SECONDS.")
@click.option("--record", "-w", metavar="FILE", help="Also write the trace to FILE (JSON lines; read it with report).")
@click.option("--force", is_flag=True, help="Let --record replace an earlier routetrace file you own.")
@click.option("--metrics", "metrics_spec", metavar="[ADDR:]PORT", callback=_metrics,
              help="Serve Prometheus/OpenMetrics counters (packets and flows per route and device, losses) "
                   "over HTTP on PORT, at 127.0.0.1 unless ADDR is given.")
@backend_option()
@click.option("--max-flows", type=click.IntRange(16, 1 << 22), default=probes.Limits.max_flows, show_default=True,
              metavar="N", help="Kernel flow-map entries (two maps alternate): new flows per drain interval "
                                "before packets are counted as lost.")
@click.option("--keep-flows", type=click.IntRange(1, 1 << 24), default=DEFAULT_KEEP_FLOWS, show_default=True,
              metavar="N", help="Flows kept as rows; past this the least recently active are folded into "
                                "aggregates (their packets still counted).")
@click.option("--ring-pages", type=click.IntRange(1, 1 << 16), default=probes.Limits.ring_pages, show_default=True,
              metavar="N", help="Pages of the new-flow notice ring (a power of two); a full ring delays "
                                "streaming, never counting.")
@kretprobe_maxactive_option()
@click.option("--dry-run", is_flag=True, help="Print the attach plan and struct offsets; load nothing.")
def watch(pid, port, host, ipv4, ipv6, netns_spec, as_json, duration, record, force, metrics_spec, backend,
          max_flows, keep_flows, ring_pages, kretprobe_maxactive, dry_run):
    """Show the kernel's route decision for each new flow, live; summary and verdict at the end.

    One line per new flow (process, addresses, route type and device, the FIB's answer, the
    transmit device); on Ctrl-C, SIGTERM or after --duration, packets per device and the verdict.
    Short options follow bcc's tools: -p PID, -P PORT, -4/-6, -j.

    \b
    Examples:
      sudo routetrace watch -P 8888
      sudo routetrace watch --netns blue -j --duration 10
      sudo routetrace watch --metrics 9464          # scrape http://127.0.0.1:9464/metrics
    """
    from .watch import watch as run_watch
    if ring_pages & (ring_pages - 1):
        raise UsageError(f"--ring-pages must be a power of two, not {ring_pages}")
    filters = build_filters(port, host, pid, netns_spec, _family(ipv4, ipv6))
    limits = probes.Limits(max_flows=max_flows, ring_pages=ring_pages, kretprobe_maxactive=kretprobe_maxactive)
    if dry_run:
        facts = kernel.gather(prepare_headers=os.geteuid() == 0)
        plan = probes.choose(facts, filters, backend, limits)
        click.echo(plan.render(cannot_see=facts.limits(plan.backend).values()))
        return
    plan, headers = _prepare("watch", filters, backend, limits)
    result = run_watch(plan, headers, as_json=as_json, duration=duration, record=record, force=force,
                       keep_flows=keep_flows, metrics=metrics_spec)
    if result.recording_error:
        sys.exit(EXIT_RECORDING_INCOMPLETE)     # the trace ran; its copy on disk is incomplete


def _prepare(command: str, filters: probes.Filters, backend: str = "auto", limits: probes.Limits | None = None):
    """Everything a live trace needs, checked in the order a user can fix it."""
    from .tracer import import_bcc
    _require_root(command)
    import_bcc()
    kernel.mount_tracefs()
    facts = kernel.gather(prepare_headers=True)
    plan = probes.choose(facts, filters, backend, limits)
    # bcc finds the running kernel's own headers by itself; others it is pointed at.
    return plan, None if facts.headers.matches else facts.headers.path


def _addresses(_ctx, param, values):
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise UsageError(f"--{param.name} must be an IPv4 or IPv6 address, not {value!r}") from None
    return out


@cli.command()
@click.option("--port", "-P", callback=_port, default="8888", show_default=True, metavar="PORT",
              help="Port to connect to.")
@click.option("--sandbox", is_flag=True,
              help="Run in a throwaway namespace with eth0 = 198.51.100.1/24 and 2001:db8::1/64, and a peer "
                   "(198.51.100.2, 2001:db8::2) as the non-local control.")
@click.option("--to", "to", multiple=True, callback=_addresses, metavar="ADDR",
              help="Own address to test (repeatable); default: every IPv4 address on this host.")
@click.option("--control", multiple=True, callback=_addresses, metavar="ADDR",
              help="A non-local destination that must leave on a real device (with a listener on --port).")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True,
              help="Protocol of the test connections.")
@click.option("--closed", is_flag=True, help="Connect to a port nothing listens on: the SYN is answered by RST.")
@click.option("--scenarios", is_flag=True,
              help="With --sandbox: the cases where own-address traffic does not take lo (bound device, VRF, "
                   "container, AnyIP, policy rule, 127.0.0.2, secondary and down-device addresses), one row each.")
@click.option("--json", "-j", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--record", "-w", metavar="FILE", help="Also write the trace to FILE.")
@click.option("--force", is_flag=True, help="Let --record replace an existing regular file you own.")
@backend_option()
@kretprobe_maxactive_option()
def prove(port, sandbox, to, control, proto, closed, scenarios, as_json, record, force, backend, kretprobe_maxactive):
    """Connect to 127.0.0.1 and to own addresses while tracing: do both leave on lo?

    Exit status: 0 the claim held (--scenarios: every scenario did what the kernel's code
    documents), 1 it did not, 2 usage or environment error.
    """
    from . import prove as experiment_prove
    limits = probes.Limits(kretprobe_maxactive=kretprobe_maxactive)
    if scenarios:
        if not sandbox:
            raise UsageError("--scenarios builds its own namespaces: add --sandbox")
        if to or control or closed or proto != "tcp":
            raise UsageError("--scenarios chooses its own destinations and sockets: drop --to/--control/--closed/--proto")
        _require_root("prove")
        from . import scenarios as scenario_run
        sys.exit(scenario_run.experiment(lambda filters: _prepare("prove", filters, backend, limits), port=port,
                                         as_json=as_json, record=record, force=force))
    if closed and proto == "udp":
        raise UsageError("--closed goes with --proto tcp (a closed UDP port answers with ICMP, which has no port)")
    if sandbox and (to or control):
        raise UsageError("--sandbox chooses its own addresses: drop --to/--control")
    _require_root("prove")
    code = experiment_prove.experiment(lambda filters: _prepare("prove", filters, backend, limits), sandbox=sandbox,
                                       own=list(to), controls=list(control), port=port, proto=proto,
                                       closed=closed, record=record, as_json=as_json,
                                       **({"force": True} if force else {}))
    sys.exit(code)


@cli.command()
@click.option("--sandbox", is_flag=True,
              help="Measure inside a throwaway namespace (eth0 = 198.51.100.1 and 2001:db8::1).")
@click.option("--to", "to", multiple=True, callback=_addresses, metavar="ADDR",
              help="Own address to compare with 127.0.0.1 (IPv4) or ::1 (IPv6), one per family; default: the "
                   "first IPv4 and the first global IPv6 address on this host.")
@click.option("-4", "--ipv4", "ipv4", is_flag=True, help="Only the IPv4 comparison (127.0.0.1).")
@click.option("-6", "--ipv6", "ipv6", is_flag=True, help="Only the IPv6 comparison (::1).")
@click.option("--duration", "-d", type=float, default=1.0, show_default=True, callback=_duration,
              metavar="SECONDS", help="Seconds per measurement slice (sockperf and iperf3 round up to whole seconds).")
@click.option("--rounds", "-r", type=click.IntRange(2, 100), default=5, show_default=True, metavar="N",
              help="Interleaved rounds (each measures every target, mode and condition once).")
@click.option("--port", "-P", callback=_port, default="9100", show_default=True, metavar="PORT",
              help="Base port: PORT sockperf, +1 iperf3, +2 accept-close, +3 Python echo, +4 Python sink.")
@click.option("--mode", "modes", multiple=True, metavar="MODE",
              type=click.Choice(["tcp-rr", "udp-rr", "tcp-tp", "udp-tp", "tcp-bulk", "conn"]),
              help="Only these workloads (repeatable); default: all.")
@click.option("--load", type=click.Choice(["auto", "python"]), default="auto", show_default=True,
              help="auto: sockperf and iperf3 where installed, Python clients otherwise; python: Python only.")
@click.option("--pin", type=click.Choice(["same", "split", "none"]), default="same", show_default=True,
              help="taskset: client and servers on one CPU (same), on two (split), or unpinned (none).")
@click.option("--trace", "with_trace", is_flag=True,
              help="Also measure with routetrace's session attached and pumped, and the floor, and report the cost.")
@click.option("--no-floor", is_flag=True, help="With --trace: skip the one-increment floor programs.")
@click.option("--json", "as_json", is_flag=True, help="Every table as one JSON object.")
@click.option("--plot", metavar="FILE", help="Also draw latency CDFs and per-round rates to FILE (.png or .svg).")
@backend_option("Which probes --trace attaches.")
def bench(sandbox, to, ipv4, ipv6, duration, rounds, port, modes, load, pin, with_trace, no_floor, as_json, plot,
          backend):
    """Is 127.0.0.1 (::1) faster than an own IPv4 (IPv6) address? Latency, throughput and connection
    rate, with intervals; both families unless -4 or -6."""
    from . import bench as benchmark
    from . import loadgen
    if port > 65535 - (loadgen.PORTS_USED - 1):
        raise UsageError(f"--port needs PORT+{loadgen.PORTS_USED - 1} free as well: use at most {65535 - loadgen.PORTS_USED + 1}")
    family = _family(ipv4, ipv6)
    if sandbox and to:
        raise UsageError("--sandbox chooses its own addresses: drop --to")
    if to:
        benchmark.choose_comparisons(family, list(to), [], [])     # a bad --to fails before anything starts
    if plot and not plot.lower().endswith((".png", ".svg")):
        raise UsageError("--plot FILE must end in .png or .svg")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EnvironmentProblem("--plot needs matplotlib: apt install python3-matplotlib") from None
    if sandbox or with_trace:
        _require_root("bench")          # namespaces and probes both need it
    prepare = (lambda filters: _prepare("bench", filters, backend)) if with_trace else None
    benchmark.experiment(prepare, sandbox=sandbox, own=list(to), family=family, port=port,
                         rounds=rounds, seconds=duration, modes=modes or benchmark.MODES, load=load,
                         pin=pin, floor=not no_floor, as_json=as_json, plot=plot)


@cli.command()
@click.argument("trace_file", metavar="FILE")
def report(trace_file):
    """Summary and verdict of a recorded trace. Needs neither root nor bcc."""
    from .flows import verdict
    from .record import read_trace
    from .render import summary_text
    from .sanitize import text
    trace = read_trace(trace_file)
    h = trace.header
    click.echo(text(f"trace of {h.get('hostname', '?')} (kernel {h.get('kernel', '?')}), "
                    f"{h.get('plan', {}).get('backend', '?')} plan, started {h.get('start_time', '?')}, "
                    f"filters: {probes.filters_text(h['filters'])}"))
    if not trace.complete:
        click.echo(f"incomplete: no trailer, the recording was cut off; {len(trace.flows)} flows recorded until then"
                   + (" (a torn last line was dropped)" if trace.torn_last_line else ""))
    if trace.unknown_records:
        click.echo(text("skipped records of a newer format (minor " f"{h.get('minor')}): "
                        + ", ".join(f"{k} x{n}" for k, n in sorted(trace.unknown_records.items()))))
    # Folded flows (the live table's limit, or the reader's) count in the verdict through their aggregates.
    click.echo(summary_text(trace.flows, verdict(trace.flows, trace.own_addresses, trace.table.aggregates.values()),
                            trace.losses, trace.own_addresses, trace.table))


@cli.command()
@click.argument("trace_file", metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("-o", "--output", metavar="OUT", help="Write here instead of standard output (a new file).")
@click.option("--force", is_flag=True, help="Let -o replace an existing regular file you own.")
def export(trace_file, fmt, output, force):
    """Flows of a recorded trace as CSV (a row per flow and transmit device) or a JSON array."""
    import csv
    import json
    from .record import create_private, read_trace
    from .render import CSV_COLUMNS, csv_rows
    from .sanitize import csv_cell, text
    trace = read_trace(trace_file)
    if output is None:
        out = click.get_text_stream("stdout")
    else:
        def earlier_export(head: bytes) -> bool:          # what --force may replace
            if fmt == "csv":
                return head.startswith((",".join(CSV_COLUMNS) + "\n").encode())
            return head.startswith(b"[") and (head[1:].lstrip().startswith(b"]") or b'"type": "flow"' in head[:64])
        fd, _created = create_private(output, force, replaceable=earlier_export,
                                      what=f"an earlier routetrace {fmt} export")
        out = open(fd, "w", encoding="utf-8", errors="backslashreplace", newline="")
    try:
        # Streamed: each row or flow is written as it is produced, nothing is held back.
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for row in csv_rows(trace.flows):
                writer.writerow([csv_cell(cell) for cell in row])
        else:
            out.write("[")
            for i, flow in enumerate(trace.flows):
                body = json.dumps(flow.to_dict(), indent=2).replace("\n", "\n  ")
                out.write(("," if i else "") + "\n  " + body)
            out.write("\n]\n" if trace.flows else "]\n")
        out.flush()
    except OSError as exc:
        if output is None:
            raise
        raise UsageError(f"cannot write {text(output)}: {exc.strerror}") from None
    finally:
        if output is not None:
            try:
                out.close()
            except OSError:
                pass


@cli.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print the kernel facts as one JSON object (with the plan each backend gets, or why not).")
@backend_option(help="The plan to show (and what it cannot see here): the one watch would take with this "
                     "--backend.")
def doctor(as_json, backend):
    """What this machine offers for tracing, and the attach plan routetrace would use."""
    if os.geteuid() == 0:
        # As a trace would: `ip netns exec` remounts /sys without tracefs.
        try:
            kernel.mount_tracefs()
        except RoutetraceError:
            pass                          # reported below as "tracefs not mounted"
    facts = kernel.gather(prepare_headers=os.geteuid() == 0)
    if as_json:
        import json
        data = facts.to_dict()
        data["plans"] = {}
        for name in probes.BACKENDS:
            try:
                data["plans"][name] = probes.choose(facts, probes.Filters(), name).describe()
            except RoutetraceError as exc:
                data["plans"][name] = {"error": str(exc)}
        click.echo(json.dumps(data, sort_keys=True))
        return
    hdr = facts.headers
    rows = [
        ("kernel", facts.release, ""),
        ("root", "yes" if facts.is_root else "no", "" if facts.is_root else "tracing needs sudo"),
        ("BTF", "/sys/kernel/btf/vmlinux" if facts.btf else "missing", "struct offsets come from here"),
        ("tracefs", str(facts.tracefs or "not mounted"), "" if facts.tracefs else "mounted on demand as root"),
        ("kprobes", "yes" if facts.kprobes else "no", "" if facts.kprobes else "CONFIG_KPROBES off"),
        ("raw tracepoints", "yes" if facts.raw_tracepoints else "no", ""),
    ]
    rows += [(f"tracepoint {tp}", "yes" if ok else "no", "") for tp, ok in facts.tracepoints.items()]
    rows += [(f"symbol {s}", facts.symbols.get(s, "absent"), "") for s in kernel.SYMBOLS]
    rows.append(("transmit function", facts.xmit_function or "none", "for the kprobe plan"))
    rows.append(("headers", f"{hdr.path} ({hdr.release})" if hdr else "none",
                 ("matches the running kernel" if hdr.matches else "not the running kernel's: offsets from BTF")
                 if hdr else "install linux-headers (scripts/setup)"))
    bcc = facts.bcc_version        # found by importing it; where from: module path and Debian package
    rows.append(("bcc", bcc or "missing (import bcc fails)",
                 (bcc.origin() if hasattr(bcc, "origin") else "") if bcc else "apt install python3-bpfcc"))
    click.echo(tabulate(rows, headers=("CHECK", "FOUND", "NOTE")))
    problems = []
    if not facts.is_root:
        problems.append("run as root (sudo)")
    if not facts.bcc_version:
        problems.append("install bcc: scripts/setup (or apt install python3-bpfcc)")
    try:
        plan = probes.choose(facts, probes.Filters(), backend)
    except RoutetraceError as exc:
        problems.append(str(exc))
    else:
        click.echo("\n" + plan.render(cannot_see=facts.limits(plan.backend).values()))
    if problems:
        raise EnvironmentProblem("cannot trace here: " + "; ".join(problems))


def main(argv=None) -> int:
    # SIGTERM unwinds like Ctrl-C would: namespaces, listeners and recordings are closed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cli.main(args=argv, prog_name="routetrace", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except click.ClickException as exc:
        click.echo(f"routetrace: {sanitize.text(exc.format_message())}", err=True)
        return 2
    except click.exceptions.Abort:
        return 130
    except RoutetraceError as exc:
        # Messages quote what the user or the kernel gave (paths, names): shown, never obeyed.
        click.echo(f"routetrace: {sanitize.text(str(exc))}", err=True)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
