"""Write routetrace's man page (roff) from the CLI's own click command tree, so the page says
exactly what `--help` says. Run with the routetrace to document importable:

    PYTHONPATH=STAGED_SITE_PACKAGES python3 packaging/manpage.py DATE > routetrace.8
"""
from __future__ import annotations

import sys

import click

SEE_ALSO = [("ip-route", 8), ("ip-netns", 8), ("tcpconnect-bpfcc", 8), ("tcpdump", 8)]


def esc(text: str) -> str:
    """Text for roff: backslashes, dashes (as ASCII hyphen-minus), and no control char at line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def paragraphs(text: str) -> str:
    """click help text -> roff: blank-line paragraphs; a paragraph after click's \\b stays as written."""
    out = []
    for para in text.strip().split("\n\n"):
        if para.startswith("\b"):
            body = para[1:].strip("\n")
            out += [".PP", ".nf", esc(body), ".fi"]
        else:
            out += [".PP", esc(" ".join(line.strip() for line in para.splitlines()))]
    return "\n".join(out)


def options(command: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):     # arguments are in the usage line
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        opts, help_text = record
        out += [".TP", f"\\fB{esc(opts)}\\fR", esc(" ".join(help_text.split())) if help_text else ""]
    return out


def usage(command: click.Command, ctx: click.Context) -> str:
    pieces = command.collect_usage_pieces(ctx)
    return f"\\fB{esc(ctx.command_path)}\\fR {esc(' '.join(pieces))}"


def render(cli: click.Group, version: str, date: str) -> str:
    root = click.Context(cli, info_name="routetrace", **cli.context_settings)
    summary = cli.help.strip().split("\n\n")[0].strip().rstrip(".")
    summary = summary[0].lower() + summary[1:]
    lines = [
        f'.TH ROUTETRACE 8 "{date}" "routetrace {esc(version)}" "System Administration"',
        ".SH NAME",
        f"routetrace \\- {esc(summary)}",
        ".SH SYNOPSIS",
        ".B routetrace",
        "[\\fB\\-\\-version\\fR] [\\fB\\-h\\fR|\\fB\\-\\-help\\fR]",
        ".br",
        ".B routetrace",
        "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        paragraphs("\n\n".join(cli.help.strip().split("\n\n")[1:]) or cli.help),
        ".SH COMMANDS",
    ]
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root)
        lines += [f".SS {esc(name)}", ".PP", usage(command, ctx)]
        if command.help:
            lines.append(paragraphs(command.help))
        lines += options(command, ctx)
    lines += [
        ".SH EXIT STATUS",
        ".TP", "\\fB0\\fR", "Success; for \\fBprove\\fR, the claim held.",
        ".TP", "\\fB1\\fR", "\\fBprove\\fR: the claim did not hold (the row and the reason are named).",
        ".TP", "\\fB2\\fR", "A usage or environment error, told in one line on standard error.",
        ".SH ENVIRONMENT",
        ".TP", "\\fBROUTETRACE_BACKEND\\fR", "Default for \\fB\\-\\-backend\\fR (auto, kprobe or tracepoint).",
        ".SH FILES",
        ".TP", "\\fI/run/netns/NAME\\fR", "Named network namespaces, as \\fB\\-\\-netns NAME\\fR finds them.",
        ".TP", "\\fI/var/cache/routetrace/kernel\\-headers\\fR",
        "Merged kernel header trees routetrace points bcc at when the running kernel has none of its own.",
        ".SH SEE ALSO",
        ",\n".join(f".BR {esc(name)} ({section})" for name, section in SEE_ALSO),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    from routetrace import __version__
    from routetrace.cli import cli
    date = sys.argv[1] if len(sys.argv) > 1 else "1970-01-01"
    sys.stdout.write(render(cli, __version__, date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
