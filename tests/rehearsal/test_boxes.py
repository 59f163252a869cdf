"""The boxes behind the local EC2 API's instances (rehearsal.boxes), checked the way a user would.

Each test launches instances through a local EC2 API of its own with a real :class:`Boxes`, with the
product's own user data (``operators.build_box.user_data``), and logs in with paramiko. Needs root
(namespaces, bind mounts, sshd on port 22).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import paramiko
import pytest

from operators.rules.launch import new_host_key, user_data
from rehearsal.boxes import BOX_UID, NO_BOX_ADDRESS, Boxes, Login, default_user, parse_user_data
from rehearsal.ebs import attach_image, release_device
from rehearsal.ec2_local import LocalEc2
from rehearsal.sshd import PACKAGE_CACHE_ENV

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and sshd on port 22"),
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[LocalEc2, Boxes]]:
    """A local EC2 API whose boxes give every session a package cache variable."""
    boxes = Boxes(session_env={PACKAGE_CACHE_ENV: str(tmp_path / "packages")})
    with LocalEc2(extensions=[boxes]) as ec2:
        yield ec2, boxes


def _launch(ec2: LocalEc2, login: Login, image_name: str) -> tuple[str, tuple[str, str]]:
    """One instance with the product's user data; (instance id, its host key pair)."""
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(login.private_key_pem))
    host_key = new_host_key()
    run = ec2.boto3_client(recorded=True).run_instances(
        ImageId=ec2.register_base_image(image_name),
        MinCount=1,
        MaxCount=1,
        UserData=user_data(f"{key.get_name()} {key.get_base64()} amibake", host_key),
    )
    return run["Instances"][0]["InstanceId"], host_key


def _connect(address: str, host_key: str, user: str, pkey: paramiko.PKey) -> paramiko.SSHClient:
    """A client that trusts only ``host_key`` for ``address``."""
    client = paramiko.SSHClient()
    key_type, key_b64 = host_key.split()[:2]
    client.get_host_keys().add(
        address, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(address, username=user, pkey=pkey, look_for_keys=False, allow_agent=False, timeout=10)
    return client


def _out(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=30)
    return stdout.read().decode().strip()


def test_default_user_comes_from_the_base_image_name() -> None:
    assert default_user("CentOS Linux 7 x86_64 HVM EBS ENA 2002_01") == "centos"
    assert default_user("debian-12-amd64-20240717-1811") == "admin"
    assert default_user("amzn2-ami-hvm-2.0.2024") == "ec2-user"
    assert default_user("amibake-test-base") == "ec2-user"


def test_user_data_that_is_not_cloud_config_is_refused() -> None:
    with pytest.raises(ValueError, match="not #cloud-config"):
        parse_user_data(base64.b64encode(b"#!/bin/sh\nreboot\n").decode())
    assert parse_user_data("").authorized_keys == []


def test_a_box_is_the_instance_reached_on_its_ip_as_the_images_non_root_sudoer(
    api: tuple[LocalEc2, Boxes], tmp_path: Path
) -> None:
    ec2, boxes = api
    passwd_before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    login = Login.new("centos")
    instance_id, (_, host_key) = _launch(ec2, login, "CentOS Linux 7 x86_64 rehearsal")
    box = boxes.get(instance_id)
    # EC2 shows the box's own address as the instance's public and private IP
    described = ec2.boto3_client(recorded=True).describe_instances(InstanceIds=[instance_id])
    instance = described["Reservations"][0]["Instances"][0]
    assert instance["PublicIpAddress"] == instance["PrivateIpAddress"] == box.address
    assert box.address.startswith("127.") and box.address != "127.0.0.1"
    assert (box.login, box.host_key) == ("centos", host_key)  # the host key from the user data

    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(login.private_key_pem))
    with closing(_connect(box.address, host_key, "centos", pkey)) as client:
        assert _out(client, "id -un; id -u") == f"centos\n{BOX_UID}"
        assert _out(client, "sudo -n id -u") == "0"  # passwordless sudo, as cloud-init grants it
        # the package cache reaches the session (sshd SetEnv) AND the build run through sudo (env_keep)
        assert _out(client, f"printenv {PACKAGE_CACHE_ENV}") == str(tmp_path / "packages")
        assert _out(client, f"sudo -n printenv {PACKAGE_CACHE_ENV}") == str(tmp_path / "packages")
        with client.open_sftp() as sftp:
            assert sftp.normalize(".") == "/home/centos"  # SFTP lands in the non-root home
            sftp.mkdir("/var/tmp/amibake", mode=0o700)
            sftp.putfo(io.BytesIO(b"shipped\n"), "/var/tmp/amibake/build-image")
    shipped = box.path("/var/tmp/amibake/build-image")
    assert shipped.read_bytes() == b"shipped\n" and shipped.stat().st_uid == BOX_UID
    assert not Path("/var/tmp/amibake/build-image").exists(), "the box has its own /var/tmp"
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd_before

    # only the image's user with the connection's key: not another key, not a password, not root
    for user, key in (("centos", paramiko.RSAKey.generate(2048)), ("root", pkey)):
        with pytest.raises(paramiko.AuthenticationException):
            _connect(box.address, host_key, user, key).close()
    with closing(paramiko.Transport((box.address, 22))) as transport:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType):
            transport.auth_password("centos", "password")


