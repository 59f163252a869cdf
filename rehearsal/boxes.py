"""The machines behind the local EC2 API's instances: one isolated box per ``RunInstances``.

:class:`Boxes` is an :class:`rehearsal.ec2_local.Extension`. After moto has launched an instance it
starts a BOX for it, reached the way AWS reaches an instance:

- its own address in 127.0.0.0/8 (loopback is all ours), on which a real OpenSSH sshd listens on
  port 22; ``RunInstances`` and ``DescribeInstances`` answers carry it as the instance's
  ``PublicIpAddress`` and ``PrivateIpAddress``;
- the instance's user data applied as cloud-init applies the ``#cloud-config`` the product sends
  (``operators.build_box.user_data``): ``ssh_authorized_keys`` go to the image's DEFAULT USER, a
  non-root user with passwordless sudo (``centos``, ``admin``, ``ec2-user`` … from the base AMI's
  name, as an image's own cloud.cfg names it); ``ssh_keys`` become the host key (otherwise one is
  generated, as ``ssh_genkeytypes`` would);
- isolated in its own PID and mount namespace (``unshare``): its own ``/etc/passwd``, ``group``,
  ``shadow`` and ``sudoers``, ``/home`` and ``/var/tmp`` are bind-mounted from the box's dir, so the
  host's user database is never touched and every box starts with an empty ``/var/tmp`` (where the
  product works). The rest of the filesystem (``/dev`` with the EBS emulator's devices, the tools,
  ``/tmp``) is this machine's, less the loop-backed filesystems mounted on it when the box started
  (:data:`DROP_HOST_LOOP_MOUNTS`).

``TerminateInstances`` ends the box at once: SIGKILL to the namespace's init (sshd), which makes the
kernel kill every process of the namespace (sessions, a build running through ``sudo``, its qemu),
and the mounts the build made inside die with the namespace. A box's processes also die with the
process that started it (``PR_SET_PDEATHSIG`` on ``unshare``, ``--kill-child`` on the init), and
every box is stopped by :meth:`Boxes.reset` / :meth:`Boxes.close` (``LocalEc2.reset`` / ``stop``).
A terminated box's files stay until then (logs can be read after the run; with ``keep_logs`` the
build's phase logs are copied out first).

An AMI this rehearsal built (its root snapshot's content kept by :class:`rehearsal.ebs.EbsSnapshots`)
is not a box: with ``guests`` given, such an instance boots that AMI's bytes under qemu
(:mod:`rehearsal.guests`); every other AMI (the base images) gets a box.

What it does not model: reboot / stop / start (a stopped instance is not a box), instance metadata
(IMDS), security-group filtering of tcp/22 and egress, cloud-init modules other than the two above,
several users.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from operators.rules.contract import CONTRACT
from rehearsal.sshd import (
    PRIVSEP_DIR,
    SSHD,
    WORK_DIR_PREFIX,
    check_config,
    checked_session_env,
    die_with_parent,
    keygen,
    sshd_config,
    wait_for_banner,
)

if TYPE_CHECKING:
    from rehearsal.guests import Guests

log = logging.getLogger(__name__)

SSH_PORT = 22
#: The loopback network every box address comes from (``[amibake] ssh_cidr`` of the rehearsal).
BOX_NETWORK = "127.0.0.0/8"
#: cloud-init's default user of the base image, by AMI name (what its /etc/cloud/cloud.cfg says).
DEFAULT_USERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)centos"), "centos"),
    (re.compile(r"(?i)debian"), "admin"),
    (re.compile(r"(?i)ubuntu"), "ubuntu"),
    (re.compile(r"(?i)^(amzn|al20)"), "ec2-user"),
)
#: The default user of an image none of the patterns knows (Amazon Linux's and cloud-init's EC2 one).
FALLBACK_USER = "ec2-user"
#: The first user cloud-init creates on a fresh image gets uid/gid 1000.
BOX_UID = 1000
#: Host paths replaced inside each box by a file or dir of the box's own (relative to its dir).
PRIVATE_FILES = {
    "/etc/passwd": "etc/passwd",
    "/etc/group": "etc/group",
    "/etc/shadow": "etc/shadow",
    "/etc/sudoers": "etc/sudoers",
}
PRIVATE_DIRS = {"/home": "home", "/var/tmp": "var-tmp"}
#: First step of a box's init. The new mount namespace starts as a copy of this machine's mounts,
#: other builds' and tests' loop-backed filesystems among them, and with private propagation the
#: host's later unmount never reaches the copy: the filesystem would stay alive in the box, so its
#: partition stays busy (``wipefs`` fails with EBUSY) and its loop device is not freed until the box
#: ends. An EC2 instance sees no other instance's disks either. (/proc/self/mounts escapes a space as
#: \040, which ``printf %b`` undoes; the deepest mounts go first.)
DROP_HOST_LOOP_MOUNTS = r"""awk '$1 ~ /^\/dev\/loop/ { print $2 }' /proc/self/mounts | sort -r |
    while read -r mp; do
        umount -l "$(printf '%b' "$mp")" || echo "box-init: cannot unmount $mp" >&2
    done"""
_ADDRESS_TAGS = {"privateIpAddress", "ipAddress", "publicIp"}
START_ATTEMPTS = 5
STOP_TIMEOUT_S = 30.0


def default_user(image_name: str) -> str:
    """The login cloud-init creates on an image with this AMI name."""
    for pattern, user in DEFAULT_USERS:
        if pattern.search(image_name):
            return user
    return FALLBACK_USER


@dataclass(frozen=True)
class Login:
    """The ``amibake_ssh`` connection of a rehearsal or a test: the base AMI's user and a throwaway key.

    Only login and private key, as on AWS: the box's address and host key come from EC2 (the
    instance's IP, the per-build host key in its user data), never from the connection.
    """

    user: str
    private_key_pem: str

    @classmethod
    def new(cls, user: str) -> Login:
        """A fresh ed25519 key for ``user``."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        return cls(user, pem.decode())

    def connection(self) -> dict[str, Any]:
        """The connection in Airflow's JSON form."""
        return {"conn_type": "ssh", "login": self.user, "extra": {"private_key": self.private_key_pem}}


