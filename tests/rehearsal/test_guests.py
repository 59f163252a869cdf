"""Instances of the local EC2 API that boot their AMI's own bytes (rehearsal.guests), through the EC2 API.

Real parts throughout: moto behind the local EC2 API with EbsSnapshots and Boxes(guests=...), LoopEbs
loop devices, qemu started by include/scripts/ec2-guest. The fast tests boot a one-sector disk that
writes a line to the serial console and spins (a real BIOS boot, no OS, so no SSH: the status checks
stay "initializing"). The boot of a real image we built, to 2/2, SSH and every instance-check item,
is the green night's smoke instance (tests/e2e/test_green_night.py), which goes the same way through
the API. Needs root (loop devices, port 22).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rehearsal.boxes import Boxes
from rehearsal.ebs import EbsSnapshots, LoopEbs
from rehearsal.ec2_local import LocalEc2, standard_extensions
from rehearsal.guests import CONSOLE_BYTES, GIB, Guests, root_snapshot, root_volume_size

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, sshd and qemu on port 22"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86"),
]
REPO = Path(__file__).resolve().parents[2]
IMDS = REPO / "include" / "scripts" / "lib" / "imds.py"
ROOT = "/dev/sda1"  # operators.defaults.ROOT_DEVICE_NAME, what RegisterHVMAmi registers
BOOT_LINE = b"amibake test boot sector on COM1"


def boot_sector(message: bytes) -> bytes:
    """A BIOS boot sector that writes ``message`` to COM1 (the serial console) and then spins."""
    code = bytes.fromhex(
        "31c0"  # xor ax, ax
        "8ed8"  # mov ds, ax
        "fc"  # cld
        "be157c"  # mov si, 0x7c15 (the message, right after this code)
        "baf803"  # mov dx, 0x3f8 (COM1)
        "ac"  # next: lodsb
        "08c0"  # or al, al
        "7403"  # jz done
        "ee"  # out dx, al
        "ebf8"  # jmp next
        "ebfe"  # done: jmp done
    )
    sector = code + message + b"\r\n\0"
    return sector.ljust(510, b"\0") + b"\x55\xaa"


@dataclass
class Api:
    """A local EC2 API that keeps snapshot content and boots its AMIs, with LoopEbs behind it."""

    ec2: LocalEc2
    client: Any
    snapshots: EbsSnapshots
    guests: Guests
    boxes: Boxes
    ebs: LoopEbs


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """Everything stops (guests, boxes, loop devices, kept snapshots) even when the test fails."""
    snapshots = EbsSnapshots(tmp_path / "snapshots")
    guests = Guests(snapshots, parent_dir=tmp_path)
    boxes = Boxes(parent_dir=tmp_path, guests=guests)
    extensions = standard_extensions(
        snapshots=snapshots, boxes=boxes, consistency_s=0, snapshot_s=0, linger_s=0
    )
    with LocalEc2(extensions=extensions) as ec2:
        with LoopEbs(
            ec2.moto_url,
            ec2.region,
            tmp_path / "ebs",
            poll_interval=0.1,
            snapshots_dir=tmp_path / "snapshots",
        ) as ebs:
            yield Api(ec2, ec2.boto3_client(recorded=True), snapshots, guests, boxes, ebs)
    assert snapshots.errors == [] and ebs.errors == []
    assert list(tmp_path.glob("amibake-sshd-*")) == []  # every box and guest dir removed
    assert list((tmp_path / "snapshots").iterdir()) == []


def canvas_on_a_box(api: Api, size_gib: int) -> tuple[str, str, str]:
    """A volume attached through the API to an instance of a base image (a box), backed by a loop
    device; returns (instance id, volume id, loop device)."""
    base = api.ec2.register_base_image("debian-12-amd64-base")
    box = api.client.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    zone = api.client.describe_instances(InstanceIds=[box])["Reservations"][0]["Instances"][0]["Placement"]
    vol = api.client.create_volume(Size=size_gib, AvailabilityZone=zone["AvailabilityZone"])["VolumeId"]
    api.client.attach_volume(VolumeId=vol, InstanceId=box, Device="/dev/sdf")
    return box, vol, api.ebs.wait_for(vol, timeout=60) or ""


def register(api: Api, snapshot_id: str, size_gib: int, name: str) -> str:
    """RegisterImage with the product's own parameters (operators.ami)."""
    from operators.ami import register_image_args

    args = register_image_args(
        name=name, snapshot_id=snapshot_id, size_gib=size_gib, description=name, tags=[]
    )
    args.pop("TagSpecifications")
    return api.client.register_image(**args)["ImageId"]


