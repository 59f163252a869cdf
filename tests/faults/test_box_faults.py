"""Faults on the build box side, with the real build-image on a real loop-backed canvas (root).

The box is the instance's own (rehearsal.boxes: sshd on its address, the base AMI's user with sudo,
its own PID and mount namespace); the canvas is a moto volume backed by a loop device
(rehearsal.ebs.LoopEbs). Each test injects one fault at a moment it observes from outside
(a phase log appearing on the box, a request reaching the recording proxy) and then checks what is
left: no build-image process for the canvas, no frozen or mounted filesystem, and after the
nightly's teardown tasks nothing of the build in EC2.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException
from fault_helpers import build_image_pids, kill_when, left, nothing_left, start_worker, wait_until

from operators.remote_build import RemoteChrootBuild
from operators.snapshot import FrozenSnapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
]
DISK_PHASES = ("resolve", "partition", "mkfs", "mount")
#: build-image's wait for an attached canvas (120 s): a terminated box must not sit it out.
DEVICE_WAIT_S = 120


def _dead_mirror() -> str:
    """A package mirror on a closed local port: the build fails fast after the disk phases."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/debian"


@contextmanager
def _when(condition: Callable[[], Any], fault: Callable[[], None]) -> Iterator[list[BaseException]]:
    """Inject ``fault`` from a thread as soon as ``condition`` holds; errors are handed back."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        try:
            wait_until(lambda: stop.is_set() or condition(), "the fault's moment", timeout=300)
            if not stop.is_set():
                fault()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(timeout=30)


def _build_op_kwargs(rig: Any) -> dict[str, Any]:
    return {"box": rig.box, "canvas": rig.canvas, "mirror_url": _dead_mirror()}


def _phase_started(rig: Any, phase: str) -> Callable[[], bool]:
    return lambda: (rig.on_box_path(rig.work) / "logs" / f"{phase}.log").exists()


def _nothing_running_or_mounted(rig: Any) -> None:
    wait_until(lambda: not build_image_pids(rig.volume_id), "the box-side build to end")
    rig.teardowns()
    rig.ebs.wait_for(rig.volume_id, attached=False)
    assert not rig.mounted()
    assert left(rig.ec2.boto3_client(), rig.build) == nothing_left()


@pytest.mark.long
def test_worker_killed_mid_build_then_retried(rig: Any) -> None:
    rig.launch_and_attach()
    kwargs = _build_op_kwargs(rig)
    worker = start_worker(
        rig.tmp_path,
        "operators.remote_build.RemoteChrootBuild",
        "remote_chroot_build",
        {**kwargs, "recipe": "debian12"},
        rig.dag_id,
        rig.run_id,
    )
    kill_when(worker, _phase_started(rig, "mkfs"), "phase mkfs on the box")
    # the worker's SSH connection died with it: the box-side build must not go on alone
    wait_until(lambda: not build_image_pids(rig.volume_id), "the orphaned build to end", timeout=120)

    with pytest.raises(AirflowException, match=r"build-image failed in phase '(\w+)'") as failed:
        rig.run(RemoteChrootBuild, "remote_chroot_build", try_number=2, **kwargs)
    phase = re.search(r"phase '(\w+)'", str(failed.value)).group(1)
    assert phase not in DISK_PHASES, f"the retry could not reuse the canvas: {failed.value}"
    _nothing_running_or_mounted(rig)


def _kill_ssh_sessions(address: str) -> None:
    """SIGKILL the sshd processes serving connections to the box at ``address`` (the build's session)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( src {address} and sport = :22 )"],
        capture_output=True,
        text=True,
    ).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    assert pids, f"no SSH session on {address}:22: {out!r}"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a privsep child may end with its parent
            os.kill(pid, signal.SIGKILL)


def test_ssh_connection_dropped_mid_build(rig: Any) -> None:
    rig.launch_and_attach()
    address = rig.on_box.address
    with _when(_phase_started(rig, "mkfs"), lambda: _kill_ssh_sessions(address)) as errors:
        with pytest.raises(Exception) as failed:
            rig.run(RemoteChrootBuild, "remote_chroot_build", **_build_op_kwargs(rig))
    assert errors == []
    print(f"the task failed with: {failed.value!r}")
    assert re.search(r"phase '(mkfs|mount|partition)'|SSH|EOF|closed|exit code -1", str(failed.value))
    _nothing_running_or_mounted(rig)


def test_box_terminated_from_outside_mid_build(rig: Any) -> None:
    """TerminateInstances ends the box at once: the build (running through sudo), every session and
    the canvas's mounts die with it, and the task fails at once, not after a device timeout."""
    rig.launch_and_attach()
    on_box = rig.on_box
    client = rig.ec2.boto3_client(recorded=True)  # as anyone with the console or the CLI would
    ended: dict[str, float] = {}

    def terminate() -> None:
        assert build_image_pids(rig.volume_id), "the build runs on the box"
        client.terminate_instances(InstanceIds=[rig.box["instance_id"]])
        ended["at"] = time.monotonic()
        ended["box_pids"] = len(on_box.pids())
        ended["build_pids"] = len(build_image_pids(rig.volume_id))

    with _when(_phase_started(rig, "mkfs"), terminate) as errors:
        with pytest.raises(AirflowException, match=r"build-image failed in phase '\w+'") as failed:
            rig.run(RemoteChrootBuild, "remote_chroot_build", **_build_op_kwargs(rig))
    failed_after = time.monotonic() - ended["at"]
    assert errors == []
    print(f"the task failed {failed_after:.1f} s after the termination with: {failed.value!r}")
    # every process of the box was gone when TerminateInstances answered
    assert (ended["box_pids"], ended["build_pids"]) == (0, 0)
    assert on_box.mounts() == [] and not on_box.alive
    assert failed_after < DEVICE_WAIT_S / 4, "the task must not wait out a device timeout"
    _nothing_running_or_mounted(rig)


@pytest.mark.long
def test_worker_killed_while_frozen_then_retried(rig: Any) -> None:
    rig.launch_and_attach()
    rig.mount()
    rig.ec2.clear_requests()
    rig.ec2.add_latency("CreateSnapshot", 3, times=1)
    kwargs = {"recipe": "debian12", "box": rig.box, "canvas": rig.canvas, "freeze_timeout": 5}
    worker = start_worker(
        rig.tmp_path, "operators.snapshot.FrozenSnapshot", "frozen_snapshot", kwargs, rig.dag_id, rig.run_id
    )
    kill_when(worker, lambda: rig.ec2.calls("CreateSnapshot"), "CreateSnapshot sent with the canvas frozen")
    rig.writable()  # blocks while frozen: the box's guard thaws within freeze_timeout
    client = rig.ec2.boto3_client()
    (snapshot,) = wait_until(lambda: left(client, rig.build)["snapshots"], "AWS finishing the snapshot")

    again = rig.run(
        FrozenSnapshot, "frozen_snapshot", try_number=2, **{k: v for k, v in kwargs.items() if k != "recipe"}
    )
    assert again == {"snapshot_id": snapshot, "volume_id": rig.volume_id}
    assert len(rig.ec2.calls("CreateSnapshot")) == 1
    rig.writable()
    rig.build_image("umount")
    rig.teardowns()
    assert left(client, rig.build) == {**nothing_left(), "snapshots": [snapshot]}
