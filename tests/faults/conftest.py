"""Fault-test fixtures on top of tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG

from operators import defaults
from operators.build_box import LaunchBuildBox, TerminateBuildBox
from operators.canvas import AttachCanvas, DeleteCanvas
from operators.rules import naming
from operators.rules.naming import Role
from operators.rules.remote import remote_dir, remote_scripts_dir

# The operator harness of tests/operators runs an operator as the task runner + triggerer would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))
from fault_helpers import build_image_pids  # noqa: E402 - after the path
from operator_harness import make_context, run_operator  # noqa: E402 - after the path

PREVIOUS_RUN = "scheduled__2026-11-24T02:00:00+00:00"
RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"


@pytest.fixture
def previous_good(ec2: Any) -> dict[str, str]:
    """Last night's debian12 AMI and its snapshot, tagged as the nightly tags them."""
    client = ec2.boto3_client()
    build = naming.build_id("amibake_nightly", PREVIOUS_RUN)
    created = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()

    def tags(role: Role) -> list[dict[str, str]]:
        return naming.resource_tags(
            build=build,
            dag_id="amibake_nightly",
            run_id=PREVIOUS_RUN,
            recipe="debian12",
            role=role,
            created_at=created,
        )

    vol = client.create_volume(Size=2, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
    snap = client.create_snapshot(
        VolumeId=vol, TagSpecifications=[naming.tag_specification("snapshot", tags(Role.SNAPSHOT))]
    )["SnapshotId"]
    client.delete_volume(VolumeId=vol)
    ami = client.register_image(
        Name=f"amibake-debian12-20261124-0200-{build}",
        RootDeviceName="/dev/sda1",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]
    client.create_tags(
        Resources=[ami], Tags=[*tags(Role.AMI), {"Key": naming.TAG_SNAPSHOT_ID, "Value": snap}]
    )
    return {"ami": ami, "snapshot": snap, "build": build}


class Rig:
    """A build of one test: box and canvas made by the nightly's operators, the canvas a real loop
    device (rehearsal.ebs.LoopEbs), this machine the box. Everything is undone by the fixture."""

    def __init__(self, ec2: Any, ebs: Any, tmp_path: Path) -> None:
        self.ec2, self.ebs, self.tmp_path = ec2, ebs, tmp_path
        self.dag_id = f"amibake_t_rig_{uuid.uuid4().hex[:10]}"
        self.run_id = RUN_ID
        self.build = naming.build_id(self.dag_id, RUN_ID)
        self.box: dict[str, Any] = {}
        self.canvas: dict[str, Any] = {}
        self.volumes: set[str] = set()  # every canvas attached (tests may clear the recorded requests)

    def dag(self) -> DAG:
        return DAG(self.dag_id, schedule=None)

    def run(self, cls: type, task_id: str, try_number: int = 1, **kwargs: Any) -> Any:
        """Run one operator of this build in this process (the harness), return its XCom."""
        with self.dag() as dag:
            op = cls(task_id=task_id, recipe="debian12", **kwargs)
        return run_operator(op, make_context(dag, RUN_ID, try_number=try_number, max_tries=3)).result

    def launch_and_attach(self, size_gib: int = 2) -> None:
        base = self.ec2.register_base_image("amibake-test-base")
        self.box = self.run(LaunchBuildBox, "launch_build_box", base_ami=base)
        self.canvas = self.run(AttachCanvas, "attach_canvas", box=self.box, size_gib=size_gib)
        self.volumes.add(self.canvas["volume_id"])
        self.ebs.wait_for(self.canvas["volume_id"])

    @property
    def volume_id(self) -> str:
        return self.canvas["volume_id"]

    @property
    def work(self) -> Path:
        """build-image's work dir on the box for the canvas."""
        return Path(defaults.REMOTE_BASE_DIR) / self.volume_id

    @property
    def root(self) -> Path:
        return self.work / "root"

    def build_image(self, *phases: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real build-image on the canvas as the operators would (scripts from the package)."""
        argv = ["bash", str(defaults.PACKAGE_SCRIPTS_DIR / "build-image"), "--recipe", "debian12"]
        argv += ["--volume-id", self.volume_id, "--size-gib", str(self.canvas["size_gib"]), *phases]
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=600)

    def mount(self) -> None:
        """The canvas as ``build-image all`` leaves it for FrozenSnapshot: partitioned, xfs, mounted."""
        self.build_image("resolve", "partition", "mkfs", "mount")
        assert self.mounted()
        shutil.copytree(
            defaults.PACKAGE_SCRIPTS_DIR, remote_scripts_dir(self.build)
        )  # as RemoteChrootBuild ships

    def mounted(self) -> bool:
        return subprocess.run(["mountpoint", "-q", str(self.root)]).returncode == 0

    def writable(self) -> None:
        """A frozen xfs blocks writers: a write that returns proves the canvas is thawed."""
        subprocess.run(["touch", str(self.root / "amibake-thawed")], check=True, timeout=120)

    def teardowns(self) -> None:
        """The nightly's teardown tasks, as they run after any outcome."""
        self.run(TerminateBuildBox, "terminate_build_box")
        self.run(DeleteCanvas, "delete_canvas")

    def undo(self) -> None:
        """Whatever the test left: thaw, stop and unmount build-image's work, remove its dirs."""
        for vol in self.volumes | {call["VolumeId"] for call in self.ec2.calls("AttachVolume")}:
            if self.ebs.devices.get(vol):
                base = ["bash", str(defaults.PACKAGE_SCRIPTS_DIR / "build-image"), "--volume-id", vol]
                for action in ("thaw", "abort", "umount"):
                    subprocess.run([*base, action], capture_output=True, timeout=300)
            for pid in build_image_pids(vol):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(Path(defaults.REMOTE_BASE_DIR) / vol, ignore_errors=True)
        shutil.rmtree(remote_dir(self.build), ignore_errors=True)


@pytest.fixture
def rig(ec2: Any, sshd: Any, subnet: dict, airflow_db: None, tmp_path: Path) -> Iterator[Rig]:
    """A fresh :class:`Rig` (root: loop devices and mounts); undone even when the test fails."""
    from rehearsal.ebs import LoopEbs

    with LoopEbs(ec2.moto_url, ec2.region, tmp_path / "ebs") as ebs:
        made = Rig(ec2, ebs, tmp_path)
        try:
            yield made
        finally:
            made.undo()
