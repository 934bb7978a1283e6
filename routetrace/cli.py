"""Command line: wires the commands to the modules. Every RoutetraceError becomes one line on
stderr and exit code 2, here and nowhere else."""
from __future__ import annotations

import ipaddress
import os
import signal
import sys

import click
from tabulate import tabulate

from . import __version__, kernel, netns, probes
from .errors import EnvironmentProblem, RoutetraceError, UsageError


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
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise UsageError(f"--host must be an IPv4 address, not {value!r}") from None


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


def build_filters(port, host, pid, netns_spec) -> probes.Filters:
    inode = None
    if netns_spec is not None:
        inode, _name = netns.resolve(netns_spec)
    if pid is not None and inode is not None:
        pid_ns = os.stat(f"/proc/{pid}/ns/net").st_ino
        if pid_ns != inode:
            raise UsageError(f"--pid {pid} is in network namespace {pid_ns}, not in --netns {netns_spec} ({inode})")
    return probes.Filters(port=port, host=host, pid=pid, netns=inode)


def backend_option(help="Which probes: the design card's kprobes, or tracepoints for kernels without them."):
    return click.option("--backend", type=click.Choice(probes.BACKENDS), default="auto", show_default=True,
                        envvar="ROUTETRACE_BACKEND", help=help)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="routetrace")
def cli():
    """See which device the kernel's routing code picks for each local connection."""


@cli.command()
@click.option("--port", "-p", callback=_port, help="Only flows with this source or destination port.")
@click.option("--host", callback=_host, help="Only flows with this IPv4 source or destination address.")
@click.option("--pid", callback=_pid, help="Only flows started by this process (TGID).")
@click.option("--netns", "netns_spec", metavar="NAME|PATH|INODE",
              help="Only this network namespace; own addresses are taken from it.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per new flow, then a summary.")
@click.option("--duration", "-d", type=float, callback=_duration, help="Stop after SECONDS.")
@click.option("--record", "-w", metavar="FILE", help="Also write the trace to FILE (JSON lines, see README).")
@backend_option("kprobe: the design card's probes; tracepoint: for kernels without kprobes.")
@click.option("--dry-run", is_flag=True, help="Print the attach plan and offsets; load nothing.")
def watch(port, host, pid, netns_spec, as_json, duration, record, backend, dry_run):
    """Show the kernel's route decision for each new flow, live; summary and verdict at the end.

    \b
    Examples:
      sudo routetrace watch --port 8888
      sudo routetrace watch --netns blue --json --duration 10
    """
    from .watch import watch as run_watch
    filters = build_filters(port, host, pid, netns_spec)
    if dry_run:
        facts = kernel.gather(prepare_headers=os.geteuid() == 0)
        click.echo(probes.choose(facts, filters, backend).render())
        return
    plan, headers = _prepare("watch", filters, backend)
    run_watch(plan, headers, as_json=as_json, duration=duration, record=record)


def _prepare(command: str, filters: probes.Filters, backend: str = "auto"):
    """Everything a live trace needs, checked in the order a user can fix it."""
    from .tracer import import_bcc
    _require_root(command)
    import_bcc()
    kernel.mount_tracefs()
    facts = kernel.gather(prepare_headers=True)
    plan = probes.choose(facts, filters, backend)
    # bcc finds the running kernel's own headers by itself; others it is pointed at.
    return plan, None if facts.headers.matches else facts.headers.path


def _addresses(_ctx, param, values):
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.IPv4Address(value)))
        except ValueError:
            raise UsageError(f"--{param.name} must be an IPv4 address, not {value!r}") from None
    return out


@cli.command()
@click.option("--port", "-p", callback=_port, default="8888", show_default=True, help="Port to connect to.")
@click.option("--sandbox", is_flag=True,
              help="Run in a throwaway namespace with eth0 = 198.51.100.1/24 and a peer 198.51.100.2 as control.")
@click.option("--to", "to", multiple=True, callback=_addresses, metavar="ADDR",
              help="Own address to test (repeatable); default: every IPv4 address on this host.")
@click.option("--control", multiple=True, callback=_addresses, metavar="ADDR",
              help="A non-local destination that must leave on a real device (with a listener on --port).")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--closed", is_flag=True, help="Connect to a port nothing listens on: the SYN is answered by RST.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--record", "-w", metavar="FILE", help="Also write the trace to FILE.")
@backend_option()
def prove(port, sandbox, to, control, proto, closed, as_json, record, backend):
    """Connect to 127.0.0.1 and to own addresses while tracing: do both leave on lo?

    Exit status: 0 the claim held, 1 it did not, 2 usage or environment error.
    """
    from . import prove as experiment_prove
    if closed and proto == "udp":
        raise UsageError("--closed goes with --proto tcp (a closed UDP port answers with ICMP, which has no port)")
    if sandbox and (to or control):
        raise UsageError("--sandbox chooses its own addresses: drop --to/--control")
    _require_root("prove")
    code = experiment_prove.experiment(lambda filters: _prepare("prove", filters, backend), sandbox=sandbox,
                                       own=list(to), controls=list(control), port=port, proto=proto,
                                       closed=closed, record=record, as_json=as_json)
    sys.exit(code)


