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
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "VAGRANT_HOME": str(tmp_path / "vh")}
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
