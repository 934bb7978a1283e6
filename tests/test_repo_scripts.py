"""The scripts users and CI run: they parse, pass shellcheck, the Vagrantfile validates, apt
calls wait for a busy dpkg, and the VM demo installs nothing where it runs.
The demo in a real VM is scripts/vagrant-test's (run by scripts/test)."""
import os
import shutil
import subprocess
import time
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
        'config.vm.box = "debian/bookworm64"', 'config.vm.box = nil\n  config.vm.no_such_option = 1'))
    bad = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=broken, capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0


def test_vagrant_provisions_with_the_same_setup_script():
    text = (ROOT / "Vagrantfile").read_text()
    provisioners = [line for line in text.splitlines() if "config.vm.provision" in line]
    assert provisioners == ['  config.vm.provision "shell", name: "routetrace setup", inline: "/vagrant/scripts/setup"']
    assert "apt" not in text.replace("adapt", "")


def test_vagrantfile_uses_debian_12_boxes():
    """libvirt: the box scripts/vagrant-box builds, TCG where there is no KVM; VirtualBox: the
    public Debian 12 box. Not Ubuntu 22.04, whose bcc 0.18 fails on its kernel."""
    text = (ROOT / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert 'override.vm.box = ENV.fetch("ROUTETRACE_BOX", "routetrace/bookworm64")' in text
    assert 'File.exist?("/dev/kvm") ? "kvm" : "qemu"' in text
    assert "ubuntu" not in text.lower()
    assert "BOX_NAME=${ROUTETRACE_BOX:-routetrace/bookworm64}" in (ROOT / "scripts" / "vagrant-box").read_text()


def _isolated_apt(tmp_path):
    """An apt configuration of its own: a copy of dpkg's status, empty lists, no sources. Its
    locks are files under tmp_path, so holding them blocks nobody else, and nothing is fetched
    or installed (every package asked for is already installed in the copy)."""
    (tmp_path / "dpkg").mkdir()
    shutil.copy("/var/lib/dpkg/status", tmp_path / "dpkg" / "status")
    for d in ("lists/partial", "cache/archives/partial"):
        (tmp_path / d).mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(f'''Dir::State::status "{tmp_path}/dpkg/status";
Dir::State::Lists "{tmp_path}/lists";
Dir::Cache "{tmp_path}/cache";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "/dev/null";
''')
    return {**os.environ, "APT_CONFIG": str(conf)}


def _hold_lock(path, seconds):
    """Another apt at work: holds apt's lock (an fcntl lock, as apt takes it; flock would not
    block apt) for `seconds`, and says when it has it."""
    holder = subprocess.Popen(
        ["python3", "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(float(sys.argv[2]))", str(path), str(seconds)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# What a first boot runs into: provisioning while another apt holds the lock. apt_install asks
# apt for bash here (as if it were missing), which the isolated configuration finds installed.
PROVISION = f'. {ROOT}/scripts/lib/apt.sh; installed() {{ return 1; }}; apt_install bash'


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt")
@pytest.mark.parametrize("lock", ["dpkg/lock-frontend", "lists/lock"])
def test_provisioning_waits_for_a_concurrent_apt(tmp_path, lock):
    env = _isolated_apt(tmp_path)
    holder = _hold_lock(tmp_path / lock, 4)
    try:
        if lock.startswith("dpkg"):   # without waiting, apt fails at once: the lock is real
            plain = subprocess.run(["apt-get", "install", "-y", "bash"], env=env, capture_output=True, text=True)
            assert plain.returncode != 0 and "Could not get lock" in plain.stderr
        start = time.monotonic()
        run = subprocess.run(["bash", "-c", PROVISION], env=env, capture_output=True, text=True, timeout=120)
        waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 0, run.stdout + run.stderr
    assert waited >= 3, f"apt did not wait for the lock ({waited:.1f}s)"
    assert "installing bash" in run.stderr


def test_vagrant_demo_installs_nothing_and_names_setup_without_tcpdump(tmp_path):
    """vagrant-demo may run where the network is out of reach (a namespace, an offline VM):
    with tcpdump missing it says to run scripts/setup, and never calls apt."""
    if os.geteuid() != 0:
        pytest.skip("vagrant-demo checks for root first")
    calls = tmp_path / "calls"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("dirname", "id"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    for tool in ("apt-get", "apt", "dpkg", "dpkg-query"):
        (bin_ / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\nexit 1\n")
        (bin_ / tool).chmod(0o755)
    out = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "vagrant-demo")], env={"PATH": str(bin_)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tcpdump is missing: run scripts/setup first" in out.stderr
    assert not calls.exists(), calls.read_text()


def test_setup_installs_the_demo_tools():
    setup = (ROOT / "scripts" / "setup").read_text()
    install = next(line for line in setup.splitlines() if line.startswith("apt_install python3 "))
    assert "tcpdump" in install.split()


def test_every_apt_get_call_waits_for_the_lock():
    """The shared helpers pass DPkg::Lock::Timeout; no script calls apt-get install/update itself."""
    lib = (ROOT / "scripts" / "lib" / "apt.sh").read_text()
    assert 'apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT" "$@"' in lib
    for script in SCRIPTS:
        for line in script.read_text().splitlines():
            words = line.split()
            if "apt-get" in words and ("install" in words or "update" in words):
                # apt.sh itself, or a private apt configuration (its own lists, no lock to share)
                assert script.name == "apt.sh" or "Dir::State::Lists" in line or "apt_opts" in line.lower(), (script, line)


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
    assert "control" in control and "UNICAST" in control and "ok: UNICAST route via rtdemo" in control
    _addr, _kind, _entry, fib_says, predicted_type, predicted_dev, _rtype, route_dev, *_ = control.split()
    assert fib_says == route_dev      # the FIB answer of this namespace, not the peer's
    assert (predicted_type, predicted_dev) == ("UNICAST", route_dev)    # ip route get, asked beforehand
    assert "the non-local control left on its real device" in out.stdout
    tail = out.stdout.strip().splitlines()[-1]
    assert tail.startswith("== tcpdump, port 8888, while that ran: eth0 0 packets, lo ")
    assert int(tail.split("lo ")[1].split()[0]) >= 10
