"""The CentOS 7 recipe without EL7: disk phases run for real on a loop device; the yum, rpm, curl and
chroot steps (which need an EL7 box and the CentOS repositories, unreachable here) go to recording
stand-ins first on PATH (el7box.py) and are asserted exactly as a command plan; every file the
recipe writes is real and asserted as text, the key's fingerprint check runs for real on the real
CentOS 7 key, and the bootloader's root=UUID check runs on the grub.cfg the stand-in writes (root)."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest
import yaml
from el7box import El7Box
from loopdisk import LoopVolume, run_build

pytestmark = pytest.mark.root

VAULT = "https://vault.centos.org/7.9.2009"
KVER = "3.10.0-1160.119.1.el7.x86_64"
PACKAGES = ["@core", "kernel", "grub2", "grub2-tools", "dracut-config-generic", "dracut-norescue", "chrony",
            "cloud-init", "cloud-utils-growpart", "gdisk", "openssh-server", "selinux-policy-targeted",
            "policycoreutils", "xfsprogs", "rsync", "tar", "yum-utils"]
#: What yum leaves in /etc/shadow for root before the recipe locks it (a usable password hash here,
#: so the test sees the lock replace it).
SHADOW = "root:$6$salt$0123456789abcdef:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n"
EXCLUDES = ["NetworkManager*", "plymouth*", "biosdevname", "iprutils", "aic94xx-firmware", "alsa-firmware",
            "alsa-tools-firmware", "ivtv-firmware", "iwl*-firmware", "libertas-*-firmware"]


def yum_leftovers(root: Path) -> None:
    """Stand-in for what `yum install` leaves that later phases read (yum cannot run here): the
    kernel's module directory (configure builds its initramfs) and /etc/shadow (configure locks root)."""
    (root / "lib" / "modules" / KVER).mkdir(parents=True)
    (root / "boot" / "grub2").mkdir(parents=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "shadow").write_text(SHADOW)


def planned_build(vol: LoopVolume, *extra: str, box: El7Box | None = None) -> list[list[str]]:
    """Disk phases for real, then bootstrap..clean with the EL7 stand-ins; returns the plan."""
    assert run_build(vol, *extra, "partition", "mkfs", "mount", recipe="centos7").rc == 0
    box = box or El7Box(vol.tmp)
    res = run_build(vol, *extra, "bootstrap", recipe="centos7", env=box.env)
    assert res.rc == 0, res.stderr + "\n".join(res.other_stdout)
    yum_leftovers(vol.work / "root")
    res = run_build(vol, *extra, "configure", "bootloader", "relabel", "clean", recipe="centos7", env=box.env)
    assert res.rc == 0, res.stderr + "\n".join(res.other_stdout)
    return box.plan()


def repo_sections(text: str) -> configparser.RawConfigParser:
    """A yum .conf/.repo file parsed (no interpolation: $basearch stays literal)."""
    cfg = configparser.RawConfigParser()
    cfg.read_string(text)
    return cfg