def instance_status(api: Api, instance_id: str) -> tuple[str, str]:
    """(instance check, system check) as DescribeInstanceStatus reports them."""
    statuses = api.client.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"]
    return statuses[0]["InstanceStatus"]["Status"], statuses[0]["SystemStatus"]["Status"]


def imds_get(state_dir: Path, path: str) -> str:
    """GET latest/meta-data/PATH from lib/imds.py on a guest's state dir, with an IMDSv2 token, on one
    connection as the guest's would be (stdin/stdout, as qemu's guestfwd runs it)."""
    put = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
    tok = subprocess.run(
        [sys.executable, str(IMDS), str(state_dir)], input=put.encode(), capture_output=True, check=True
    ).stdout.split(b"\r\n\r\n", 1)[1]
    get = f"GET /latest/meta-data/{path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {tok.decode()}\r\n\r\n"
    out = subprocess.run(
        [sys.executable, str(IMDS), str(state_dir)], input=get.encode(), capture_output=True, check=True
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


def console_output(api: Api, instance_id: str) -> bytes:
    """GetConsoleOutput's Output (botocore already decodes its base64, as for AWS's answer)."""
    return api.client.get_console_output(InstanceId=instance_id).get("Output", "").encode()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def test_root_volume_size_comes_from_the_launch_then_the_ami_then_the_snapshot(tmp_path: Path) -> None:
    """RunInstances' mapping of the root device wins over the AMI's; a snapshot's size rounds up."""
    content = tmp_path / "snap.img"
    with open(content, "wb") as fh:
        fh.truncate(GIB + 1)
    image = {
        "RootDeviceName": ROOT,
        "BlockDeviceMappings": [{"DeviceName": ROOT, "Ebs": {"SnapshotId": "snap-0abc", "VolumeSize": 3}}],
    }
    launch = {
        "BlockDeviceMapping.1.DeviceName": "/dev/sdf",
        "BlockDeviceMapping.1.Ebs.VolumeSize": "9",
        "BlockDeviceMapping.2.DeviceName": ROOT,
        "BlockDeviceMapping.2.Ebs.VolumeSize": "5",
    }
    assert root_volume_size(image, launch, content) == 5
    assert root_volume_size(image, {}, content) == 3
    assert root_volume_size({"RootDeviceName": ROOT}, {}, content) == 2
    assert root_snapshot(image) == "snap-0abc"
    assert root_snapshot({"RootDeviceName": ROOT, "BlockDeviceMappings": []}) == ""


def test_an_ami_of_a_kept_snapshot_boots_its_own_bytes_the_way_ec2_does(api: Api) -> None:
    """Two instances of one AMI whose snapshot we took: each a qemu on its own overlay (the launch's
    root size), NVMe serial = its root volume id, SMBIOS EC2 + instance type, metadata from moto, SSH
    forwarded from the address the API reports; status "initializing" while no sshd answers,
    "impaired" once the machine died; the console through GetConsoleOutput; terminate leaves nothing."""
    box, vol, loop_dev = canvas_on_a_box(api, 1)
    with open(loop_dev, "r+b") as disk:
        disk.write(boot_sector(BOOT_LINE))
        disk.flush()
        os.fsync(disk.fileno())
    snap = api.client.create_snapshot(VolumeId=vol)["SnapshotId"]
    content = api.snapshots.content(snap)
    assert content is not None
    ami = register(api, snap, 1, "amibake-test-bootsector")
    run = api.client.run_instances(
        ImageId=ami,
        MinCount=2,
        MaxCount=2,
        InstanceType="t3.small",
        UserData="#cloud-config\n{}\n",
        BlockDeviceMappings=[{"DeviceName": ROOT, "Ebs": {"VolumeSize": 3}}],
    )
    assert len(api.boxes.boxes) == 1  # only the base image's instance is a box
    ids = [i["InstanceId"] for i in run["Instances"]]
    guests = [api.guests.get(i) for i in ids]
    described = {
        i["InstanceId"]: i
        for r in api.client.describe_instances(InstanceIds=ids)["Reservations"]
        for i in r["Instances"]
    }
    for launched, guest in zip(run["Instances"], guests, strict=True):
        instance = described[guest.instance_id]
        assert launched["PrivateIpAddress"] == launched["PublicIpAddress"] == guest.address
        assert instance["PrivateIpAddress"] == instance["PublicIpAddress"] == guest.address
        root_volume = next(
            m["Ebs"]["VolumeId"] for m in instance["BlockDeviceMappings"] if m["DeviceName"] == ROOT
        )
        assert guest.volume_id == root_volume
        qemu = Path(f"/proc/{guest.proc.pid}/cmdline").read_bytes().split(b"\0")  # the launcher became qemu
        assert qemu[0].endswith(b"qemu-system-x86_64")
        args = b" ".join(qemu).decode()
        assert f"nvme,drive=root,serial={root_volume.replace('-', '')},bootindex=0" in args
        assert "type=1,manufacturer=Amazon EC2,product=t3.small,serial=ec2" in args
        assert f"hostfwd=tcp:{guest.address}:22-:22" in args
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", str(guest.disk)], capture_output=True, check=True
        ).stdout)  # fmt: skip
        assert info["virtual-size"] == 3 * GIB and info["backing-filename"] == str(content)
        metadata = json.loads((guest.dir / "imds.json").read_text())
        assert metadata["instance_id"] == guest.instance_id and metadata["ami_id"] == ami
        assert metadata["instance_type"] == "t3.small"
        assert metadata["availability_zone"] == instance["Placement"]["AvailabilityZone"]
        assert metadata["mac"] == instance["NetworkInterfaces"][0]["MacAddress"]
        assert metadata["local_hostname"] == instance["PrivateDnsName"]
        assert metadata["user_data"] == "#cloud-config\n{}\n"
        assert metadata["public_key"] == ""  # no key pair
        assert f"mac={metadata['mac']}" in args
        assert imds_get(guest.dir, "instance-id") == guest.instance_id  # lib/imds.py serves it, IMDSv2
        assert imds_get(guest.dir, "placement/availability-zone") == instance["Placement"]["AvailabilityZone"]
        assert "public-keys/" not in imds_get(guest.dir, "").split("\n")  # no key pair: no public-keys/

    first, second = guests
    assert instance_status(api, first.instance_id) == ("initializing", "initializing")
    deadline = time.monotonic() + 120
    console = b""
    while BOOT_LINE not in console and time.monotonic() < deadline:
        time.sleep(1)
        console = console_output(api, first.instance_id)
    assert BOOT_LINE in console
    assert instance_status(api, first.instance_id) == ("initializing", "initializing")  # no SSH: never ok

    os.kill(first.proc.pid, 9)  # the machine dies on its own (as a panic with -no-reboot would)
    first.proc.wait(timeout=30)
    assert instance_status(api, first.instance_id) == ("impaired", "ok")

    api.client.terminate_instances(InstanceIds=[second.instance_id])
    assert second.proc.poll() is not None
    assert not second.disk.exists()
    assert processes_mentioning(str(second.dir)) == []
    instance = api.client.describe_instances(InstanceIds=[second.instance_id])["Reservations"][0][
        "Instances"
    ][0]
    assert instance.get("PublicIpAddress") != second.address
    assert api.client.describe_instance_status(InstanceIds=[second.instance_id])["InstanceStatuses"] == []
    assert api.ec2.calls("TerminateInstances") == [{"InstanceId.1": second.instance_id}]
    api.client.detach_volume(VolumeId=vol, InstanceId=box)
    api.ebs.wait_for(vol, attached=False, timeout=30)
    api.client.terminate_instances(InstanceIds=[first.instance_id, box])


def test_an_ami_not_ours_still_gets_a_box(api: Api) -> None:
    """A base image (no kept snapshot content) launches as an sshd box, even with guests configured."""
    base = api.ec2.register_base_image("debian-12-amd64-other")
    iid = api.client.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    assert api.boxes.get(iid).alive
    assert api.guests.guests == []
    api.client.terminate_instances(InstanceIds=[iid])


def test_the_console_is_the_last_64_kib(tmp_path: Path) -> None:
    """GetConsoleOutput gives the most recent 64 KiB, as AWS does."""
    from rehearsal.guests import Guest

    guest = Guest("i-0123456789abcdef0", "127.0.0.2", tmp_path, "vol-0123456789abcdef0", 1)
    guest.serial.write_bytes(b"a" * 10 + b"b" * CONSOLE_BYTES)
    assert guest.console() == b"b" * CONSOLE_BYTES
