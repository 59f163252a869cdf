"""A box whose qemu cannot show the guest an EC2 machine fails the boot check loudly, before the build.

EL7's own qemu-kvm 1.5.3 cannot run here, so a stand-in answers its three questions the way it does
(Red Hat's build has no ``nvme`` device and no ``q35`` machine; see include/scripts/README.md, Boot
check). Everything else is real: the tools phase and the bootcheck phase of build-image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from loopdisk import run_build

SCRIPTS = Path(__file__).resolve().parents[2] / "include" / "scripts"
EL7_QEMU = """#!/bin/sh
# Stand-in for EL7's /usr/libexec/qemu-kvm 1.5.3: what it prints for the questions the check asks.
case "$*" in
--version) echo "QEMU emulator version 1.5.3 (qemu-kvm-1.5.3-175.el7_9.6)" ;;
"-device help") printf 'name "virtio-blk-pci", bus PCI, alias "virtio-blk"\\nname "ide-hd", bus IDE\\n' >&2 ;;
"-machine help") printf 'Supported machines are:\\npc    RHEL 7.6.0 PC (alias of pc-i440fx-rhel7.6.0)\\n' ;;
*) echo "qemu-kvm stand-in: not run in this test" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def el7_qemu_path(tmp_path: Path) -> str:
    """PATH with the EL7 stand-in first as qemu-system-x86_64."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(EL7_QEMU)
    fake.chmod(0o755)
    return f"{tmp_path}:{os.environ['PATH']}"


def test_qemu_problems_names_nvme_and_q35(el7_qemu_path: str) -> None:
    """The same question the tools phase and the check ask, answered for EL7's qemu."""
    script = f". {SCRIPTS}/lib/bootcheck.sh; qemu_problems"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": el7_qemu_path}).stdout.splitlines()
    assert len(out) == 2
    assert out[0].startswith("a qemu with an NVMe device (") and "1.5.3" in out[0]
    assert out[1].startswith("a qemu with the q35 machine (")


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86")
def test_this_machines_qemu_is_fit() -> None:
    """Debian 12's qemu 7.2 has both: no problem reported."""
    out = subprocess.run(["bash", "-c", f". {SCRIPTS}/lib/bootcheck.sh; qemu_problems"],
                         capture_output=True, text=True, check=True).stdout
    assert out == ""


@pytest.mark.root
def test_bootcheck_and_tools_refuse_it_loudly(make_volume, el7_qemu_path: str) -> None:
    """--boot-check with that qemu: the tools phase fails naming it; the bootcheck phase alone fails too."""
    vol = make_volume(size_gib=1)
    env = {"PATH": el7_qemu_path}
    res = run_build(vol, "--boot-check", "tools", env=env, timeout=300)
    assert res.rc != 0 and res.phases("phase-fail") == ["tools"]
    assert "a qemu with an NVMe device" in res.stderr and "README.md, Boot check" in res.stderr
    res = run_build(vol, "bootcheck", env=env, timeout=300)
    assert res.rc != 0 and res.phases("phase-fail") == ["bootcheck"]
    assert "bootcheck: this box lacks a qemu with an NVMe device" in res.stderr
    assert vol.mountpoints() == []
