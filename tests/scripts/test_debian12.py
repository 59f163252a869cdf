"""The Debian 12 recipe end to end on a loop device: every phase, the qemu boot check, and verify
catching deliberately broken images (root, slow: one debootstrap per session, ~2 min here, warm cache).

Packages come from the mirror this machine's apt sources use. The offline package cache
(``rehearsal.sshd.package_cache``) keeps downloaded .debs between runs; the production path never
sets it.
"""

from __future__ import annotations

import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from loopdisk import BuildResult, LoopVolume, run_build

from rehearsal.sshd import package_cache, package_cache_env

pytestmark = [pytest.mark.root, pytest.mark.slow]

ALL_PHASES = ["resolve", "partition", "mkfs", "mount", "bootstrap", "configure", "bootloader", "relabel",
              "clean", "verify", "bootcheck"]


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[LoopVolume, BuildResult]]:
    """One Debian 12 image built with `all --boot-check` on a 3 GiB loop canvas."""
    vol = LoopVolume(size_gib=3)
    try:
        # A generous boot limit: TCG on 2 shared cores reaches a login in ~40 s alone, minutes under load.
        res = run_build(vol, "--boot-check", "--boot-timeout", "900", "all",
                        env=package_cache_env(package_cache()), timeout=2400)
        yield vol, res
    finally:
        vol.teardown()


def root_uuid(vol: LoopVolume) -> str:
    """UUID of the canvas root filesystem, read from the disk."""
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", vol.partition(2)],
                          capture_output=True, text=True, check=True).stdout.strip()


def verify(vol: LoopVolume) -> BuildResult:
    """Run the verify phase alone, as a retry or an operator would."""
    return run_build(vol, "verify", timeout=300)


def mount_root(vol: LoopVolume) -> None:
    """Mount the canvas root again: a failed phase unmounts everything (a retry starts clean)."""
    res = run_build(vol, "mount")
    assert res.rc == 0, res.stderr


@contextmanager
def restored_bytes(dev: str, length: int) -> Iterator[None]:
    """Keep the first bytes of a block device and put them back afterwards."""
    with open(dev, "rb") as f:
        saved = f.read(length)
    try:
        yield
    finally:
        with open(dev, "r+b") as f:
            f.write(saved)


@contextmanager
def restored_file(vol: LoopVolume, rel: str) -> Iterator[Path]:
    """A file of the image, kept and put back afterwards (re-mounting the root to do so)."""
    mount_root(vol)
    path = vol.work / "root" / rel
    saved = path.read_bytes()
    try:
        yield path
    finally:
        mount_root(vol)
        path.write_bytes(saved)


def test_all_phases_and_the_boot_check_pass(built) -> None:
    """`all --boot-check` succeeds; only the root fs stays mounted, ready to be frozen."""
    vol, res = built
    assert res.rc == 0, res.stderr + "\n".join(res.other_stdout[-60:])
    assert res.phases("phase-start") == ALL_PHASES
    assert res.phases("phase-end") == ALL_PHASES
    assert res.result == {"event": "result", "status": "ok"}
    root = vol.work / "root"
    assert vol.mountpoints() == [str(root)]
    assert f" {root}/" not in Path("/proc/self/mountinfo").read_text(), "a bind mount was left"


def test_the_boot_reached_multi_user_on_our_root(built) -> None:
    """The serial console of the boot check shows our root UUID booted to multi-user and a login."""
    vol, _ = built
    log = (vol.work / "logs" / "bootcheck.log").read_text(errors="replace")
    uuid = root_uuid(vol)
    assert f"root=UUID={uuid}" in log
    assert f"amibake-boot-ok: multi-user.target reached, root UUID={uuid}" in log
    assert "login:" in log
    assert "bootcheck: passed" in log
    # off EC2, cloud-init gives up at once (strict_id) rather than polling 169.254.169.254 for 120 s
    assert "cloud-init" in log and "169.254.169.254" not in log
    # every unit started (cloud-config.service once failed on the default en_US.UTF-8 locale)
    assert "FAILED" not in log and "invalid locale" not in log, [
        line for line in log.splitlines() if "FAILED" in line or "invalid locale" in line
    ]


def test_image_contents(built) -> None:
    """grub.cfg and fstab by UUID, serial console, cleaned identity, no build leftovers."""
    vol, _ = built
    root = vol.work / "root"
    uuid = root_uuid(vol)
    cfg = (root / "boot/grub/grub.cfg").read_text()
    roots = {tok for line in cfg.splitlines() for tok in line.split() if tok.startswith("root=")}
    assert roots == {f"root=UUID={uuid}"}
    assert "console=ttyS0,115200n8" in cfg
    assert (root / "etc/fstab").read_text().splitlines()[1] == f"UUID={uuid} / xfs defaults,noatime 0 0"
    assert (root / "etc/machine-id").read_text() == ""
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert not (root / "etc/resolv.conf").exists()
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert "GRUB_DEVICE" not in (root / "etc/default/grub").read_text()
    assert list((root / "boot/grub/i386-pc").glob("core.img"))
    sources = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "Suites: bookworm bookworm-updates" in sources
    cloud = yaml.safe_load((root / "etc/cloud/cloud.cfg.d/90-amibake.cfg").read_text())
    ec2_only = {"datasource_list": ["Ec2"], "datasource": {"Ec2": {"strict_id": True}}}
    assert cloud == {**ec2_only, "locale": "C.UTF-8"}


