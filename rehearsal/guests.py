"""Instances of the local EC2 API that boot an AMI's own bytes under qemu, as EC2 boots them.

When ``RunInstances`` launches an AMI whose root-device snapshot has content in
:class:`rehearsal.ebs.EbsSnapshots` (an AMI this rehearsal built and registered), the instance is not
an sshd box (:mod:`rehearsal.boxes`, which dispatches here) but a GUEST:

- its root disk is a qcow2 overlay backed by the snapshot's raw copy (never written), of the root
  volume's size: the RunInstances ``BlockDeviceMapping`` VolumeSize of the root device if given, else
  the AMI's, so growpart has work when the launch asks for a bigger root;
- qemu is started by ``include/scripts/ec2-guest``, the command line the on-box boot check uses too:
  NVMe root disk whose serial is the root volume id moto reports (DescribeInstances), SMBIOS "Amazon
  EC2" with the instance type as product, IMDSv2 (``lib/imds.py``) serving the instance's metadata
  from moto (instance id and type, AMI, reservation, account, AZ, region, MAC, interface, subnet,
  VPC, security groups, key pair, RunInstances user data);
- the guest's port 22 is forwarded from a free loopback address (``127.x.y.z:22``), which
  RunInstances and DescribeInstances report as its public and private IP;
- ``DescribeInstanceStatus``: both checks ``initializing`` until that port answers with an SSH banner,
  then ``ok``/``ok`` (as on AWS: 2/2 once the OS is up); ``impaired`` if qemu ended on its own (a
  panic or a reboot: ``-no-reboot``);
- ``GetConsoleOutput``: the last 64 KiB of the guest's serial console, base64, as AWS returns it;
- ``TerminateInstances`` kills qemu and the metadata processes it started (its process group) and
  removes the overlay; the console and metadata logs stay until :meth:`Guests.reset` /
  :meth:`Guests.close`, which stop every guest and remove its dir. qemu also dies with the process
  that started it (``PR_SET_PDEATHSIG``), so a killed rehearsal leaves no guest running.

Differences from EC2 that remain: inside the guest the NIC address is qemu's ``169.254.0.15`` (the
metadata's ``local-ipv4``), not the address the API reports; the hostname is the ``PrivateDnsName``
moto reports; 1 GiB and 2 vCPUs whatever the instance type, and qemu's x86-64 baseline CPU
(``ec2-guest`` says why); no reboot / stop / start.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rehearsal.ebs import EbsSnapshots
from rehearsal.sshd import WORK_DIR_PREFIX, die_with_parent

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: The EC2-like qemu launcher the on-box boot check uses too.
LAUNCHER = REPO / "include" / "scripts" / "ec2-guest"
#: The address qemu's DHCP gives the guest (its user network is 169.254.0.0/16): the metadata's local-ipv4.
GUEST_IPV4 = "169.254.0.15"
SSH_PORT = 22
#: GetConsoleOutput returns the most recent 64 KiB of the console, as on AWS.
CONSOLE_BYTES = 64 * 1024
GIB = 1024**3
START_ATTEMPTS = 5
LISTEN_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
BANNER_TIMEOUT_S = 3.0


@dataclass
class Guest:
    """One instance booted from its AMI's bytes: where its SSH is forwarded from, its files, its qemu."""

    instance_id: str
    address: str
    dir: Path
    volume_id: str
    size_gib: int
    proc: subprocess.Popen[bytes] | None = None
    #: the SSH banner was seen once: status checks pass from then on
    reachable: bool = False

    @property
    def alive(self) -> bool:
        """Whether qemu still runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def disk(self) -> Path:
        """The root disk (qcow2 overlay of the snapshot)."""
        return self.dir / "disk.qcow2"

    @property
    def serial(self) -> Path:
        """The serial console log."""
        return self.dir / "serial.log"

    def console(self) -> bytes:
        """The last :data:`CONSOLE_BYTES` of the serial console."""
        try:
            with open(self.serial, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - CONSOLE_BYTES))
                return fh.read()
        except OSError:
            return b""

    def ssh_banner(self) -> bool:
        """True once the guest's sshd answers on the forwarded port (remembered: checks stay passed)."""
        if not self.reachable and self.alive:
            try:
                with socket.create_connection((self.address, SSH_PORT), timeout=BANNER_TIMEOUT_S) as s:
                    s.settimeout(BANNER_TIMEOUT_S)
                    self.reachable = s.recv(64).startswith(b"SSH-")
            except OSError:
                pass
        return self.reachable


