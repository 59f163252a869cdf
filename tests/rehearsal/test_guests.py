"""Instances of the local EC2 API that boot their AMI's own bytes (rehearsal.guests), through the EC2 API.

Real parts throughout: moto behind the local EC2 API with EbsSnapshots and Boxes(guests=...), LoopEbs
loop devices, qemu started by include/scripts/ec2-guest. The fast tests boot a one-sector disk that
writes a line to the serial console and spins (a real BIOS boot, no OS, so no SSH: the status checks
stay "initializing"); the slow one builds the Debian 12 image onto a volume attached through the API,
snapshots and registers it as the product does, launches it with a per-instance key and host key in
user data, waits for 2/2, logs in and runs instance-check. Needs root (loop devices, port 22).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from operators.rules.contract import CONTRACT
from operators.rules.launch import new_host_key, user_data
from rehearsal.boxes import Boxes, Login
from rehearsal.ebs import EbsSnapshots, LoopEbs
from rehearsal.ec2_local import LocalEc2, standard_extensions
from rehearsal.guests import CONSOLE_BYTES, GIB, Guests, root_snapshot, root_volume_size

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, sshd and qemu on port 22"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86"),
]
REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGE = REPO / "include" / "scripts" / "build-image"
INSTANCE_CHECK = REPO / "include" / "scripts" / "instance-check"
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


def expectations(stdout: str) -> dict[str, Any]:
    """The build's "expectations" progress event: what instance-check is told about the image (the
    login user, kernel arguments, baked host keys, SELinux), as the smoke operator gets it."""
    events = [
        json.loads(line[len(CONTRACT.progress_prefix) :])
        for line in stdout.splitlines()
        if line.startswith(CONTRACT.progress_prefix)
    ]
    found = [e for e in events if e.get("event") == "expectations"]
    assert found, "the build reported no expectations event"
    return found[-1]


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


# -- one real boot of the image we build (slow) ---------------------------------------------------------
@pytest.mark.slow
def test_the_debian_image_we_build_boots_through_the_ec2_api_and_passes_instance_check(
    api: Api, tmp_path: Path
) -> None:
    """Build Debian 12 on a volume attached through the API, freeze + CreateSnapshot + thaw, register it
    as RegisterHVMAmi does, RunInstances with a per-instance key and host key in #cloud-config and a root
    2 GiB above the AMI's; wait for 2/2, log in as the image's user (the build's expectations) verifying
    the host key, run instance-check with those expectations, as the smoke instance does:
    every item passes (the root grew, the hostname and key came from the metadata, IMDSv2 only ...)."""
    from rehearsal.sshd import package_cache, package_cache_env

    size_gib = 3
    box, vol, _ = canvas_on_a_box(api, size_gib)
    work = tmp_path / "work"
    build = ["bash", str(BUILD_IMAGE), "--recipe", "debian12", "--volume-id", vol,
             "--size-gib", str(size_gib), "--work-dir", str(work)]  # fmt: skip
    env = {**os.environ, **package_cache_env(package_cache())}
    try:
        res = subprocess.run([*build, "all"], capture_output=True, text=True, env=env, timeout=2400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        expect = expectations(res.stdout)
        subprocess.run([*build, "freeze"], capture_output=True, text=True, check=True, timeout=300)
        try:
            snapshot_started = time.monotonic()
            snap = api.client.create_snapshot(VolumeId=vol)["SnapshotId"]
            snapshot_s = time.monotonic() - snapshot_started  # with the copy of the canvas
        finally:
            subprocess.run([*build, "thaw"], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([*build, "abort"], capture_output=True, text=True, timeout=300)
        api.client.detach_volume(VolumeId=vol, InstanceId=box)
        api.ebs.wait_for(vol, attached=False, timeout=60)
    ami = register(api, snap, size_gib, "amibake-test-debian12")

    login = Login.new(expect["login_user"])
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(login.private_key_pem))
    host_key = new_host_key()
    started = time.monotonic()
    iid = api.client.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        UserData=user_data(f"{key.get_name()} {key.get_base64()} smoke", host_key),
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        BlockDeviceMappings=[{"DeviceName": ROOT, "Ebs": {"VolumeSize": size_gib + 2}}],
    )["Instances"][0]["InstanceId"]
    guest = api.guests.get(iid)
    try:
        api.client.get_waiter("instance_status_ok").wait(
            InstanceIds=[iid], WaiterConfig={"Delay": 5, "MaxAttempts": 180}
        )
    except Exception:
        pytest.fail("no 2/2 in 15 min; console:\n" + guest.console()[-4000:].decode(errors="replace"))
    status_ok = time.monotonic() - started
    address = api.client.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0][
        "PublicIpAddress"
    ]
    assert address == guest.address

    client = paramiko.SSHClient()
    key_type, key_b64 = host_key[1].split()[:2]
    client.get_host_keys().add(
        address, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            address, username=login.user, pkey=key, look_for_keys=False, allow_agent=False, timeout=30
        )
    except paramiko.SSHException as exc:
        pytest.fail(
            f"ssh {login.user}@{address}: {exc}; console:\n"
            + guest.console()[-6000:].decode(errors="replace")
        )
    logged_in = time.monotonic() - started
    check = ["sudo", "-n", "bash", "-s", "--", "--expect-cmdline", expect["cmdline"]]
    check += [arg for fp in expect["baked_host_keys"] for arg in ("--baked-host-key", fp)]
    check += ["--require-selinux"] if expect["require_selinux"] else []
    with client:
        stdin, stdout, stderr = client.exec_command(shlex.join(check), timeout=600)
        stdin.write(INSTANCE_CHECK.read_bytes())
        stdin.channel.shutdown_write()
        output = stdout.read().decode()
        rc = stdout.channel.recv_exit_status()
    items = [line for line in output.splitlines() if line.startswith("amibake-check: ")]
    kept = api.snapshots.content(snap)
    assert kept is not None
    print(
        f"\nCreateSnapshot of the {size_gib} GiB canvas with its copy: {snapshot_s:.1f} s "
        f"({kept.stat().st_blocks * 512 / 2**20:.0f} MiB allocated); guest {iid}: status ok after "
        f"{status_ok:.0f} s, ssh login after {logged_in:.0f} s (from RunInstances)\n{output}"
    )
    assert rc == 0, output + stderr.read().decode()
    assert items[-1].startswith("amibake-check: done: ") and " 0 failed" in items[-1]
    assert [i for i in items[:-1] if ": PASS: " not in i and ": not applicable: " not in i] == []
    passed = {i.split(": ")[1] for i in items if ": PASS: " in i}
    assert {"cloud-init", "root-grew", "hostname", "host-keys", "imdsv2-only"} <= passed
    console = console_output(api, iid)
    assert b"Linux version" in console or b"Cloud-init" in console
    assert (guest.dir / "imds.log").read_text().count(" token=yes") > 0  # cloud-init used IMDSv2

    api.client.terminate_instances(InstanceIds=[iid, box])
    assert guest.proc.poll() is not None
    assert not guest.disk.exists()
    assert processes_mentioning(str(guest.dir)) == []  # qemu and its metadata processes