def test_centos7_plan_and_files(make_volume) -> None:
    """Exact EL7 command plan; yum.conf, repo, fstab, grub defaults, ifcfg, dracut conf as text."""
    vol = make_volume(size_gib=2)
    plan = planned_build(vol)
    work, root, dev = vol.work, vol.work / "root", vol.device
    key = f"{work}/yum/RPM-GPG-KEY-CentOS-7"
    yum = ["yum", "-c", f"{work}/yum/yum.conf", f"--installroot={root}", "--releasever=7", "-y"]
    excludes = [arg for x in EXCLUDES for arg in ("-x", x)]
    assert plan == [
        ["curl", "-fsSL", "--retry", "3", "-o", key, f"{VAULT}/os/x86_64/RPM-GPG-KEY-CentOS-7"],
        ["rpm", "--root", str(root), "--initdb"],
        ["rpm", "--root", str(root), "--import", key],
        [*yum, "install", *PACKAGES, *excludes],
        [*yum, "update", *excludes],
        ["chroot", str(root), "chkconfig", "network", "on"],
        ["chroot", str(root), "dracut", "-f", f"/boot/initramfs-{KVER}.img", KVER],
        ["chroot", str(root), "grub2-install", "--target=i386-pc", dev],
        ["chroot", str(root), "grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"],
        ["chroot", str(root), "setfiles", "-F", "-e", "/proc", "-e", "/sys", "-e", "/dev",
         "/etc/selinux/targeted/contexts/files/file_contexts", "/"],
    ]

    conf_text = (work / "yum" / "yum.conf").read_text()
    assert "\nreposdir=\n" in conf_text
    conf = repo_sections(conf_text)
    assert dict(conf["main"]) == {
        "cachedir": "/var/cache/yum/$basearch/$releasever", "keepcache": "0", "logfile": "/var/log/yum.log",
        "exactarch": "1", "obsoletes": "1", "gpgcheck": "1", "plugins": "0", "installonly_limit": "3",
        "reposdir": "", "distroverpkg": "centos-release", "tsflags": "nodocs",
    }
    for repo_file, keyurl in ((conf, f"file://{key}"),
                              (repo_sections((root / "etc/yum.repos.d/CentOS-Base.repo").read_text()),
                               "file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7")):
        assert [s for s in repo_file.sections() if s != "main"] == ["base", "updates", "extras"]
        for section, tree in (("base", "os"), ("updates", "updates"), ("extras", "extras")):
            assert repo_file[section]["baseurl"] == f"{VAULT}/{tree}/$basearch/"
            assert repo_file[section]["gpgcheck"] == "1"
            assert repo_file[section]["gpgkey"] == keyurl
            assert repo_file[section]["enabled"] == "1"

    uuid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", vol.partition(2)],
                          capture_output=True, text=True, check=True).stdout.strip()
    fstab = [x for x in (root / "etc/fstab").read_text().splitlines() if not x.startswith("#")]
    assert fstab == [f"UUID={uuid} / xfs defaults,noatime 0 0"]

    grub = (root / "etc/default/grub").read_text()
    # 255: the highest nvme_core.io_timeout a kernel before 4.15 (CentOS 7's 3.10) accepts
    assert ('GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 no_timer_check net.ifnames=0 '
            'nvme_core.io_timeout=255 crashkernel=auto"') in grub
    assert 'GRUB_TERMINAL="console serial"' in grub
    assert "GRUB_DEVICE" not in grub, "the build-time root=UUID override was left in the image"
    assert not (root / "etc/default/grub.amibake-orig").exists()

    ifcfg = dict(line.split("=", 1) for line in (root / "etc/sysconfig/network-scripts/ifcfg-eth0")
                 .read_text().splitlines())
    assert ifcfg == {"DEVICE": "eth0", "TYPE": "Ethernet", "BOOTPROTO": "dhcp", "ONBOOT": "yes",
                     "USERCTL": "no", "PEERDNS": "yes", "IPV6INIT": "no", "NM_CONTROLLED": "no"}
    assert (root / "etc/sysconfig/network").read_text() == "NETWORKING=yes\nNOZEROCONF=yes\n"
    dracut = (root / "etc/dracut.conf.d/amibake.conf").read_text().splitlines()
    assert dracut[1:] == ['hostonly="no"', 'add_drivers+=" nvme xen-blkfront xen-netfront ena "']
    assert (root / "etc/sysconfig/kernel").read_text() == "UPDATEDEFAULT=yes\nDEFAULTKERNEL=kernel\n"
    assert (root / "etc/shadow").read_text().splitlines() == ["root:!!:19000:0:99999:7:::",
                                                              "bin:*:19000:0:99999:7:::"]
    # grub.cfg as the stand-in grub2-mkconfig wrote it, from the build-time GRUB_DEVICE override
    cfg = (root / "boot/grub2/grub.cfg").read_text()
    assert f"root=UUID={uuid} ro" in cfg and "/dev/loop" not in cfg
    assert "GPG key" in (work / "logs/bootstrap.log").read_text()
    # cloud-init: EC2 only, and only on a platform that identifies as EC2, so the boot check's qemu
    # (no network) does not wait 120 s for a metadata service (cloud-init 18.5's identify_aws)
    cloud = yaml.safe_load((root / "etc/cloud/cloud.cfg.d/90-amibake.cfg").read_text())
    assert cloud == {"datasource_list": ["Ec2"], "datasource": {"Ec2": {"strict_id": True}}}

    # Build-only files are gone and only the root filesystem is mounted.
    assert not (root / "etc/resolv.conf").exists()
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert vol.mountpoints() == [str(root)]
    assert f" {root}/" not in Path("/proc/self/mountinfo").read_text()


