"""FrozenSnapshot with the real box scripts on a real loop-backed canvas (root: loop devices, mounts).

The box is the instance's own (``rehearsal.boxes``: sshd, the base AMI's user with sudo, its own mount
namespace); the canvas is a moto volume backed by a loop device (rehearsal.ebs.LoopEbs) and prepared
on the box with the real ``build-image`` phases resolve/partition/mkfs/mount, so the freeze and thaw
are real ``xfs_freeze`` calls.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, TaskDeferred
from operator_harness import make_context, rebuild, run_operator

from operators import defaults
from operators.build_box import LaunchBuildBox
from operators.canvas import AttachCanvas
from operators.rules import naming
from operators.rules.contract import CONTRACT
from operators.rules.remote import remote_scripts_dir
from operators.snapshot import FrozenSnapshot
from rehearsal.ec2_local import tag_specs

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
]
RUN_ID = "manual__2026-11-25T04:00:00+00:00"
SIZE = 2


@pytest.fixture
def mounted_canvas(
    ec2: Any, boxes: Any, box_login: Any, subnet: dict, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """Box + canvas made by the operators, canvas partitioned, formatted and mounted by build-image
    on the box (run as root from its console, as RemoteChrootBuild leaves it)."""
    from rehearsal.ebs import LoopEbs

    dag_id = f"amibake_t_snap_{os.getpid()}_{tmp_path.name[-12:]}"
    build = naming.build_id(dag_id, RUN_ID)
    ami = ec2.register_base_image("amibake-test-base")
    with DAG(dag_id, schedule=None) as dag:
        launch = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", base_ami=ami)
    box = run_operator(launch, make_context(dag, RUN_ID)).result
    on_box = boxes.get(box["instance_id"])
    with dag:
        attach = AttachCanvas(task_id="attach_canvas", recipe="debian12", box=box, size_gib=SIZE)
    with LoopEbs(ec2.moto_url, ec2.region, tmp_path / "ebs") as ebs:
        canvas = run_operator(attach, make_context(dag, RUN_ID)).result
        volume_id = canvas["volume_id"]
        ebs.wait_for(volume_id)
        # what RemoteChrootBuild ships
        shutil.copytree(defaults.PACKAGE_SCRIPTS_DIR, on_box.path(remote_scripts_dir(build)))
        base = ["bash", f"{remote_scripts_dir(build)}/build-image", "--recipe", "debian12"]
        base += ["--volume-id", volume_id, "--size-gib", str(SIZE)]
        try:
            on_box.run([*base, "resolve", "partition", "mkfs", "mount"], check=True)
            root = f"{CONTRACT.box_work_dir}/{volume_id}/root"
            assert on_box.run(["mountpoint", "-q", root]).returncode == 0
            ec2.clear_requests()
            yield {"dag": dag, "box": box, "canvas": canvas, "root": root, "build": build, "on_box": on_box}
        finally:
            on_box.run([*base, "thaw"])
            on_box.run([*base, "umount"])


def _snapshot_op(setup: dict[str, Any], **kwargs: Any) -> FrozenSnapshot:
    with setup["dag"]:
        return FrozenSnapshot(
            task_id=f"frozen_snapshot_{len(setup['dag'].tasks)}",
            recipe="debian12",
            box=setup["box"],
            canvas=setup["canvas"],
            freeze_timeout=60,
            waiter_delay=1,  # the local EC2 API keeps a new snapshot unknown, then pending, for a moment
            **kwargs,
        )


def _assert_writable(setup: dict[str, Any]) -> None:
    """A frozen xfs blocks writers: a write on the box that finishes proves the canvas is thawed."""
    setup["on_box"].run(["touch", f"{setup['root']}/amibake-thawed"], check=True, timeout=30)


def test_freeze_snapshot_thaw(ec2: Any, mounted_canvas: dict[str, Any]) -> None:
    # pending long enough to be seen pending after the thaw, however busy the machine (0.5 s by default)
    ec2.configure_rule("SnapshotProgress", duration=6.0)
    op = _snapshot_op(mounted_canvas)
    context = make_context(mounted_canvas["dag"], RUN_ID, max_tries=1)
    record = run_operator(op, context)
    volume_id = mounted_canvas["canvas"]["volume_id"]
    assert record.deferrals == ["SnapshotCompletedTrigger"]
    (create,) = ec2.calls("CreateSnapshot")
    assert create["VolumeId"] == volume_id
    tags = tag_specs(create)["snapshot"]
    assert (tags[naming.TAG_BUILD_ID], tags[naming.TAG_ROLE]) == (mounted_canvas["build"], "snapshot")
    assert record.result == {"snapshot_id": record.result["snapshot_id"], "volume_id": volume_id}
    _assert_writable(mounted_canvas)

    # a retry reuses the snapshot instead of taking (and freezing for) another
    again = run_operator(op, make_context(mounted_canvas["dag"], RUN_ID, try_number=2, max_tries=1))
    assert again.result == record.result
    assert len(ec2.calls("CreateSnapshot")) == 1


def test_failed_create_snapshot_still_thaws(ec2: Any, mounted_canvas: dict[str, Any]) -> None:
    ec2.add_fault("CreateSnapshot", "UnauthorizedOperation", 403, times=1)
    with pytest.raises(Exception, match="UnauthorizedOperation"):
        run_operator(_snapshot_op(mounted_canvas), make_context(mounted_canvas["dag"], RUN_ID))
    _assert_writable(mounted_canvas)
    filters = naming.project_filters(naming.Role.SNAPSHOT)
    assert ec2.boto3_client().describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"] == []


def test_snapshot_in_error_is_deleted_and_retaken(ec2: Any, mounted_canvas: dict[str, Any]) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    snapshots = ec2_backends[DEFAULT_ACCOUNT_ID][ec2.region].snapshots
    retries = {"retries": {"mode": "standard", "total_max_attempts": 7}}
    op = _snapshot_op(mounted_canvas, botocore_config=retries)
    context = make_context(mounted_canvas["dag"], RUN_ID)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    kwargs = deferred.value.trigger.serialize()[1]
    first = kwargs["snapshot_id"]
    assert kwargs["botocore_config"] == retries  # the triggerer's client retries as the task's does
    snapshots[first].status = "error"  # moto completes snapshots at once; EBS can fail them
    import asyncio

    async def first_event() -> dict:
        async for event in rebuild(deferred.value.trigger).run():
            return event.payload
        raise AssertionError("no event")

    event = asyncio.run(first_event())
    assert event["status"] == "error"
    with pytest.raises(AirflowException, match=f"snapshot {first} did not complete"):
        op.execute_complete(context, event)
    assert first not in snapshots, "the failed snapshot is deleted so the retry takes a new one"

    retry = run_operator(op, make_context(mounted_canvas["dag"], RUN_ID, try_number=2, max_tries=1))
    assert retry.result["snapshot_id"] != first
    assert len(ec2.calls("CreateSnapshot")) == 2
    _assert_writable(mounted_canvas)