def test_terminate_ends_every_process_and_mount_of_the_box_at_once(api: tuple[LocalEc2, Boxes]) -> None:
    ec2, boxes = api
    login = Login.new("admin")
    instance_id, (_, host_key) = _launch(ec2, login, "debian-12-amd64-rehearsal")
    box = boxes.get(instance_id)
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(login.private_key_pem))
    client = _connect(box.address, host_key, "admin", pkey)
    # a "build" through sudo: detached from the session, with a mount only the box sees
    _out(client, "sudo -n mkdir -p /var/tmp/m && sudo -n mount -t tmpfs amibake-box-tmpfs /var/tmp/m")
    _out(client, "sudo -n setsid sh -c 'sleep 600 & sleep 600' </dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 10
    while len(box.pids()) < 5 and time.monotonic() < deadline:  # sshd, session, sudo'd sh, 2 sleeps
        time.sleep(0.1)
    assert len(box.pids()) >= 5 and "/var/tmp/m" in box.mounts()
    assert "amibake-box-tmpfs" not in Path("/proc/self/mountinfo").read_text(), "the host never sees it"

    started = time.monotonic()
    ec2.boto3_client(recorded=True).terminate_instances(InstanceIds=[instance_id])
    took = time.monotonic() - started
    client.close()
    assert box.pids() == [] and box.mounts() == [] and not box.alive
    assert took < 5, f"TerminateInstances took {took:.1f} s to end the box"
    with pytest.raises((OSError, paramiko.SSHException)):
        _connect(box.address, host_key, "admin", pkey).close()


def test_a_box_never_keeps_a_filesystem_the_host_unmounts_busy(
    api: tuple[LocalEc2, Boxes], tmp_path: Path
) -> None:
    """A box's namespace starts as a copy of this machine's mounts. A loop-backed filesystem mounted
    then (another test's build, here at a path with a space) is not in the box, so once the host
    unmounts it the device opens exclusively at once (CI: ``wipefs`` on such a partition failed with
    EBUSY, and its loop device stayed bound after ``losetup -d``)."""
    ec2, boxes = api
    image = tmp_path / "other-build.img"
    with open(image, "wb") as fh:
        fh.truncate(64 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    mountpoint = tmp_path / "other build"
    mountpoint.mkdir()
    loop_dev = attach_image(image)
    try:
        subprocess.run(["mount", loop_dev, str(mountpoint)], check=True)
        instance_id, _ = _launch(ec2, Login.new("admin"), "debian-12-amd64-rehearsal")
        box = boxes.get(instance_id)
        assert box.alive and "/var/tmp" in box.mounts()
        assert not [m for m in box.mounts() if m.startswith(str(tmp_path))], box.mounts()
        subprocess.run(["umount", str(mountpoint)], check=True)
        fd = os.open(loop_dev, os.O_RDONLY | os.O_EXCL)  # EBUSY while any namespace still mounts it
        os.close(fd)
    finally:
        release_device(loop_dev)


def test_an_instance_without_a_box_is_never_shown_at_the_internet_address_moto_made_up(
    api: tuple[LocalEc2, Boxes],
) -> None:
    """An instance whose box did not start (here: launched in moto behind the local API's back) is
    shown at a loopback address nothing answers on: a client once waited 15 min on a real host's
    port 22 at moto's made-up public address."""
    ec2, _ = api
    image = ec2.register_base_image("debian-12-amd64-rehearsal")
    (made,) = ec2.moto_client().run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"]
    assert made["PublicIpAddress"] != NO_BOX_ADDRESS  # what moto itself answers
    described = ec2.boto3_client(recorded=True).describe_instances(InstanceIds=[made["InstanceId"]])
    shown = described["Reservations"][0]["Instances"][0]
    assert shown["PublicIpAddress"] == shown["PrivateIpAddress"] == NO_BOX_ADDRESS
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((NO_BOX_ADDRESS, 22), timeout=5).close()


def test_boxes_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    """A harness killed with SIGKILL (no clean-up at all) leaves no box running."""
    script = textwrap.dedent(
        """
        import sys, time
        from rehearsal.boxes import Boxes
        from rehearsal.ec2_local import LocalEc2
        boxes = Boxes()
        ec2 = LocalEc2(extensions=[boxes]).start()
        run = ec2.boto3_client(recorded=True).run_instances(
            ImageId=ec2.register_base_image("amibake-test-base"), MinCount=1, MaxCount=1)
        box = boxes.get(run["Instances"][0]["InstanceId"])
        print(box.init_pid, box.dir, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    box_dir = ""
    try:
        init_pid, box_dir = proc.stdout.readline().split()
        assert Path(f"/proc/{init_pid}").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{init_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{init_pid}").exists(), "the box outlived its harness"
    finally:
        proc.kill()
        proc.wait()
        if box_dir:  # a killed harness leaves the box's files (the rehearsal's next run removes them)
            shutil.rmtree(box_dir, ignore_errors=True)


def test_session_variables_sshd_cannot_carry_verbatim_are_refused(tmp_path: Path) -> None:
    for bad in ({PACKAGE_CACHE_ENV: str(tmp_path / "two words")}, {"lower": "1"}, {"X": "a\nb"}):
        with pytest.raises(ValueError, match="session variable"):
            Boxes(session_env=bad)
    with pytest.raises(ValueError, match="box dirs cannot live"):
        Boxes(parent_dir=Path("/var/tmp/boxes"))
