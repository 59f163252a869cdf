"""Faults on the build box side, with the real build-image on a real loop-backed canvas (root).

The box is this machine reached over the real sshd; the canvas is a moto volume backed by a loop
device (rehearsal.ebs.LoopEbs). Each test injects one fault at a moment it observes from outside
(a phase log appearing on the box, a request reaching the recording proxy) and then checks what is
left: no build-image process for the canvas, no frozen or mounted filesystem, and after the
nightly's teardown tasks nothing of the build in EC2.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
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
#: build-image's wait for an attached canvas to show up (120 s by default): a canvas that vanished
#: with a terminated box fails the build after this long instead.
DEVICE_WAIT_S = 15


@pytest.fixture(scope="module")
def local_sshd() -> Iterator[Any]:
    """The box's sshd (overrides the session one) with a short device wait for this module's builds."""
    from rehearsal.sshd import LocalSshd, package_cache, package_cache_env

    env = {**package_cache_env(package_cache()), "AMIBAKE_DEVICE_WAIT": str(DEVICE_WAIT_S)}
    with LocalSshd(session_env=env) as server:
        yield server


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
    return lambda: (rig.work / "logs" / f"{phase}.log").exists()


def _nothing_running_or_mounted(rig: Any) -> None:
    wait_until(lambda: not build_image_pids(rig.volume_id), "the box-side build to end")
    rig.teardowns()
    rig.ebs.wait_for(rig.volume_id, attached=False)
    assert not rig.mounted()
    assert left(rig.ec2.boto3_client(), rig.build) == nothing_left()


def test_worker_killed_mid_build_then_retried(rig: Any) -> None:
    rig.launch_and_attach()
    kwargs = _build_op_kwargs(rig)
    worker = start_worker(
        rig.tmp_path,
        "operators.rules.remote_build.RemoteChrootBuild",
        "remote_chroot_build",
        kwargs,
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


def _kill_ssh_sessions(port: int) -> None:
    """SIGKILL the sshd processes serving connections on ``port`` (the session of the build)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
    ).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    assert pids, f"no SSH session on port {port}: {out!r}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_ssh_connection_dropped_mid_build(rig: Any, sshd: Any) -> None:
    rig.launch_and_attach()
    with _when(_phase_started(rig, "mkfs"), lambda: _kill_ssh_sessions(sshd.port)) as errors:
        with pytest.raises(Exception) as failed:
            rig.run(RemoteChrootBuild, "remote_chroot_build", **_build_op_kwargs(rig))
    assert errors == []
    print(f"the task failed with: {failed.value!r}")
    assert re.search(r"phase '(mkfs|mount|partition)'|SSH|EOF|closed|exit code -1", str(failed.value))
    _nothing_running_or_mounted(rig)


def test_box_terminated_from_outside_mid_build(rig: Any) -> None:
    rig.launch_and_attach()
    client = rig.ec2.boto3_client()
    terminate = lambda: client.terminate_instances(InstanceIds=[rig.box["instance_id"]])  # noqa: E731
    with _when(_phase_started(rig, "mkfs"), terminate) as errors:
        # moto detaches the canvas of a terminated box and LoopEbs removes its device, as AWS would
        with pytest.raises(AirflowException, match=r"build-image failed in phase '\w+'") as failed:
            rig.run(RemoteChrootBuild, "remote_chroot_build", **_build_op_kwargs(rig))
    assert errors == []
    print(f"the task failed with: {failed.value!r}")
    _nothing_running_or_mounted(rig)


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
