"""LoopEbs against a real moto server, real loop devices, partitions, xfs, mounts and freezes (root)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from rehearsal.ebs import EbsSnapshots, LoopEbs, link_path, loops_backed_by, mounts_of, snapshot_image
from rehearsal.ec2_local import LocalEc2

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root"),
]

REGION = "eu-west-1"


def sh(*argv: str) -> str:
    """Run a tool the test uses to prepare or inspect a disk."""
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def wait_for_node(path: str) -> None:
    """Partition nodes appear asynchronously after partprobe; wait (bounded) for one."""
    for _ in range(100):
        if Path(path).exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto server of our own on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def ec2(endpoint: str):
    """A boto3 EC2 client for the test's own moto calls."""
    return boto3.client(
        "ec2", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="t", aws_secret_access_key="t"
    )


@pytest.fixture
def instance_id(ec2) -> str:
    """A running instance to attach volumes to."""
    image = ec2.register_image(Name=f"base-{time.monotonic_ns()}", RootDeviceName="/dev/xvda")["ImageId"]
    reservation = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    iid = reservation["Instances"][0]["InstanceId"]
    yield iid
    ec2.terminate_instances(InstanceIds=[iid])


@pytest.fixture
def ebs(endpoint: str, tmp_path: Path) -> Iterator[LoopEbs]:
    """A running LoopEbs whose stop (also on failure) releases every loop, mount and link."""
    with LoopEbs(endpoint, REGION, tmp_path / "ebs", poll_interval=0.1) as running:
        yield running
    assert list((tmp_path / "ebs").glob("*.img")) == []


def new_volume(ec2, size: int = 1) -> str:
    """A fresh available volume."""
    return ec2.create_volume(Size=size, AvailabilityZone=f"{REGION}a")["VolumeId"]


def test_attached_volume_gets_loop_device_and_link_then_detach_removes_them(ebs, ec2, instance_id):
    """Attach → sized loop device + Nitro by-id link; detach → link, loop and file are gone."""
    vol = new_volume(ec2, size=2)
    ec2.attach_volume(VolumeId=vol, InstanceId=instance_id, Device="/dev/sdf")
    loop_dev = ebs.wait_for(vol, attached=True, timeout=30)

    link = link_path(vol)
    assert link.name == "nvme-Amazon_Elastic_Block_Store_" + vol.replace("-", "")
    assert os.readlink(link) == loop_dev
    assert ebs.devices[vol] == loop_dev  # the instance's root volume is attached (and backed) too
    assert int(sh("blockdev", "--getsize64", loop_dev)) == 2 * 1024**3
    image = ebs.state_dir / f"{vol}.img"
    assert loops_backed_by(image) == [loop_dev]
    assert os.stat(image).st_blocks == 0  # sparse: nothing written yet

    ec2.detach_volume(VolumeId=vol, InstanceId=instance_id)
    assert ebs.wait_for(vol, attached=False, timeout=30) is None
    assert not link.is_symlink()
    assert not image.exists()
    assert vol not in sh("losetup", "-a")  # by image: a test may reuse the device
    assert vol not in ebs.devices
    ec2.delete_volume(VolumeId=vol)


def test_detach_thaws_and_unmounts_frozen_partition_and_mounts_beneath(ebs, ec2, instance_id, tmp_path):
    """A forced detach of a partitioned, mounted, frozen canvas leaves nothing mounted or attached."""
    vol = new_volume(ec2)
    ec2.attach_volume(VolumeId=vol, InstanceId=instance_id, Device="/dev/sdf")
    loop_dev = ebs.wait_for(vol, timeout=30)
    sh("parted", "-s", loop_dev, "mklabel", "gpt", "mkpart", "root", "xfs", "1MiB", "100%")
    sh("partprobe", loop_dev)
    wait_for_node(f"{loop_dev}p1")
    sh("mkfs.xfs", "-q", f"{loop_dev}p1")
    root = tmp_path / "root with space"
    root.mkdir()
    sh("mount", f"{loop_dev}p1", str(root))
    (root / "proc").mkdir()
    sh("mount", "--bind", "/proc", str(root / "proc"))  # like a chroot's bind mount, from another fs
    sh("xfs_freeze", "-f", str(root))
    assert mounts_of(loop_dev) == [str(root / "proc"), str(root)]  # deepest first

    ec2.detach_volume(VolumeId=vol, InstanceId=instance_id)
    ebs.wait_for(vol, attached=False, timeout=60)
    assert str(root) not in sh("findmnt", "-rn", "-o", "TARGET")
    assert vol not in sh("losetup", "-a")  # by image: a test may reuse the device
    assert not link_path(vol).is_symlink()
    assert ebs.errors == []
    ec2.delete_volume(VolumeId=vol)


