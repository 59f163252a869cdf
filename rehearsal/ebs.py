"""An EBS emulator for the offline rehearsal: moto volumes become real loop devices.

moto only stores volumes. The build script needs a real block device under the volume id, as a
Nitro instance shows it (``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_<volid without dash>``).
``LoopEbs`` polls the local EC2 API and, for every attached volume, makes a sparse file of the
volume's size, a loop device on it and that link. When the volume is detached or deleted (or the
emulator stops) it does what a forced detach does to the box: everything mounted from the device
is thawed and unmounted, then the link, the loop device and the file are removed.
Needs root (losetup, mount).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config

from operators.rules.contract import CONTRACT

log = logging.getLogger(__name__)

#: Where udev puts the Nitro by-id links the build script looks for (include/scripts/contract.env).
BY_ID_DIR = Path(CONTRACT.nvme_byid_dir)
SNAPSHOT_ID_RE = re.compile(r"^snap-[0-9a-f]{8,32}$")
GIB = 1024**3


def link_path(volume_id: str) -> Path:
    """The ``/dev/disk/by-id`` link a Nitro instance would show for this volume."""
    return Path(CONTRACT.nvme_byid_link(volume_id))


def snapshot_image(snapshots_dir: Path, snapshot_id: str) -> Path:
    """Where :class:`EbsSnapshots` keeps a snapshot's content (``<snapshot-id>.img``, sparse)."""
    if not SNAPSHOT_ID_RE.match(snapshot_id):
        raise ValueError(f"snapshot_id {snapshot_id!r} is not an EBS snapshot id (snap-<hex>)")
    return Path(snapshots_dir) / f"{snapshot_id}.img"


def _sysfs_backing_file(loop_dev: str) -> Path:
    """Where the kernel shows a loop device's backing file (present only while it has one)."""
    return Path("/sys/block", Path(loop_dev).name, "loop", "backing_file")


def volume_backing_file(volume_id: str) -> Path | None:
    """The file behind an attached volume, found through the machine (by-id link -> loop device ->
    its sysfs ``backing_file``), so it works whichever process backs the volume; None if unbacked."""
    link = link_path(volume_id)
    if not link.is_symlink():
        return None
    backing = _sysfs_backing_file(os.path.realpath(link))
    try:
        path = Path(backing.read_text().strip())
    except OSError:
        return None
    return path if path.is_file() else None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a system tool, capturing its output so failures can be reported."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _unescape_mount_field(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/self/mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _device_numbers(loop_dev: str) -> set[str]:
    """``major:minor`` of a loop device and of each of its partitions, from sysfs."""
    name = Path(loop_dev).name
    sys_dir = Path("/sys/block") / name
    numbers: set[str] = set()
    if not sys_dir.is_dir():
        return numbers
    numbers.add((sys_dir / "dev").read_text().strip())
    for part in sys_dir.glob(f"{name}p*"):
        dev_file = part / "dev"
        if dev_file.exists():
            numbers.add(dev_file.read_text().strip())
    return numbers


def mounts_of(loop_dev: str) -> list[str]:
    """Mount points that use the device or a partition of it, plus every mount beneath them.

    Deepest first, so they can be unmounted in this order (bind mounts of a chroot sit below
    the root filesystem and must go first).
    """
    numbers = _device_numbers(loop_dev)
    name = Path(loop_dev).name
    source_re = re.compile(rf"^/dev/{re.escape(name)}(p\d+)?$")
    entries: list[tuple[str, str, str]] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            source = right.split()[1] if len(right.split()) > 1 else ""
            entries.append((fields[2], _unescape_mount_field(fields[4]), source))
    roots = {target for devno, target, source in entries if devno in numbers or source_re.match(source)}
    found = {
        target
        for _, target, _ in entries
        if any(target == root or target.startswith(root.rstrip("/") + "/") for root in roots)
    }
    return sorted(found, key=lambda t: (t.count("/"), t), reverse=True)