def test_verify_passes_on_the_built_image(built) -> None:
    """verify alone re-derives device and mount point and passes."""
    vol, _ = built
    res = verify(vol)
    assert res.rc == 0, res.stderr
    log = (vol.work / "logs" / "verify.log").read_text()
    assert "initramfs" in log and "nvme xen-blkfront virtio_blk ena xen-netfront" in log


def test_verify_catches_root_on_a_loop_device(built) -> None:
    """grub.cfg with root=/dev/loopXp2 (what update-grub writes on loop devices) is caught."""
    vol, _ = built
    with restored_file(vol, "boot/grub/grub.cfg") as cfg:
        cfg.write_text(cfg.read_text().replace(f"root=UUID={root_uuid(vol)}", f"root={vol.partition(2)}"))
        res = verify(vol)
        assert res.rc != 0
        assert vol.mountpoints() == [], "a failed phase leaves nothing mounted"
        assert f"grub.cfg has 'root={vol.partition(2)}'" in res.stderr
        assert "phase verify failed" in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_missing_boot_code(built) -> None:
    """A zeroed MBR boot code area (bootloader never installed) is caught."""
    vol, _ = built
    with restored_bytes(vol.device, 440):
        with open(vol.device, "r+b") as dev:
            dev.write(bytes(440))
        res = verify(vol)
        assert res.rc != 0
        assert f"no GRUB boot code in the MBR of {vol.device}" in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_missing_core_image(built) -> None:
    """An empty bios_grub partition (core image not embedded) is caught."""
    vol, _ = built
    with restored_bytes(vol.partition(1), 1024 * 1024):
        with open(vol.partition(1), "r+b") as dev:
            dev.write(bytes(1024 * 1024))
        res = verify(vol)
        assert res.rc != 0
        assert "bios_grub partition" in res.stderr and "is empty" in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_an_unknown_fstab_uuid(built) -> None:
    """An fstab entry naming a UUID that is not on the canvas is caught."""
    vol, _ = built
    stranger = str(uuidlib.uuid4())
    with restored_file(vol, "etc/fstab") as fstab:
        fstab.write_text(fstab.read_text().replace(root_uuid(vol), stranger))
        res = verify(vol)
        assert res.rc != 0
        want = f"fstab entry for / names UUID={stranger}, which is not a filesystem on the canvas"
        assert want in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_a_missing_storage_driver(built) -> None:
    """The cloud kernel builds nvme in; without it (and not in the initramfs) verify fails."""
    vol, _ = built
    mount_root(vol)
    kver = next((vol.work / "root/lib/modules").iterdir()).name
    with restored_file(vol, f"lib/modules/{kver}/modules.builtin") as builtin:
        lines = builtin.read_text().splitlines()
        assert "kernel/drivers/nvme/host/nvme.ko" in lines, "nvme is expected built into this kernel"
        builtin.write_text("".join(f"{x}\n" for x in lines if not x.endswith("/nvme.ko")))
        res = verify(vol)
        assert res.rc != 0
        assert f"of kernel {kver} lacks driver nvme" in res.stderr
    assert verify(vol).rc == 0


def test_bootcheck_fails_an_unbootable_disk(built) -> None:
    """No boot code: the boot check fails on the console's verdict, and no qemu is left running."""
    vol, _ = built
    with restored_bytes(vol.device, 440):
        with open(vol.device, "r+b") as dev:
            dev.write(bytes(440))
        res = run_build(vol, "--boot-timeout", "15", "bootcheck", timeout=600)
        assert res.rc != 0
        # The protective MBR still carries the 0x55AA signature, so SeaBIOS jumps into the zeroed
        # code and the machine hangs without a word: the time limit ends it. (A disk without the
        # signature makes SeaBIOS give up and reboot, and -no-reboot ends qemu at once.)
        assert ("no multi-user login prompt within 15s" in res.stderr
                or "qemu exited before the system reached multi-user" in res.stderr), res.stderr
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if "qemu" in line and f"file={vol.device}," in line]
    assert not (vol.work / "run" / "frozen").exists(), "the boot check left the canvas frozen"


def test_umount_stops_processes_inside_the_chroot(built) -> None:
    """A process still running inside the image would make umount fail 'busy': it is stopped first."""
    vol, _ = built
    mount_root(vol)
    inside = subprocess.Popen(["chroot", str(vol.work / "root"), "/bin/sleep", "600"])
    try:
        res = run_build(vol, "umount")
        assert res.rc == 0, res.stderr
        assert inside.wait(timeout=60) != 0
        assert vol.mountpoints() == []
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait()