def root_volume_size(image: dict[str, Any], params: dict[str, str], content: Path) -> int:
    """GiB of an instance's root volume: RunInstances' mapping of the root device, else the AMI's,
    else the snapshot's size (rounded up)."""
    root = image.get("RootDeviceName", "")
    n = 1
    while f"BlockDeviceMapping.{n}.DeviceName" in params:
        if params[f"BlockDeviceMapping.{n}.DeviceName"] == root:
            size = params.get(f"BlockDeviceMapping.{n}.Ebs.VolumeSize")
            if size:
                return int(size)
        n += 1
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == root and mapping.get("Ebs", {}).get("VolumeSize"):
            return int(mapping["Ebs"]["VolumeSize"])
    return -(-content.stat().st_size // GIB)


def root_snapshot(image: dict[str, Any]) -> str:
    """The snapshot id of an AMI's root device ('' if it has none)."""
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == image.get("RootDeviceName"):
            return str(mapping.get("Ebs", {}).get("SnapshotId", ""))
    return ""


def instance_metadata(
    instance: dict[str, Any], reservation: dict[str, Any], moto: Any, user_data: str
) -> dict[str, str]:
    """imds.json (the fields lib/imds.py serves) of an instance, from what moto knows of it."""
    iface = (instance.get("NetworkInterfaces") or [{}])[0]
    groups = instance.get("SecurityGroups") or iface.get("Groups") or []
    subnet_cidr = ""
    if instance.get("SubnetId"):
        subnets = moto.describe_subnets(SubnetIds=[instance["SubnetId"]])["Subnets"]
        subnet_cidr = subnets[0]["CidrBlock"] if subnets else ""
    key_name = instance.get("KeyName", "")
    public_key = ""
    if key_name:
        pairs = moto.describe_key_pairs(KeyNames=[key_name], IncludePublicKey=True)["KeyPairs"]
        public_key = pairs[0].get("PublicKey", "").strip() if pairs else ""
    zone = instance["Placement"]["AvailabilityZone"]
    mac = iface.get("MacAddress") or "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    return {
        "instance_id": instance["InstanceId"],
        "instance_type": instance["InstanceType"],
        "ami_id": instance["ImageId"],
        "reservation_id": reservation["ReservationId"],
        "account_id": reservation["OwnerId"],
        "region": moto.meta.region_name,
        "availability_zone": zone,
        "local_ipv4": GUEST_IPV4,
        "local_hostname": instance.get("PrivateDnsName") or f"ip-{GUEST_IPV4.replace('.', '-')}.ec2.internal",
        "mac": mac,
        "eni_id": iface.get("NetworkInterfaceId", ""),
        "subnet_id": instance.get("SubnetId", ""),
        "vpc_id": instance.get("VpcId", ""),
        "subnet_cidr": subnet_cidr or "169.254.0.0/16",
        "security_group": "\n".join(g["GroupName"] for g in groups),
        "security_group_id": "\n".join(g["GroupId"] for g in groups),
        "pending_time": instance["LaunchTime"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key_name": key_name,
        "public_key": public_key,
        "user_data": user_data,
    }


class Guests:
    """The instances that boot their AMI's bytes (see the module doc); :class:`rehearsal.boxes.Boxes`
    dispatches to it.

    :param snapshots: the EBS snapshots extension whose kept content makes an AMI bootable here.
    :param parent_dir: where guest dirs are made (default: the system temp dir); named like box dirs
        (``WORK_DIR_PREFIX``), so a rehearsal's next run removes what a killed one left.
    """

    def __init__(self, snapshots: EbsSnapshots, *, parent_dir: Path | None = None) -> None:
        if not LAUNCHER.is_file():
            raise FileNotFoundError(f"the qemu launcher {LAUNCHER} is missing")
        self.snapshots = snapshots
        self.parent_dir = parent_dir
        self._guests: dict[str, Guest] = {}
        self._lock = threading.Lock()

    def content_of(self, image: dict[str, Any]) -> Path | None:
        """The kept content of an AMI's root snapshot: the AMI boots here as a guest (else None)."""
        return self.snapshots.content(root_snapshot(image))

    def get(self, instance_id: str) -> Guest:
        """The guest of an instance (KeyError if the instance has none)."""
        with self._lock:
            return self._guests[instance_id]

    @property
    def guests(self) -> list[Guest]:
        """Every guest started since the last reset, oldest first."""
        with self._lock:
            return list(self._guests.values())

    def address(self, instance_id: str) -> str | None:
        """The forwarded SSH address of a running guest (None for no guest, or one that ended)."""
        with self._lock:
            guest = self._guests.get(instance_id)
        return guest.address if guest is not None and guest.alive else None

    # -- launching ----------------------------------------------------------------------------
    def start(
        self, instance_id: str, image: dict[str, Any], content: Path, params: dict[str, str], moto: Any
    ) -> Guest:
        """Make the root disk and metadata of a launched instance and start its qemu (call it from a
        long-lived thread: the parent-death signal follows the thread that forks)."""
        reservation = moto.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        instance = reservation["Instances"][0]
        root = image.get("RootDeviceName", "")
        volume_id = next(
            (
                m["Ebs"]["VolumeId"]
                for m in instance.get("BlockDeviceMappings", [])
                if m.get("DeviceName") == root and m.get("Ebs", {}).get("VolumeId")
            ),
            "",
        )
        if not volume_id:
            raise RuntimeError(f"{instance_id}: moto reports no root volume at {root!r}: cannot boot it")
        size_gib = root_volume_size(image, params, content)
        if size_gib * GIB < content.stat().st_size:
            raise RuntimeError(f"{instance_id}: root volume of {size_gib} GiB is smaller than its snapshot")
        user_data = base64.b64decode(params.get("UserData", "")).decode("utf-8", errors="replace")
        guest_dir = Path(tempfile.mkdtemp(prefix=f"{WORK_DIR_PREFIX}{instance_id}-", dir=self.parent_dir))
        guest = Guest(instance_id, "", guest_dir, volume_id, size_gib)
        try:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 f"backing_file={content},backing_fmt=raw", str(guest.disk), str(size_gib * GIB)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            metadata = instance_metadata(instance, reservation, moto, user_data)
            (guest_dir / "imds.json").write_text(json.dumps(metadata, indent=1) + "\n")
            (guest_dir / "imds-secret").write_text(secrets.token_hex(32))
            (guest_dir / "user-data").write_text(user_data)
            self._boot(guest)
        except BaseException:
            _stop(guest)
            shutil.rmtree(guest_dir, ignore_errors=True)
            raise
        with self._lock:
            self._guests[instance_id] = guest
        log.info("guest of %s: %s GiB root %s, ssh on %s:22", instance_id, size_gib, volume_id, guest.address)
        return guest

    def _boot(self, guest: Guest) -> None:
        """Start qemu through the launcher on a free loopback address (another one if it is taken)."""
        from rehearsal.boxes import free_box_address

        last_error = ""
        for _ in range(START_ATTEMPTS):
            guest.address = free_box_address()
            argv = [
                "bash", str(LAUNCHER), "--foreground", "--disk", str(guest.disk),
                "--volume-id", guest.volume_id, "--state-dir", str(guest.dir),
                "--ssh", f"{guest.address}:{SSH_PORT}", "--serial", str(guest.serial),
            ]  # fmt: skip
            with open(guest.dir / "launcher.log", "wb") as out:
                guest.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: qemu and its metadata processes
                    preexec_fn=die_with_parent,  # noqa: PLW1509 - only async-signal-safe work (one prctl)
                )
            if _listening(guest):
                return
            _stop(guest)
            last_error = " ".join(
                p.read_text(errors="replace").strip()
                for p in (guest.dir / "launcher.log", guest.dir / "qemu.err")
                if p.exists()
            )
        raise RuntimeError(f"qemu of {guest.instance_id} did not start: {last_error[-2000:]}")

    # -- the EC2 API ----------------------------------------------------------------------------
    def rewrite(self, action: str, body: bytes) -> bytes:
        """Show the guests' status checks (DescribeInstanceStatus) and console (GetConsoleOutput)."""
        if action not in ("DescribeInstanceStatus", "GetConsoleOutput") or not self.guests:
            return body
        root = ET.fromstring(body)
        changed = False
        if action == "DescribeInstanceStatus":
            for item in (i for e in root.iter() if _local(e.tag) == "instanceStatusSet" for i in e):
                guest = self._guest_of(_child(item, "instanceId"))
                if guest is not None and _child(_find(item, "instanceState"), "name") == "running":
                    _set_status(item, *_checks(guest))
                    changed = True
        else:
            guest = self._guest_of(_child(root, "instanceId"))
            if guest is not None:
                output = _find(root, "output")
                console = guest.console()
                if output is None and console:
                    output = ET.SubElement(root, _qualified(root, "output"))
                if output is not None:
                    if console:
                        output.text = base64.b64encode(console).decode()
                    else:  # AWS leaves Output out while the console is empty
                        root.remove(output)
                    changed = True
        if not changed:
            return body
        namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
        ET.register_namespace("", namespace)
        return ET.tostring(root, xml_declaration=True, encoding="utf-8")

    def _guest_of(self, instance_id: str) -> Guest | None:
        with self._lock:
            return self._guests.get(instance_id)

    # -- ending ---------------------------------------------------------------------------------
    def terminate(self, instance_id: str) -> None:
        """Power the guest off (qemu and its metadata processes) and remove its disk (no-op if none)."""
        guest = self._guest_of(instance_id)
        if guest is not None:
            _stop(guest)
            guest.disk.unlink(missing_ok=True)

    def reset(self) -> None:
        """Stop every guest and remove its dir (``LocalEc2.reset``)."""
        with self._lock:
            guests = list(self._guests.values())
            self._guests.clear()
        for guest in guests:
            _stop(guest)
            shutil.rmtree(guest.dir, ignore_errors=True)

    def close(self) -> None:
        """Stop everything (``LocalEc2.stop``); safe to call twice."""
        self.reset()