def test_centos7_mirror_override(make_volume) -> None:
    """--mirror replaces the vault everywhere: key download, build repos and the image's repo file."""
    vol = make_volume(size_gib=2)
    mirror = "https://mirror.example.org/centos/7.9.2009"
    plan = planned_build(vol, "--mirror", mirror + "/")
    assert plan[0][-1] == f"{mirror}/os/x86_64/RPM-GPG-KEY-CentOS-7"
    for text in ((vol.work / "yum/yum.conf").read_text(),
                 (vol.work / "root/etc/yum.repos.d/CentOS-Base.repo").read_text()):
        assert "vault.centos.org" not in text
        assert f"baseurl={mirror}/updates/$basearch/" in text


def test_verify_reads_selinux_labels(make_volume) -> None:
    """verify's SELinux check reads the security.selinux xattrs setfiles writes (set here by hand)."""
    vol = make_volume(size_gib=2)
    planned_build(vol)
    root = vol.work / "root"
    labels = {"etc/passwd": "passwd_file_t", "etc/shadow": "shadow_t", "usr/sbin/sshd": "sshd_exec_t"}
    for rel in [*labels, "usr/lib/systemd/systemd"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    for rel, typ in labels.items():
        subprocess.run(["setfattr", "-n", "security.selinux", "-v", f"system_u:object_r:{typ}:s0",
                        str(root / rel)], check=True)
    res = run_build(vol, "verify", recipe="centos7")
    assert res.rc != 0  # no grub, no kernel: this image is only a plan
    log = (vol.work / "logs" / "verify.log").read_text()
    assert "SELinux label of /usr/lib/systemd/systemd is 'none', expected type init_exec_t" in log
    for rel in labels:
        assert f"SELinux label of /{rel}" not in log
    assert "xfs features of" in log and "ro_compat=0 incompat=0x1 (as the centos7 target needs)" in log
    assert "ok: SELinux labels" not in log, "a failed label was also reported as ok"
    assert "root password locked ('!!')" in log
    # growpart and sgdisk: yum cannot install them here, so verify names both as missing
    assert "/usr/bin/growpart missing: cloud-utils-growpart" in log
    assert "/usr/sbin/sgdisk missing: gdisk (growpart needs sgdisk for a GPT disk)" in log


def test_bootloader_fails_without_root_uuid(make_volume) -> None:
    """No seam skips the root=UUID check: a grub2-mkconfig that names the loop device fails the build."""
    vol = make_volume(size_gib=2)
    assert run_build(vol, "partition", "mkfs", "mount", recipe="centos7").rc == 0
    box = El7Box(vol.tmp, ignore_grub_device=True)
    assert run_build(vol, "bootstrap", recipe="centos7", env=box.env).rc == 0
    yum_leftovers(vol.work / "root")
    res = run_build(vol, "configure", "bootloader", recipe="centos7", env=box.env)
    assert res.rc != 0
    assert res.phases("phase-fail") == ["bootloader"]
    assert f"/boot/grub2/grub.cfg still has root={vol.partition(2)} instead of root=UUID=" in res.stderr


def test_bootstrap_refuses_a_wrong_signing_key(make_volume) -> None:
    """The downloaded key's fingerprint is checked for real: another key stops bootstrap before rpm."""
    vol = make_volume(size_gib=2)
    assert run_build(vol, "partition", "mkfs", "mount", recipe="centos7").rc == 0
    box = El7Box(vol.tmp)
    (box.dir / "key.asc").write_text("not a key\n")
    res = run_build(vol, "bootstrap", recipe="centos7", env=box.env)
    assert res.rc != 0
    assert "has fingerprint 'none', expected 6341AB2753D78A78A7C27BB124C6A8A7F4A80EB5" in res.stderr
    assert [cmd[0] for cmd in box.plan()] == ["curl"]