def test_stop_releases_every_attached_volume(endpoint, ec2, instance_id, tmp_path):
    """Leaving the context releases what is still attached, as on Ctrl-C of the rehearsal."""
    vols = [new_volume(ec2) for _ in range(2)]
    with LoopEbs(endpoint, REGION, tmp_path / "ebs", poll_interval=0.1) as ebs:
        for device, vol in zip(("/dev/sdf", "/dev/sdg"), vols, strict=True):
            ec2.attach_volume(VolumeId=vol, InstanceId=instance_id, Device=device)
        loops = [ebs.wait_for(vol, timeout=30) for vol in vols]
        assert len(set(loops)) == 2
    losetup = sh("losetup", "-a")
    assert all(vol not in losetup for vol in vols)  # by image: another test may reuse the devices
    assert not any(link_path(vol).is_symlink() for vol in vols)
    assert list((tmp_path / "ebs").iterdir()) == []
    for vol in vols:
        ec2.detach_volume(VolumeId=vol, InstanceId=instance_id)
        ec2.delete_volume(VolumeId=vol)


def test_start_cleans_what_a_killed_run_left_behind(endpoint, tmp_path):
    """An image, its loop device, a mount of it and its link left by a killed run are removed at start."""
    state = tmp_path / "ebs"
    state.mkdir()
    vol = "vol-" + os.urandom(9).hex()[:17]  # as AWS makes them: 17 hex digits
    image = state / f"{vol}.img"
    with open(image, "wb") as fh:
        fh.truncate(512 * 1024**2)
    loop_dev = sh("losetup", "-f", "--show", str(image)).strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("mkfs.xfs", "-q", loop_dev)
        sh("mount", loop_dev, str(mnt))
        link = link_path(vol)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(loop_dev)

        with LoopEbs(endpoint, REGION, state, poll_interval=0.1):
            assert not image.exists()
            assert not link.is_symlink()
            assert vol not in sh("losetup", "-a")  # by image: a test may reuse the device
            assert str(mnt) not in sh("findmnt", "-rn", "-o", "TARGET")
    finally:  # if LoopEbs failed to clean up, don't leak into the machine
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        for dev in loops_backed_by(image) if image.exists() else []:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        link_path(vol).unlink(missing_ok=True)


def test_only_reads_from_the_ec2_api(ebs, ec2, instance_id):
    """The emulator observes EC2; it never changes state there."""
    sent: list[str] = []
    ebs._client.meta.events.register("before-call.ec2", lambda model, **_: sent.append(model.name))
    vol = new_volume(ec2)
    ec2.attach_volume(VolumeId=vol, InstanceId=instance_id, Device="/dev/sdf")
    ebs.wait_for(vol, timeout=30)
    ec2.detach_volume(VolumeId=vol, InstanceId=instance_id)
    ebs.wait_for(vol, attached=False, timeout=30)
    ec2.delete_volume(VolumeId=vol)
    assert sent and set(sent) == {"DescribeVolumes"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"endpoint_url": "127.0.0.1:5000"}, "endpoint_url"),
        ({"region": ""}, "region"),
        ({"poll_interval": 0}, "poll_interval"),
    ],
)
def test_bad_input_is_refused_before_anything_is_created(tmp_path, kwargs, field):
    """A clear error naming the field, and no state directory made."""
    args = {"endpoint_url": "http://127.0.0.1:1", "region": REGION, "state_dir": tmp_path / "s"} | kwargs
    with pytest.raises(ValueError, match=field):
        LoopEbs(**args)
    assert not (tmp_path / "s").exists()


def test_link_path_refuses_a_non_volume_id():
    """The link name is derived only from a well-formed volume id."""
    with pytest.raises(ValueError, match="volume_id"):
        link_path("../../etc/passwd")


# -- snapshot content (EbsSnapshots) ----------------------------------------------------------------
MIB = 1024**2
#: offsets (bytes) of the test pattern: the start of the disk and far into it (a sparse region)
PATTERN_AT = (0, 700 * MIB)