def _checks(guest: Guest) -> tuple[str, str, str]:
    """(instance status, system status, reachability detail) of a running guest."""
    if not guest.alive:
        return "impaired", "ok", "failed"
    if guest.ssh_banner():
        return "ok", "ok", "passed"
    return "initializing", "initializing", "initializing"


def _set_status(item: ET.Element, instance: str, system: str, detail: str) -> None:
    """Rewrite an instanceStatusSet item's two checks: each one's status and its reachability detail."""
    for name, status in (("instanceStatus", instance), ("systemStatus", system)):
        check = _find(item, name)
        if check is None:
            continue
        own = _find(check, "status")
        if own is not None:
            own.text = status
        details = _find(check, "details")
        for detail_item in details if details is not None else []:
            detail_status = _find(detail_item, "status")
            if detail_status is not None:
                detail_status.text = "passed" if status == "ok" else detail


def _listening(guest: Guest) -> bool:
    """Wait until qemu listens on the guest's forwarded port (True) or exited (False)."""
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while time.monotonic() < deadline and guest.alive:
        try:
            with socket.create_connection((guest.address, SSH_PORT), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(guest: Guest) -> None:
    """SIGKILL the guest's process group (qemu, the launcher it replaced, the metadata processes)."""
    if guest.proc is None:
        return
    was_running = guest.alive
    try:  # also when qemu ended on its own: a metadata process may still be there
        os.killpg(guest.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        guest.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        guest.proc.kill()
        guest.proc.wait(timeout=STOP_TIMEOUT_S)
    if was_running:
        log.info("guest of %s at %s stopped", guest.instance_id, guest.address)


def _local(tag: str) -> str:
    """An element's tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def _qualified(root: ET.Element, name: str) -> str:
    """``name`` in the namespace of ``root``."""
    return root.tag.split("}", 1)[0] + "}" + name if root.tag.startswith("{") else name


def _find(elem: ET.Element | None, name: str) -> ET.Element | None:
    """``elem``'s first child called ``name`` (any namespace)."""
    if elem is None:
        return None
    return next((child for child in elem if _local(child.tag) == name), None)


def _child(elem: ET.Element | None, name: str) -> str:
    """Text of ``elem``'s first child called ``name``, '' if none."""
    found = _find(elem, name)
    return (found.text or "") if found is not None else ""