def release_device(loop_dev: str) -> None:
    """Thaw and unmount everything from a loop device, then detach it (a forced EBS detach)."""
    for target in mounts_of(loop_dev):
        # A frozen filesystem blocks umount's sync; "not frozen" errors are expected and ignored.
        _run("xfs_freeze", "-u", target, check=False)
        if _run("umount", target, check=False).returncode != 0:
            log.warning("umount %s failed (busy?): detaching it lazily", target)
            _run("umount", "-l", target)
    if Path(loop_dev).exists():
        _run("losetup", "-d", loop_dev, check=False)
        _wait_cleared(loop_dev)


def _wait_cleared(loop_dev: str, timeout: float = 10.0) -> None:
    """Wait until the kernel has let go of a detached loop device's backing file. ``losetup -d`` on
    a device still open (the block device of a just-unmounted filesystem is released a moment
    later) only marks it to clear at its last close, and until then ``losetup -a`` lists it."""
    backing = _sysfs_backing_file(loop_dev)
    deadline = time.monotonic() + timeout
    while backing.exists():
        if time.monotonic() > deadline:
            log.warning("%s still has its backing file %.0f s after losetup -d", loop_dev, timeout)
            return
        time.sleep(0.05)


def loops_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` (``losetup -j``)."""
    out = _run("losetup", "-j", str(path), check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def attach_image(image: Path, volume_id: str | None = None) -> str:
    """Put an image file on a new loop device (partitions scanned) and, given a volume id, link it
    under that id as Nitro udev does; returns the loop device. The one way a test disk or an
    emulated EBS volume becomes a block device."""
    loop_dev = _run("losetup", "-f", "--show", "-P", str(image)).stdout.strip()
    if volume_id is not None:
        try:
            link = link_path(volume_id)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(loop_dev)
        except BaseException:
            release_device(loop_dev)
            raise
    return loop_dev


def detach_image(image: Path, loop_dev: str, volume_id: str | None = None) -> None:
    """Undo :func:`attach_image` as a forced detach does: thaw and unmount everything from the
    device, detach it, remove its by-id link (if it still points at it) and the image file."""
    if loop_dev:
        release_device(loop_dev)
    if volume_id is not None:
        link = link_path(volume_id)
        if link.is_symlink() and os.readlink(link) == loop_dev:
            link.unlink()
    for other in loops_backed_by(image):  # losetup -d is asynchronous when busy
        release_device(other)
    image.unlink(missing_ok=True)


@dataclass
class _Backing:
    """What one attached volume is backed by on this machine."""

    volume_id: str
    image: Path
    loop_dev: str
    link: Path


class LoopEbs:
    """Context manager that backs every attached moto volume with a real loop device.

    ``state_dir`` holds the sparse image files (``<volume-id>.img``); whatever a killed earlier run
    left there (loop devices, mounts, links) is cleaned up on entry. ``snapshots_dir``: where
    :class:`EbsSnapshots` keeps snapshot content; a volume created from such a snapshot starts as
    a copy of it (otherwise every volume starts blank). ``poll_interval``: one DescribeVolumes per
    second by default, about 9 ms of CPU each here; an attachment on AWS takes seconds anyway.
    """

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        state_dir: str | os.PathLike[str],
        poll_interval: float = 1.0,
        snapshots_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url {endpoint_url!r} must be an http(s) URL")
        if not region:
            raise ValueError("region must not be empty")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval {poll_interval!r} must be positive")
        self.endpoint_url = endpoint_url
        self.region = region
        self.state_dir = Path(state_dir)
        self.poll_interval = poll_interval
        self.snapshots_dir = Path(snapshots_dir) if snapshots_dir is not None else None
        self.errors: list[str] = []
        #: every volume id backed so far, in order (the rehearsal removes their box-side work dirs)
        self.history: list[str] = []
        self._backings: dict[str, _Backing] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = boto3.client(
            "ec2",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )

    @property
    def devices(self) -> dict[str, str]:
        """Volume id → loop device, for the volumes currently attached."""
        with self._changed:
            return {vid: b.loop_dev for vid, b in self._backings.items()}

    def __enter__(self) -> LoopEbs:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Clean up what a killed run left in ``state_dir``, then start polling."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.cleanup_stale(self.state_dir)
        BY_ID_DIR.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="loop-ebs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and release every volume, as if all were detached."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failures = []
        for volume_id in list(self._backings):
            try:
                self._release(volume_id)
            except Exception as exc:  # release the others, then report
                failures.append(f"{volume_id}: {exc}")
        if failures:
            raise RuntimeError(f"LoopEbs could not release: {'; '.join(failures)}")

    def wait_for(self, volume_id: str, attached: bool = True, timeout: float = 60.0) -> str | None:
        """Block until the volume is backed (returns its loop device) or released (returns None)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (volume_id in self._backings) != attached:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = "attached" if attached else "released"
                    raise TimeoutError(f"volume {volume_id} not {state} within {timeout} s: {self.errors}")
                self._changed.wait(remaining)
            backing = self._backings.get(volume_id)
            return backing.loop_dev if backing else None

    @staticmethod
    def cleanup_stale(state_dir: Path) -> list[str]:
        """Release loop devices, mounts, links and images left in ``state_dir``; returns volume ids."""
        cleaned = []
        for image in sorted(Path(state_dir).glob("vol-*.img")):
            volume_id = image.stem
            for loop_dev in loops_backed_by(image):
                release_device(loop_dev)
            link = link_path(volume_id)
            if link.is_symlink():
                link.unlink()
            image.unlink()
            cleaned.append(volume_id)
        if cleaned:
            log.info("cleaned stale EBS backings: %s", ", ".join(cleaned))
        return cleaned

    def sync_once(self) -> None:
        """One poll: back newly attached volumes, release detached or deleted ones."""
        attached: dict[str, tuple[int, str]] = {}
        paginator = self._client.get_paginator("describe_volumes")
        for page in paginator.paginate():
            for vol in page["Volumes"]:
                if any(a.get("State") in ("attaching", "attached") for a in vol.get("Attachments", [])):
                    attached[vol["VolumeId"]] = (vol["Size"], vol.get("SnapshotId") or "")
        for volume_id in [v for v in self._backings if v not in attached]:
            self._release(volume_id)
        for volume_id, (size_gib, snapshot_id) in attached.items():
            if volume_id not in self._backings and CONTRACT.volume_id_re.fullmatch(volume_id):
                self._back(volume_id, size_gib, snapshot_id)

    def _loop(self) -> None:
        """Poll until stopped; an error is recorded and the next poll tries again."""
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # keep polling: moto restarts, a transient losetup failure
                message = f"{type(exc).__name__}: {exc}"
                if not self.errors or self.errors[-1] != message:
                    self.errors.append(message)
                    log.warning("LoopEbs poll failed: %s", message)
            self._stop.wait(self.poll_interval)

    def _back(self, volume_id: str, size_gib: int, snapshot_id: str = "") -> None:
        """Sparse file (blank, or a copy of its snapshot's content) + loop device + by-id link for
        one attached volume."""
        image = self.state_dir / f"{volume_id}.img"
        source = self._snapshot_content(snapshot_id)
        if source is not None:
            _run("cp", "--sparse=always", str(source), str(image))
        with open(image, "r+b" if source is not None else "wb") as fh:
            if fh.seek(0, os.SEEK_END) < size_gib * GIB:  # a volume may be larger than its snapshot
                fh.truncate(size_gib * GIB)
        try:
            loop_dev = attach_image(image, volume_id)
        except Exception:
            image.unlink()
            raise
        link = link_path(volume_id)
        with self._changed:
            self._backings[volume_id] = _Backing(volume_id, image, loop_dev, link)
            self.history.append(volume_id)
            self._changed.notify_all()
        log.info("volume %s attached: %s (%d GiB) at %s", volume_id, loop_dev, size_gib, link)

    def _snapshot_content(self, snapshot_id: str) -> Path | None:
        """The content EbsSnapshots kept for ``snapshot_id``, if any."""
        if self.snapshots_dir is None or not SNAPSHOT_ID_RE.match(snapshot_id):
            return None
        path = snapshot_image(self.snapshots_dir, snapshot_id)
        return path if path.is_file() else None

    def _release(self, volume_id: str) -> None:
        """Undo ``_back``: thaw, unmount, remove link, detach loop, delete file."""
        backing = self._backings[volume_id]
        detach_image(backing.image, backing.loop_dev, volume_id)
        with self._changed:
            del self._backings[volume_id]
            self._changed.notify_all()
        log.info("volume %s released (%s)", volume_id, backing.loop_dev)


class EbsSnapshots:
    """Local EC2 API extension: a snapshot keeps the bytes its volume had at ``CreateSnapshot``.

    moto only records snapshots. After moto accepted ``CreateSnapshot`` this copies the volume's
    current content, synchronously (the snapshot is point-in-time: the product freezes the
    filesystems around the call), into ``state_dir/<snapshot-id>.img`` (``cp --sparse=always``: the
    file system here has no reflink). The volume's bytes are found through the machine
    (:func:`volume_backing_file`), as the :class:`LoopEbs` that backs it may run in another process.
    A volume that is not backed here (never attached in this rehearsal) has no content: nothing is
    kept, and an AMI of that snapshot is not bootable here. ``DeleteSnapshot`` removes the copy;
    :meth:`reset` / :meth:`close` remove all (and a new instance removes what a killed run left).
    ``LoopEbs(..., snapshots_dir=state_dir)`` starts a volume created from a snapshot as its copy;
    :mod:`rehearsal.guests` boots an AMI whose root snapshot has content.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        #: copies that failed (a test asserts there are none; the snapshot itself stays in moto)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.reset()

    def content(self, snapshot_id: str) -> Path | None:
        """The kept content of a snapshot, or None (no content, or not a snapshot id)."""
        if not SNAPSHOT_ID_RE.match(snapshot_id or ""):
            return None
        path = snapshot_image(self.state_dir, snapshot_id)
        return path if path.is_file() else None

    def before(self, action: str, params: dict[str, str], moto: Any) -> tuple[int, bytes] | None:
        """Never answers a call itself."""
        return None

    def after(self, action: str, params: dict[str, str], status: int, body: bytes, moto: Any) -> bytes:
        """Copy the volume on CreateSnapshot, remove the copy on DeleteSnapshot (only once moto did)."""
        if status != 200:
            return body
        if action == "CreateSnapshot":
            self._keep(_xml_text(body, "snapshotId"), params.get("VolumeId", ""))
        elif action == "DeleteSnapshot":
            path = self.content(params.get("SnapshotId", ""))
            if path is not None:
                path.unlink(missing_ok=True)
                log.info("snapshot %s deleted: its content is gone", path.stem)
        return body

    def reset(self) -> None:
        """Remove every kept snapshot (``LocalEc2.reset``)."""
        with self._lock:
            for path in self.state_dir.glob("snap-*.img*"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every kept snapshot (``LocalEc2.stop``)."""
        self.reset()

    def _keep(self, snapshot_id: str, volume_id: str) -> None:
        """Copy the volume's backing file to the snapshot's file (renamed at the end: no partial copy
        is ever seen as content)."""
        if not SNAPSHOT_ID_RE.match(snapshot_id) or not CONTRACT.volume_id_re.fullmatch(volume_id):
            return
        source = volume_backing_file(volume_id)
        if source is None:
            log.info("snapshot %s of %s: volume not backed here, no content kept", snapshot_id, volume_id)
            return
        target = snapshot_image(self.state_dir, snapshot_id)
        partial = target.with_name(target.name + ".partial")
        started = time.monotonic()
        with self._lock:
            try:
                _run("cp", "--sparse=always", str(source), str(partial))
                partial.rename(target)
            except Exception as exc:
                partial.unlink(missing_ok=True)
                self.errors.append(f"{snapshot_id} of {volume_id}: {exc}")
                log.error("snapshot %s of %s: content not kept: %s", snapshot_id, volume_id, exc)
                return
        seconds = time.monotonic() - started
        log.info("snapshot %s of %s: content kept in %.1f s", snapshot_id, volume_id, seconds)


def _xml_text(body: bytes, name: str) -> str:
    """Text of the first element called ``name`` (any namespace) of an EC2 answer, '' if none."""
    for elem in ET.fromstring(body).iter():
        if elem.tag.rsplit("}", 1)[-1] == name:
            return elem.text or ""
    return ""
