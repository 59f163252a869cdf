"""Volume id -> device resolution and the refusal checks, on real loop devices (root)."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from loopdisk import LoopVolume, build_image_cmd, byid_link, majmin, run_build

pytestmark = pytest.mark.root


def free_node(prefix: str, names: list[str]) -> str:
    """A /dev name from the candidates that does not exist on this machine."""
    for name in names:
        if not os.path.lexists(f"/dev/{name}"):
            return f"/dev/{name}"
    pytest.skip(f"no free {prefix} name")


def mknod_alias(vol: LoopVolume, node: str) -> None:
    """A real block node under another name for the volume's loop device (removed with the volume)."""
    st = os.stat(vol.device)
    vol.extra_nodes.append(node)
    os.mknod(node, stat.S_IFBLK | 0o600, st.st_rdev)


def resolved(vol: LoopVolume) -> str:
    """The device the resolve phase named in its log."""
    log = (vol.work / "logs" / "resolve.log").read_text()
    line = next(x for x in log.splitlines() if x.startswith(f"volume {vol.volume_id} is "))
    return line.rsplit(" ", 1)[1]


def test_nitro_byid_link(make_volume) -> None:
    """The by-id link Nitro udev (and the rehearsal) makes leads to the loop device."""
    vol = make_volume()
    res = run_build(vol, "resolve")
    assert res.rc == 0, res.stderr
    assert res.phases("phase-end") == ["resolve"]
    assert resolved(vol) == vol.device


def test_nvme_serial(make_volume, tmp_path: Path) -> None:
    """Without the link, the NVMe controller serial (volume id without dash) finds the namespace.

    There is no NVMe disk here: AMIBAKE_SYS_BLOCK points the lookup at a directory shaped like
    /sys/block, and the node it names is a real block node of the loop device.
    """
    vol = make_volume(link=False)
    node = free_node("nvme", [f"nvme{n}n1" for n in range(90, 99)])
    mknod_alias(vol, node)
    sys_block = tmp_path / "sys-block"
    other = sys_block / "nvme0n1" / "device"
    other.mkdir(parents=True)
    (other / "serial").write_text("vol0ffffffffffffffff   \n")
    mine = sys_block / Path(node).name / "device"
    mine.mkdir(parents=True)
    (mine / "serial").write_text(vol.volume_id.replace("-", "") + "    \n")
    res = run_build(vol, "resolve", env={"AMIBAKE_SYS_BLOCK": str(sys_block), "AMIBAKE_DEVICE_WAIT": "3"})
    assert res.rc == 0, res.stderr
    assert resolved(vol) == node


def test_xen_name(make_volume) -> None:
    """Without link or NVMe serial, --device-name /dev/sdp is found as /dev/xvdp."""
    vol = make_volume(link=False)
    node = free_node("xvd", ["xvdp", "xvdo", "xvdn"])
    mknod_alias(vol, node)
    res = run_build(vol, "--device-name", f"/dev/sd{node[-1]}", "resolve", env={"AMIBAKE_DEVICE_WAIT": "3"})
    assert res.rc == 0, res.stderr
    assert resolved(vol) == node


def test_absent_volume_fails_after_bounded_wait(make_volume) -> None:
    """A volume that never appears fails the phase with a message naming the volume id.

    Its attachment name is one no other test makes a node for: test_xen_name, in another worker at
    the same time, gives its own volume /dev/xvdp (or o, n), which /dev/sdp would resolve to."""
    vol = make_volume(link=False)
    unused = [f"sd{letter}" for letter in "fghijklm" if not os.path.lexists(f"/dev/xvd{letter}")]
    name = free_node("sd", unused)
    res = run_build(vol, "--device-name", name, "resolve", env={"AMIBAKE_DEVICE_WAIT": "2"})
    assert res.rc != 0
    assert res.phases("phase-fail") == ["resolve"]
    assert res.result == {"event": "result", "status": "fail", "phase": "resolve", "rc": res.rc}
    assert f"volume {vol.volume_id} is not attached here" in res.stderr
    assert "phase resolve failed" in res.stderr


def test_waits_for_a_late_attachment(make_volume) -> None:
    """The link appearing after the build started (asynchronous attach) is picked up."""
    vol = make_volume(link=False)
    proc = subprocess.Popen(
        build_image_cmd(vol, "resolve"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AMIBAKE_DEVICE_WAIT": "120"},
    )
    try:
        deadline = time.monotonic() + 60
        while not (vol.work / "logs" / "resolve.log").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        byid_link(vol.volume_id).symlink_to(vol.device)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert resolved(vol) == vol.device


def test_refuses_a_mounted_device(make_volume, tmp_path: Path) -> None:
    """A canvas mounted elsewhere is refused before anything is wiped."""
    vol = make_volume()
    assert run_build(vol, "partition", "mkfs").rc == 0
    uuid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", vol.partition(2)],
                          capture_output=True, text=True).stdout.strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", vol.partition(2), str(elsewhere)], check=True)
    try:
        res = run_build(vol, "partition")
        assert res.rc != 0
        assert f"is mounted (at {elsewhere})" in res.stderr
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    after = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", vol.partition(2)],
                           capture_output=True, text=True).stdout.strip()
    assert after == uuid, "the refused partition phase changed the disk"


def test_refuses_the_wrong_size(make_volume) -> None:
    """A 1 GiB device is not the 2 GiB canvas asked for."""
    vol = make_volume(size_gib=1)
    res = run_build(vol, "--size-gib", "2", "partition")
    assert res.rc != 0
    assert "is 1073741824 bytes, expected --size-gib 2" in res.stderr
    parted = subprocess.run(["blkid", "-p", vol.device], capture_output=True, text=True)
    assert parted.returncode != 0, "a partition table was written to the refused device"


def test_refuses_the_root_disk(make_volume) -> None:
    """A volume id that leads to the disk holding / is refused (resolve phase only: it never writes)."""
    vol = make_volume(link=False)
    root_id = next(x.split()[2] for x in Path("/proc/self/mountinfo").read_text().splitlines()
                   if x.split()[4] == "/")
    sysdir = Path("/sys/dev/block", root_id).resolve()
    disk = sysdir.parent if (sysdir / "partition").exists() else sysdir
    root_dev = f"/dev/{disk.name}"
    if not Path(root_dev).is_block_device() or majmin(root_dev) != disk.joinpath("dev").read_text().strip():
        pytest.skip("the root filesystem is not on a block device node here")
    byid_link(vol.volume_id).symlink_to(root_dev)
    res = run_build(vol, "resolve")
    assert res.rc != 0
    assert "holds the root filesystem of this box" in res.stderr