@cli.command()
@click.option("--sandbox", is_flag=True, help="Measure inside a throwaway namespace (eth0 = 198.51.100.1).")
@click.option("--to", "to", multiple=True, callback=_addresses, metavar="ADDR",
              help="Own address to compare with 127.0.0.1; default: the first IPv4 address on this host.")
@click.option("--duration", "-d", type=float, default=1.0, show_default=True, callback=_duration,
              help="Seconds per measurement slice (sockperf and iperf3 round up to whole seconds).")
@click.option("--rounds", "-r", type=click.IntRange(2, 100), default=5, show_default=True,
              help="Interleaved rounds (each measures every target, mode and condition once).")
@click.option("--port", "-p", callback=_port, default="9100", show_default=True,
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
def bench(sandbox, to, duration, rounds, port, modes, load, pin, with_trace, no_floor, as_json, plot, backend):
    """Is 127.0.0.1 faster than an own address? Latency, throughput and connection rate, with intervals."""
    from . import bench as benchmark
    from . import loadgen
    if port > 65535 - (loadgen.PORTS_USED - 1):
        raise UsageError(f"--port needs PORT+{loadgen.PORTS_USED - 1} free as well: use at most {65535 - loadgen.PORTS_USED + 1}")
    if sandbox and to:
        raise UsageError("--sandbox chooses its own addresses: drop --to")
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
    benchmark.experiment(prepare, sandbox=sandbox, own=to[0] if to else None, port=port,
                         rounds=rounds, seconds=duration, modes=modes or benchmark.MODES, load=load,
                         pin=pin, floor=not no_floor, as_json=as_json, plot=plot)


@cli.command()
@click.argument("trace_file", metavar="FILE")
def report(trace_file):
    """Summary and verdict of a recorded trace. Needs neither root nor bcc."""
    from .flows import verdict
    from .record import read_trace
    from .render import summary_text
    trace = read_trace(trace_file)
    h = trace.header
    click.echo(f"trace of {h.get('hostname', '?')} (kernel {h.get('kernel', '?')}), "
               f"{h.get('plan', {}).get('backend', '?')} plan, started {h.get('start_time', '?')}, "
               f"filters: {probes.filters_text(h['filters'])}")
    if not trace.complete:
        click.echo(f"incomplete: no trailer, the recording was cut off; {len(trace.flows)} flows recorded until then"
                   + (" (a torn last line was dropped)" if trace.torn_last_line else ""))
    click.echo(summary_text(trace.flows, verdict(trace.flows, trace.own_addresses), trace.losses,
                            trace.own_addresses))


@cli.command()
@click.argument("trace_file", metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("-o", "--output", metavar="OUT", help="Write here instead of standard output.")
def export(trace_file, fmt, output):
    """Flows of a recorded trace as CSV (a row per flow and transmit device) or a JSON array."""
    import csv
    import io
    import json
    from .record import read_trace
    from .render import CSV_COLUMNS, csv_rows
    trace = read_trace(trace_file)
    buf = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_rows(trace.flows))
    else:
        json.dump([f.to_dict() for f in trace.flows], buf, indent=2)
        buf.write("\n")
    if output is None:
        click.echo(buf.getvalue(), nl=False)
        return
    try:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None


@cli.command()
def doctor():
    """What this machine offers for tracing, and the attach plan routetrace would use."""
    facts = kernel.gather(prepare_headers=os.geteuid() == 0)
    hdr = facts.headers
    rows = [
        ("kernel", facts.release, ""),
        ("root", "yes" if facts.is_root else "no", "" if facts.is_root else "tracing needs sudo"),
        ("BTF", "/sys/kernel/btf/vmlinux" if facts.btf else "missing", "struct offsets come from here"),
        ("tracefs", str(facts.tracefs or "not mounted"), "" if facts.tracefs else "mounted on demand as root"),
        ("kprobes", "yes" if facts.kprobes else "no", "" if facts.kprobes else "CONFIG_KPROBES off"),
    ]
    rows += [(f"tracepoint {tp}", "yes" if ok else "no", "") for tp, ok in facts.tracepoints.items()]
    rows += [(f"symbol {s}", facts.symbols.get(s, "absent"), "") for s in kernel.SYMBOLS]
    rows.append(("transmit function", facts.xmit_function or "none", "for the kprobe plan"))
    rows.append(("headers", f"{hdr.path} ({hdr.release})" if hdr else "none",
                 ("matches the running kernel" if hdr.matches else "not the running kernel's: offsets from BTF")
                 if hdr else "install linux-headers (scripts/setup)"))
    rows.append(("bcc", facts.bcc_version or "missing", "" if facts.bcc_version else "apt install python3-bpfcc"))
    click.echo(tabulate(rows, headers=("CHECK", "FOUND", "NOTE")))
    problems = []
    if not facts.is_root:
        problems.append("run as root (sudo)")
    if not facts.bcc_version:
        problems.append("install bcc: scripts/setup (or apt install python3-bpfcc)")
    try:
        plan = probes.choose(facts, probes.Filters())
    except RoutetraceError as exc:
        problems.append(str(exc))
    else:
        click.echo("\n" + plan.render())
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
        click.echo(f"routetrace: {exc.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        return 130
    except RoutetraceError as exc:
        click.echo(f"routetrace: {exc}", err=True)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