def write_pattern(loop_dev: str, pattern: bytes) -> None:
    """Write ``pattern`` (1 MiB of it) at each offset of PATTERN_AT, through to the backing file."""
    fd = os.open(loop_dev, os.O_WRONLY)
    try:
        for offset in PATTERN_AT:
            os.pwrite(fd, pattern * (MIB // len(pattern)), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pattern(path: str | Path, length: int) -> list[bytes]:
    """The first ``length`` bytes at each offset of PATTERN_AT."""
    with open(path, "rb") as fh:
        return [os.pread(fh.fileno(), length, offset) for offset in PATTERN_AT]


@pytest.fixture
def snapshot_api(tmp_path: Path) -> Iterator[tuple[LocalEc2, EbsSnapshots, LoopEbs]]:
    """A local EC2 API keeping snapshot content, and a LoopEbs that starts volumes from it."""
    snapshots = EbsSnapshots(tmp_path / "snapshots")
    with LocalEc2(extensions=[snapshots]) as api:
        with LoopEbs(
            api.moto_url,
            api.region,
            tmp_path / "ebs",
            poll_interval=0.1,
            snapshots_dir=tmp_path / "snapshots",
        ) as ebs:
            yield api, snapshots, ebs
    assert list((tmp_path / "snapshots").iterdir()) == []  # close() removed every kept snapshot
    assert list((tmp_path / "ebs").glob("*.img")) == []


def test_a_snapshot_keeps_the_volume_as_it_was_and_a_volume_from_it_starts_as_that(snapshot_api):
    """CreateSnapshot copies the attached volume's bytes (point in time, sparse); a later write does
    not reach the snapshot; a bigger volume created from it shows the old bytes; DeleteSnapshot
    removes the copy."""
    api, snapshots, ebs = snapshot_api
    client = api.boto3_client(recorded=True)
    zone = f"{api.region}a"
    image = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    instance = client.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    vol = client.create_volume(Size=1, AvailabilityZone=zone)["VolumeId"]
    client.attach_volume(VolumeId=vol, InstanceId=instance, Device="/dev/sdf")
    loop_dev = ebs.wait_for(vol, timeout=30)
    write_pattern(loop_dev, b"old ")

    snap = client.create_snapshot(VolumeId=vol, Description="test")["SnapshotId"]
    kept = snapshot_image(snapshots.state_dir, snap)
    assert snapshots.content(snap) == kept
    assert kept.stat().st_size == 1024**3
    assert kept.stat().st_blocks * 512 < 64 * MIB  # sparse: only the written MiBs take space
    write_pattern(loop_dev, b"new ")
    assert read_pattern(loop_dev, 4) == [b"new ", b"new "]
    assert read_pattern(kept, 8) == [b"old old ", b"old old "]

    copy = client.create_volume(Size=2, AvailabilityZone=zone, SnapshotId=snap)["VolumeId"]
    client.attach_volume(VolumeId=copy, InstanceId=instance, Device="/dev/sdg")
    copy_dev = ebs.wait_for(copy, timeout=60)
    assert read_pattern(copy_dev, 8) == [b"old old ", b"old old "]
    assert int(sh("blockdev", "--getsize64", copy_dev)) == 2 * 1024**3  # grown to the volume's size
    write_pattern(copy_dev, b"mine")
    assert read_pattern(kept, 4) == [b"old ", b"old "]  # the snapshot is never written through

    client.delete_snapshot(SnapshotId=snap)
    assert not kept.exists() and snapshots.content(snap) is None
    assert [c["VolumeId"] for c in api.calls("CreateSnapshot")] == [vol]
    assert [c.get("SnapshotId") for c in api.calls("CreateVolume")] == [None, snap]
    assert [c["SnapshotId"] for c in api.calls("DeleteSnapshot")] == [snap]
    assert snapshots.errors == [] and ebs.errors == []
    for v in (vol, copy):
        client.detach_volume(VolumeId=v, InstanceId=instance)
        ebs.wait_for(v, attached=False, timeout=30)


def test_a_snapshot_of_a_volume_never_attached_here_has_no_content(snapshot_api):
    """No backing on this machine → nothing kept (a volume from it starts blank); reset removes all."""
    api, snapshots, ebs = snapshot_api
    client = api.boto3_client(recorded=True)
    vol = client.create_volume(Size=1, AvailabilityZone=f"{api.region}a")["VolumeId"]
    snap = client.create_snapshot(VolumeId=vol)["SnapshotId"]
    assert snapshots.content(snap) is None
    assert list(snapshots.state_dir.iterdir()) == []
    assert snapshots.errors == []

    other = snapshots.state_dir / "snap-0123456789abcdef0.img"
    other.write_bytes(b"x")  # as a killed run would leave it
    api.reset()
    assert not other.exists()


def test_snapshot_image_refuses_a_non_snapshot_id(tmp_path):
    """The content's file name comes only from a well-formed snapshot id."""
    with pytest.raises(ValueError, match="snapshot_id"):
        snapshot_image(tmp_path, "../vol-1.img")
