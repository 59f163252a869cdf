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
from operators.rules.contract import CONTRACT
from operators.rules.naming import Role
from operators.rules.remote import remote_scripts_dir

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
    build = naming.build_id("amibake_debian12", PREVIOUS_RUN)
    created = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()

    def tags(role: Role) -> list[dict[str, str]]:
        return naming.resource_tags(
            build=build,
            dag_id="amibake_debian12",
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
    device (rehearsal.ebs.LoopEbs), the box the instance's own (rehearsal.boxes). Everything is
    undone by the fixture."""

    def __init__(self, ec2: Any, boxes: Any, ebs: Any, tmp_path: Path) -> None:
        self.ec2, self.boxes, self.ebs, self.tmp_path = ec2, boxes, ebs, tmp_path
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
    def on_box(self) -> Any:
        """The box machine (``rehearsal.boxes.Box``) of this build."""
        return self.boxes.get(self.box["instance_id"])

    @property
    def volume_id(self) -> str:
        return self.canvas["volume_id"]

    @property
    def work(self) -> str:
        """build-image's work dir on the box for the canvas (a path on the box)."""
        return f"{CONTRACT.box_work_dir}/{self.volume_id}"

    @property
    def root(self) -> str:
        return f"{self.work}/root"

    def on_box_path(self, path: str) -> Path:
        """Where a file of the box is seen from here."""
        return self.on_box.path(path)

    def build_image(self, *phases: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real build-image on the canvas as root on the box, as the operators would (sudo)."""
        argv = ["bash", f"{remote_scripts_dir(self.build)}/build-image", "--recipe", "debian12"]
        argv += ["--volume-id", self.volume_id, "--size-gib", str(self.canvas["size_gib"]), *phases]
        return self.on_box.run(argv, check=check, timeout=600)

    def mount(self) -> None:
        """The canvas as ``build-image all`` leaves it for FrozenSnapshot: partitioned, xfs, mounted."""
        # as RemoteChrootBuild ships
        shutil.copytree(defaults.PACKAGE_SCRIPTS_DIR, self.on_box_path(remote_scripts_dir(self.build)))
        self.build_image("resolve", "partition", "mkfs", "mount")
        assert self.mounted()

    def mounted(self) -> bool:
        """Whether the canvas's root is mounted on the box (False once the box is gone)."""
        return self.root in self.on_box.mounts()

    def writable(self) -> None:
        """A frozen xfs blocks writers: a write that returns proves the canvas is thawed. If none does
        within 120 s, the failure shows what the box's freeze guard did (its log, state, process)."""
        try:
            self.on_box.run(["touch", f"{self.root}/amibake-thawed"], check=True, timeout=120)
        except subprocess.TimeoutExpired:
            run = self.on_box_path(f"{self.work}/run")
            log = self.on_box_path(f"{self.work}/logs/freeze-guard.log")
            guards = self.on_box.run(["pgrep", "-af", "freeze-guard"]).stdout
            raise AssertionError(
                f"the canvas stayed frozen; run dir {sorted(p.name for p in run.glob('*'))}, "
                f"guard log {log.read_text() if log.exists() else '(none)'!r}, guards running {guards!r}"
            ) from None

    def teardowns(self) -> None:
        """The nightly's teardown tasks, as they run after any outcome."""
        self.run(TerminateBuildBox, "terminate_build_box")
        self.run(DeleteCanvas, "delete_canvas")

    def undo(self) -> None:
        """Whatever the test left on a box still running: thaw, stop and unmount build-image's work
        (terminating the box at the test's end takes the rest)."""
        box = self.boxes.get(self.box["instance_id"]) if self.box else None
        for vol in self.volumes | {call["VolumeId"] for call in self.ec2.calls("AttachVolume")}:
            if box is not None and box.alive and self.ebs.devices.get(vol):
                base = ["bash", f"{remote_scripts_dir(self.build)}/build-image", "--volume-id", vol]
                for action in ("thaw", "abort", "umount"):
                    box.run([*base, action], timeout=300)
            for pid in build_image_pids(vol):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def rig(
    ec2: Any, boxes: Any, box_login: Any, subnet: dict, airflow_db: None, tmp_path: Path
) -> Iterator[Rig]:
    """A fresh :class:`Rig` (root: loop devices and mounts); undone even when the test fails."""
    from rehearsal.ebs import LoopEbs

    with LoopEbs(ec2.moto_url, ec2.region, tmp_path / "ebs") as ebs:
        made = Rig(ec2, boxes, ebs, tmp_path)
        try:
            yield made
        finally:
            made.undo()
