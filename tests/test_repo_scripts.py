"""The scripts users and CI run: they parse, pass shellcheck, and the Vagrantfile validates."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file()) + [ROOT / ".ci" / "run"]


def _need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: scripts/test installs it")


def test_every_script_passes_shellcheck():
    _need("shellcheck")
    out = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_vagrantfile_validates_and_a_broken_one_does_not(tmp_path):
    _need("vagrant")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "VAGRANT_HOME": str(tmp_path / "vh"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot")}   # nothing written into the checkout
    ok = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT, capture_output=True,
                        text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "validated successfully" in ok.stdout
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "Vagrantfile").write_text((ROOT / "Vagrantfile").read_text().replace(
        'config.vm.box = "generic/ubuntu2204"', 'config.vm.box = nil\n  config.vm.no_such_option = 1'))
    bad = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=broken, capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0


def test_vagrant_provisions_with_the_same_setup_script():
    text = (ROOT / "Vagrantfile").read_text()
    provisioners = [line for line in text.splitlines() if "config.vm.provision" in line]
    assert provisioners == ['  config.vm.provision "shell", name: "routetrace setup", inline: "/vagrant/scripts/setup"']
    assert "apt" not in text.replace("adapt", "")


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.bpf
def test_vagrant_demo_runs_on_a_nic_address(sandbox):
    """The VM demo, run inside a namespace standing in for the VM: its NIC is eth0 =
    198.51.100.1 with a default route, so the demo's traffic stays in the namespace."""
    subprocess.run(["ip", "-n", sandbox.host, "route", "add", "default", "via", sandbox.peer_addr], check=True)
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", sandbox.host, str(ROOT / "scripts" / "vagrant-demo")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate(timeout=600)
    finally:   # the demo removes its peer namespace (named after its pid) itself, unless it was killed
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", f"rt-demo-peer-{proc.pid}"], capture_output=True)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert f"rt-demo-peer-{proc.pid}" not in _namespaces()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== NIC eth0 holds 198.51.100.1. The kernel's local table" in out.stdout
    assert "local 198.51.100.1 dev eth0 proto kernel scope host src 198.51.100.1" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("198.51.100.1 "))
    assert "LOCAL" in row and "eth0:0 lo:" in row and "ok:" in row
    control = next(line for line in out.stdout.splitlines() if line.startswith("198.51.100.66 "))
    assert "control" in control and "UNICAST" in control and "ok: left on rtdemo" in control
    _addr, _kind, _entry, fib_says, _rtype, route_dev, *_ = control.split()
    assert fib_says == route_dev      # the FIB answer of this namespace, not the peer's
    assert "the non-local control left on its real device" in out.stdout
    tail = out.stdout.strip().splitlines()[-1]
    assert tail.startswith("== tcpdump, port 8888, while that ran: eth0 0 packets, lo ")
    assert int(tail.split("lo ")[1].split()[0]) >= 10