@dataclass
class CloudConfig:
    """The parts of ``#cloud-config`` user data a box applies."""

    authorized_keys: list[str] = field(default_factory=list)
    host_key_private: str = ""
    host_key_public: str = ""


def parse_user_data(encoded: str) -> CloudConfig:
    """RunInstances' base64 ``UserData`` → what cloud-init would apply (empty for no user data).

    ValueError for user data that is not ``#cloud-config`` YAML (the product sends nothing else).
    """
    if not encoded:
        return CloudConfig()
    text = base64.b64decode(encoded).decode()
    if not text.startswith("#cloud-config"):
        raise ValueError(f"user data is not #cloud-config: {text[:40]!r}")
    config = yaml.safe_load(text) or {}
    keys = config.get("ssh_keys") or {}
    return CloudConfig(
        authorized_keys=[str(k) for k in config.get("ssh_authorized_keys") or []],
        host_key_private=str(keys.get("ed25519_private", "")),
        host_key_public=" ".join(str(keys.get("ed25519_public", "")).split()[:2]),
    )


#: The address shown for an instance with neither box nor guest (its box failed to start): a loopback
#: address no box takes (they are 127.16.0.0 and up), so SSH to it is refused at once. moto's own
#: addresses are random public ones; a client sent there reached a real host on the internet.
NO_BOX_ADDRESS = "127.1.0.1"


def free_box_address() -> str:
    """A loopback address whose port 22 nobody holds (random, so parallel test workers rarely meet)."""
    while True:
        address = f"127.{random.randint(16, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, SSH_PORT))
            except OSError:
                continue
        return address


@dataclass
class Box:
    """One running (or terminated) box: where it listens, who logs in, its namespace's init."""

    instance_id: str
    address: str
    login: str
    dir: Path
    host_key: str
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int = 0
    pid_namespace: str = ""

    @property
    def alive(self) -> bool:
        """Whether the box still runs (its namespace's init exists)."""
        return self.proc is not None and self.proc.poll() is None

    def path(self, path_on_box: str) -> Path:
        """The host path of a file the box sees at ``path_on_box`` (its private dirs live in its dir)."""
        for box_dir, own in PRIVATE_DIRS.items():
            if path_on_box == box_dir or path_on_box.startswith(box_dir + "/"):
                return self.dir / own / path_on_box[len(box_dir) :].lstrip("/")
        return Path(path_on_box)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as root on the box (its console: inside its mount and PID namespace)."""
        if not self.alive:
            raise RuntimeError(f"box {self.instance_id} is not running")
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("check", False)
        return subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-m", "-p", "--", *argv], cwd="/", **kwargs
        )

    def pids(self) -> list[int]:
        """Every process of the box, as host pids (empty once it is terminated)."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.readlink(proc / "ns" / "pid") == self.pid_namespace:
                        found.append(int(proc.name))
                except OSError:
                    continue
        return sorted(found)

    def mounts(self) -> list[str]:
        """Mount points the box sees (its mount namespace's table; empty once terminated)."""
        try:
            with open(f"/proc/{self.init_pid}/mountinfo") as fh:
                return [line.split()[4] for line in fh]
        except OSError:
            return []


