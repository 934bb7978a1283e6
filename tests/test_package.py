"""scripts/package: the wheel carries the BPF sources, the .deb installs a tool that runs on the
system Python with a man page and bash completion, and lintian finds no errors. (Installing what
was built and tracing through it is scripts/package-test, which needs root and changes the system.)"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BPF_SOURCES = sorted(p.name for p in (ROOT / "bpf").glob("*.c"))


def _need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: scripts/setup installs it")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    for tool in ("dpkg-deb", "lintian", "gzip"):
        _need(tool)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(ROOT / "scripts" / "package"), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lintian: no errors" in proc.stderr
    version = subprocess.run([sys.executable, "-c", "import routetrace; print(routetrace.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    wheel = out / f"routetrace-{version}-py3-none-any.whl"
    deb = out / f"routetrace_{version}_all.deb"
    assert wheel.is_file() and deb.is_file(), sorted(os.listdir(out))
    return wheel, deb, proc.stderr


def test_the_repository_keeps_bpf_at_the_top():
    assert {"common.c", "fib.c", "kprobe.c", "tracepoint.c"} <= set(BPF_SOURCES)
    from routetrace import probes
    assert probes.BPF_DIR == ROOT / "bpf"                     # the editable install maps it there


def test_wheel_carries_every_bpf_source(built):
    wheel, _deb, _log = built
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in BPF_SOURCES:
        assert f"routetrace/bpf/{source}" in names
    assert "routetrace/cli.py" in names and "routetrace/metrics.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "routetrace = routetrace.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_finds_its_bpf_sources_outside_the_checkout(built, tmp_path):
    wheel, _deb, _log = built
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import routetrace.probes as p; from routetrace.kernel import KernelFacts, Headers; "
            "print(p.BPF_DIR); print(len(p.AttachPlan('tracepoint', [p.BPF_DIR / 'common.c'], [], [], "
            "p.Filters()).program_text()))")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    where, size = out.stdout.split()
    assert where == str(site / "routetrace" / "bpf") and int(size) > 1000


def _deb_files(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].lstrip(".") : line.split()[0] for line in listing.splitlines()}


def test_deb_layout(built):
    _wheel, deb, _log = built
    files = _deb_files(deb)
    assert files["/usr/bin/routetrace"] == "-rwxr-xr-x"
    for source in BPF_SOURCES:
        assert f"/usr/lib/python3/dist-packages/routetrace/bpf/{source}" in files
    for path in ("/usr/share/man/man8/routetrace.8.gz", "/usr/share/bash-completion/completions/routetrace",
                 "/usr/share/doc/routetrace/copyright", "/usr/share/doc/routetrace/changelog.gz",
                 "/usr/share/doc/routetrace/examples/routetrace-rules.yml",
                 "/usr/share/doc/routetrace/examples/scrape-config.yml"):
        assert path in files
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in files)
    control = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Architecture", "Package"],
                             capture_output=True, text=True, check=True).stdout
    for dep in ("python3", "python3-bpfcc", "python3-click", "python3-tabulate", "iproute2",
                "python3-prometheus-client"):
        assert dep in control
    assert "Architecture: all" in control


def test_deb_launcher_man_page_and_completion_work(built, tmp_path):
    _wheel, deb, _log = built
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    launcher = (tmp_path / "usr/bin/routetrace").read_text()
    assert launcher.startswith("#!/usr/bin/python3\n")          # the system Python, no venv
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "usr/lib/python3/dist-packages"), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run(["/usr/bin/python3", str(tmp_path / "usr/bin/routetrace"), "watch", "--netns",
                          "/etc/passwd"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2 and "is not a network namespace" in out.stderr, out.stderr
    completion = subprocess.run(["/usr/bin/python3", str(tmp_path / "usr/bin/routetrace")], capture_output=True,
                                text=True, cwd=tmp_path, env=dict(env, _ROUTETRACE_COMPLETE="bash_complete",
                                                                  COMP_WORDS="routetrace watch --net", COMP_CWORD="2"))
    assert completion.stdout.strip() == "plain,--netns"
    _need("man")
    page = tmp_path / "usr/share/man/man8/routetrace.8.gz"
    rendered = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                              env=dict(os.environ, MANWIDTH="120", LC_ALL="C"))
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    text_only = re.sub(".\b", "", rendered.stdout)              # no overstrike bold/underline
    for text in ("routetrace watch [OPTIONS]", "-p, --pid PID", "-P, --port PORT", "-j, --json",
                 "--metrics [ADDR:]PORT", "EXIT STATUS", "routetrace doctor [OPTIONS]"):
        assert text in text_only, text
    assert "design card" not in text_only
