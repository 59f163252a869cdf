"""The tools phase: the whole list of what the box lacks, before the canvas is touched.

The Debian branch (check only) runs for real against this machine's tools, some hidden from PATH.
The EL7 branch (install with the box's yum from the configured mirror) runs with the EL7 stand-ins
of el7box.py: the yum call is asserted as a plan, and the stand-in yum "installs" what a test offers.
"""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import pytest
from el7box import El7Box
from loopdisk import BUILD_IMAGE, parse_output, run_build

VOL = "vol-0123456789abcdef0"
VAULT = "https://vault.centos.org/7.9.2009"


def tools(tmp_path: Path, *args: str, recipe: str = "debian12", env: dict | None = None):
    """`build-image ... tools` with a work dir under tmp_path: (rc, progress events, stderr)."""
    cmd = ["bash", str(BUILD_IMAGE), "--recipe", recipe, "--volume-id", VOL, "--work-dir",
           str(tmp_path / "work"), *args, "tools"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    events, _ = parse_output(proc.stdout)
    return proc.returncode, events, proc.stderr


def test_this_machine_has_every_tool(tmp_path: Path) -> None:
    """This Debian machine (the rehearsal's box) has what a debian12 build with boot check needs."""
    rc, events, err = tools(tmp_path, "--boot-check")
    assert rc == 0, err
    assert [e["event"] for e in events] == ["phase-start", "phase-end", "result"]
    log = (tmp_path / "work/logs/tools.log").read_text()
    assert "box: not EL7 (check only), recipe debian12, boot check 1" in log
    assert "tools present" in log


def test_debian_box_lists_every_missing_tool(tmp_path: Path) -> None:
    """Not EL7: nothing is installed; one error names every missing tool and the apt packages."""
    box = El7Box(tmp_path, hide=("mkfs.xfs", "fuser", "debootstrap"))
    rc, events, err = tools(tmp_path, env=box.env)
    assert rc != 0
    assert ("tools: missing on this box: mkfs.xfs (xfsprogs); fuser (psmisc); debootstrap (debootstrap) "
            "(apt-get install xfsprogs psmisc debootstrap)") in err
    assert events[-1] == {"event": "result", "status": "fail", "phase": "tools", "rc": rc}
    assert [c for c in box.plan() if c[0] == "yum"] == []


def test_too_old_mkfs_xfs_is_named(tmp_path: Path) -> None:
    """A mkfs.xfs older than the minimum (no -m crc=1: it would make a v4 filesystem) is refused."""
    old = tmp_path / "old"
    old.mkdir()
    fake = old / "mkfs.xfs"
    fake.write_text("#!/bin/sh\necho 'mkfs.xfs version 3.1.11'\n")
    fake.chmod(0o755)
    rc, _, err = tools(tmp_path, env={"PATH": f"{old}:{os.environ['PATH']}"})
    assert rc != 0
    assert "mkfs.xfs >= 3.2.0 (this is 3.1.11; xfsprogs)" in err


@pytest.mark.parametrize("mirror", ["", "https://mirror.example.org/centos/7.9.2009"])
def test_el7_box_installs_what_it_lacks(tmp_path: Path, mirror: str) -> None:
    """EL7: the missing packages come from the configured mirror with the box's yum, then re-checked."""
    box = El7Box(tmp_path, el7=True, hide=("fuser", "getfattr", "setfattr"))
    box.offer("psmisc", "fuser")
    box.offer("attr", "getfattr", "setfattr")
    rc, _, err = tools(tmp_path, *(["--mirror", mirror] if mirror else []), recipe="centos7", env=box.env)
    assert rc == 0, err
    conf_path = tmp_path / "work/yum/box-yum.conf"
    assert box.plan() == [
        ["rpm", "-E", "%{?rhel}"],
        ["yum", "-c", str(conf_path), "-y", "install", "psmisc", "attr"],
    ]
    conf = configparser.RawConfigParser()
    conf.read_string(conf_path.read_text())
    assert conf["main"]["reposdir"] == "" and conf["main"]["gpgcheck"] == "1"
    assert conf.sections() == ["main", "base", "updates", "extras"]
    for section, tree in (("base", "os"), ("updates", "updates"), ("extras", "extras")):
        assert conf[section]["baseurl"] == f"{mirror or VAULT}/{tree}/$basearch/"
        assert conf[section]["gpgkey"] == "file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7"
    log = (tmp_path / "work/logs/tools.log").read_text()
    assert "installing on this EL7 box: psmisc attr" in log


def test_el7_box_names_what_yum_could_not_install(tmp_path: Path) -> None:
    """EL7: what is still missing after yum (here qemu for the boot check) fails the phase, all named."""
    box = El7Box(tmp_path, el7=True, hide=("qemu-system-x86_64", "fuser"))
    box.offer("psmisc", "fuser")
    rc, _, err = tools(tmp_path, "--boot-check", recipe="centos7", env=box.env)
    assert rc != 0
    assert box.plan()[-1][-3:] == ["install", "psmisc", "qemu-kvm"]
    assert ("tools: missing on this box after yum install psmisc qemu-kvm: "
            "qemu-system-x86_64 or /usr/libexec/qemu-kvm (qemu-kvm)") in err


@pytest.mark.root
def test_all_stops_at_tools_before_the_canvas(make_volume, tmp_path: Path) -> None:
    """`all` runs tools first: a missing tool fails the build with the canvas untouched."""
    vol = make_volume()
    box = El7Box(tmp_path, hide=("mkfs.xfs", "debootstrap"))
    res = run_build(vol, "all", env=box.env)
    assert res.rc != 0
    assert res.phases("phase-start") == ["tools"]
    assert "mkfs.xfs (xfsprogs); debootstrap (debootstrap)" in res.stderr
    blank = subprocess.run(["blkid", "-p", vol.device], capture_output=True, text=True)
    assert blank.returncode == 2, "the canvas was written before the tools were checked"
    assert vol.mountpoints() == []