class Boxes:
    """The local EC2 API extension that gives every launched instance a box (see the module doc).

    :param parent_dir: where box dirs are made (default: the system temp dir); a harness that can be
        killed gives its state dir, where its next run removes them (``WORK_DIR_PREFIX``).
    :param session_env: variables sshd gives every session (``SetEnv``) and sudo keeps
        (``env_keep``): the offline package cache.
    :param keep_logs: when a box's files are removed, copy build-image's phase logs of each volume
        to ``keep_logs/box-<volume id>/`` first.
    :param guests: boot the AMIs whose root snapshot has content as guests instead (see the module doc).
    """

    def __init__(
        self,
        *,
        parent_dir: Path | None = None,
        session_env: Mapping[str, str] | None = None,
        keep_logs: Path | None = None,
        guests: Guests | None = None,
    ) -> None:
        if parent_dir is not None and any(
            parent_dir.resolve().is_relative_to(private) for private in PRIVATE_DIRS
        ):
            raise ValueError(f"box dirs cannot live in {parent_dir}: a box hides {', '.join(PRIVATE_DIRS)}")
        self.parent_dir = parent_dir
        self.session_env = checked_session_env(session_env)
        self.keep_logs = keep_logs
        self.guests = guests
        self._boxes: dict[str, Box] = {}
        self._lock = threading.Lock()
        # one long-lived thread forks every box: PR_SET_PDEATHSIG follows the forking thread
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amibake-boxes")

    # -- the Extension seam -------------------------------------------------------------------
    def before(self, action: str, params: dict[str, str], moto: Any) -> tuple[int, bytes] | None:
        """Boxes never answer a call themselves."""
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        """Start boxes on RunInstances, end them on TerminateInstances, show their addresses."""
        if status != 200:
            return body
        if action == "RunInstances":
            image = moto.describe_images(ImageIds=[params["ImageId"]])["Images"][0]
            guests = self.guests
            content = guests.content_of(image) if guests is not None else None
            if guests is not None and content is not None:  # an AMI we built: boot its bytes
                for instance_id in _instance_ids(body):
                    self._starter.submit(guests.start, instance_id, image, content, params, moto).result()
                return self._show_addresses(body)
            try:
                config = parse_user_data(params.get("UserData", ""))
            except ValueError as exc:  # EC2 takes any user data; such a box is just unreachable
                log.warning("%s: the box gets no login key", exc)
                config = CloudConfig()
            login = default_user(image.get("Name", ""))
            for instance_id in _instance_ids(body):
                self._starter.submit(self._start, instance_id, login, config).result()
        elif action == "TerminateInstances":
            for key, instance_id in params.items():
                if key.startswith("InstanceId."):
                    self.terminate(instance_id)
        if action in ("RunInstances", "DescribeInstances"):
            return self._show_addresses(body)
        if self.guests is not None:
            return self.guests.rewrite(action, body)
        return body

    # -- boxes ----------------------------------------------------------------------------------
    def get(self, instance_id: str) -> Box:
        """The box of an instance (KeyError if the instance has none)."""
        with self._lock:
            return self._boxes[instance_id]

    @property
    def boxes(self) -> list[Box]:
        """Every box started since the last reset, oldest first."""
        with self._lock:
            return list(self._boxes.values())

    def terminate(self, instance_id: str) -> None:
        """End an instance's box now: every process and mount of it (no-op for an unknown one)."""
        with self._lock:
            box = self._boxes.get(instance_id)
        if box is not None:
            _kill(box)
        if self.guests is not None:
            self.guests.terminate(instance_id)

    def reset(self) -> None:
        """Terminate every box and guest and remove their files (``LocalEc2.reset``)."""
        with self._lock:
            boxes = list(self._boxes.values())
            self._boxes.clear()
        for box in boxes:
            _kill(box)
            self._remove_files(box)
        if self.guests is not None:
            self.guests.reset()

    def close(self) -> None:
        """Stop everything (``LocalEc2.stop``); safe to call twice."""
        self.reset()
        self._starter.shutdown(wait=True)

    # -- starting one ---------------------------------------------------------------------------
    def _start(self, instance_id: str, login: str, config: CloudConfig) -> Box:
        """Make the box's dir, apply the user data, start its namespace with sshd (in the starter thread)."""
        box_dir = Path(tempfile.mkdtemp(prefix=f"{WORK_DIR_PREFIX}{instance_id}-", dir=self.parent_dir))
        box = Box(instance_id, "", login, box_dir, "")
        try:
            self._write_identity(box, config)
            last_error = ""
            for _ in range(START_ATTEMPTS):
                box.address = free_box_address()
                if self._run_init(box):
                    with self._lock:
                        self._boxes[instance_id] = box
                    log.info("box of %s: %s@%s:22", instance_id, login, box.address)
                    return box
                last_error = (box_dir / "sshd.log").read_text(errors="replace")
            raise RuntimeError(f"box of {instance_id} did not start: {last_error.strip()}")
        except BaseException:
            _kill(box)
            shutil.rmtree(box_dir, ignore_errors=True)
            raise

    def _write_identity(self, box: Box, config: CloudConfig) -> None:
        """The box's user database, sudoers, home with authorized_keys, and host key."""
        d, login = box.dir, box.login
        os.chmod(d, 0o755)  # sshd (StrictModes) and the user walk through it to their home
        (d / "etc").mkdir()
        system_users = [
            line
            for line in Path("/etc/passwd").read_text().splitlines()
            if line and int(line.split(":")[2]) < BOX_UID and line.split(":")[0] != login
        ]
        system_groups = [
            line
            for line in Path("/etc/group").read_text().splitlines()
            if line and int(line.split(":")[2]) < BOX_UID and line.split(":")[0] != login
        ]
        users = [*system_users, f"{login}:x:{BOX_UID}:{BOX_UID}:Cloud User:/home/{login}:/bin/bash"]
        (d / "etc/passwd").write_text("\n".join(users) + "\n")
        (d / "etc/group").write_text("\n".join([*system_groups, f"{login}:x:{BOX_UID}:"]) + "\n")
        # no password for anyone (the host's hashes never reach a box)
        shadow = [f"{u.split(':')[0]}:*:19000:0:99999:7:::" for u in users]
        (d / "etc/shadow").write_text("\n".join(shadow) + "\n")
        os.chmod(d / "etc/shadow", 0o640)
        keep = " ".join(self.session_env)
        (d / "etc/sudoers").write_text(
            "\n".join(
                [
                    "# the box's sudoers: cloud-init's default-user rule (sudo: ALL=(ALL) NOPASSWD:ALL)",
                    "Defaults env_reset",
                    'Defaults secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"',
                    *([f'Defaults env_keep += "{keep}"'] if keep else []),
                    "root ALL=(ALL:ALL) ALL",
                    f"{login} ALL=(ALL) NOPASSWD:ALL",
                    "",
                ]
            )
        )
        os.chmod(d / "etc/sudoers", 0o440)
        for own in PRIVATE_DIRS.values():
            (d / own).mkdir()
        os.chmod(d / "var-tmp", 0o1777)
        ssh_dir = d / "home" / login / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        (ssh_dir / "authorized_keys").write_text("".join(f"{k}\n" for k in config.authorized_keys))
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        for path in (d / "home" / login, ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(path, BOX_UID, BOX_UID)
        os.chmod(d / "home" / login, 0o700)
        host_key = d / "ssh_host_ed25519_key"
        if config.host_key_private:
            host_key.write_text(config.host_key_private.rstrip("\n") + "\n")
            os.chmod(host_key, 0o600)
            box.host_key = config.host_key_public
        else:
            box.host_key = keygen(host_key, f"amibake-box-{box.instance_id}")

    def _run_init(self, box: Box) -> bool:
        """Start the namespace and its init (sshd on ``box.address``); False if sshd did not come up."""
        d = box.dir
        cfg = d / "sshd_config"
        cfg.write_text(
            sshd_config(
                address=box.address,
                port=SSH_PORT,
                host_key_file=d / "ssh_host_ed25519_key",
                pid_file=d / "sshd.pid",
                login=box.login,
                session_env=self.session_env,
            )
        )
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # before `sshd -t`, which needs it too
        check_config(cfg)
        binds = [*PRIVATE_FILES.items(), *PRIVATE_DIRS.items()]
        script = "\n".join(
            [
                "set -e",
                DROP_HOST_LOOP_MOUNTS,
                *(f"mount --bind {shlex.quote(str(d / own))} {shlex.quote(p)}" for p, own in binds),
                'exec "$@"',
            ]
        )
        argv = [
            "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--propagation", "private",
            "--mount-proc", "--", "/bin/sh", "-c", script, "box-init",
            SSHD, "-D", "-e", "-f", str(cfg),
        ]  # fmt: skip
        with open(d / "sshd.log", "wb") as err:
            box.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only async-signal-safe work (one prctl)
            )
        box.init_pid = _first_child(box.proc.pid)
        if box.init_pid:
            try:
                box.pid_namespace = os.readlink(f"/proc/{box.init_pid}/ns/pid")
            except OSError:
                box.init_pid = 0
        if box.init_pid and wait_for_banner(box.address, SSH_PORT, lambda: box.alive, timeout=20):
            return True
        _kill(box)
        return False

    def _remove_files(self, box: Box) -> None:
        """Remove a terminated box's dir, keeping its build logs if asked to."""
        logs_root = box.path(CONTRACT.box_work_dir)  # where build-image writes its phase logs
        if self.keep_logs is not None and logs_root.is_dir():
            for logs in logs_root.glob("*/logs"):
                shutil.copytree(logs, self.keep_logs / f"box-{logs.parent.name}", dirs_exist_ok=True)
        shutil.rmtree(box.dir, ignore_errors=True)

    def _address(self, instance_id: str) -> str:
        """Where an instance's SSH is reached: its box's (alive or not, as a hung instance keeps its
        address) or its guest's; else :data:`NO_BOX_ADDRESS`, never the internet address moto made up."""
        with self._lock:
            box = self._boxes.get(instance_id)
        if box is not None:
            return box.address
        guest = self.guests.address(instance_id) if self.guests is not None else None
        return guest or NO_BOX_ADDRESS

    def _show_addresses(self, body: bytes) -> bytes:
        """Rewrite each boxed (or guest) instance's private and public IP in an EC2 answer to the
        address its SSH is reached on."""
        root = ET.fromstring(body)
        changed = False
        for item in _instance_items(root):
            address = self._address(_child_text(item, "instanceId"))
            for elem in item.iter():
                if _local(elem.tag) in _ADDRESS_TAGS:
                    elem.text = address
                    changed = True
        if not changed:
            return body
        namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
        ET.register_namespace("", namespace)  # keep moto's default namespace unprefixed
        return ET.tostring(root, xml_declaration=True, encoding="utf-8")


def _local(tag: str) -> str:
    """An element's tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str:
    """Text of ``elem``'s first child called ``name`` (any namespace), '' if none."""
    return next((child.text or "" for child in elem if _local(child.tag) == name), "")


def _instance_items(root: ET.Element) -> list[ET.Element]:
    """The ``instancesSet/item`` elements of an EC2 answer (any namespace: moto's has no slash)."""
    return [item for elem in root.iter() if _local(elem.tag) == "instancesSet" for item in elem]


def _kill(box: Box) -> None:
    """SIGKILL the box's namespace init and wait: the kernel ends every other process of the namespace
    with it, and unshare exits only once the init is reaped (no-op for a box that is not running)."""
    if not box.alive:
        return
    assert box.proc is not None
    if box.init_pid <= 0:  # no init seen (never 0: that would signal our own process group)
        box.proc.kill()  # unshare's --kill-child takes its init along
    else:
        try:
            os.kill(box.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        box.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        box.proc.kill()
        box.proc.wait(timeout=STOP_TIMEOUT_S)
    log.info("box of %s at %s terminated", box.instance_id, box.address)


def _instance_ids(body: bytes) -> list[str]:
    """Instance ids of a RunInstances answer."""
    return [_child_text(item, "instanceId") for item in _instance_items(ET.fromstring(body))]


def _first_child(pid: int, timeout: float = 10.0) -> int:
    """The pid of ``pid``'s first child (unshare's forked init), waiting for the fork; 0 if none came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0
        if children:
            return int(children[0])
        time.sleep(0.01)
    return 0
