"""A build whose Airflow worker died for good (no retry, no teardown ever ran) leaves its box, security
group and canvas behind; the sweeper removes all of it and nothing else, and the previous good AMI
of the recipe stays as it was.

The leftovers are made by the nightly's own operators (LaunchBuildBox, AttachCanvas) against moto
behind the recorder and the real sshd, so the tags the sweeper relies on are the ones the pipeline
really writes.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG

from operators import naming
from operators.build_box import LaunchBuildBox
from operators.canvas import AttachCanvas
from operators.naming import Role

# B's harness runs an operator as the task runner + triggerer would (tests/operators/operator_harness.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))
from operator_harness import make_context, run_operator  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"
READS = ("Describe", "Get")


def _age(client: Any, build: str, hours: float) -> list[str]:
    """Rewrite ``amibake:created-at`` of every resource of a build to ``hours`` ago (time passing)."""
    when = (datetime.now(UTC) - timedelta(hours=hours)).replace(microsecond=0).isoformat()
    ours = [{"Name": f"tag:{naming.TAG_BUILD_ID}", "Values": [build]}]
    found = [
        *(
            i["InstanceId"]
            for r in client.describe_instances(Filters=ours)["Reservations"]
            for i in r["Instances"]
        ),
        *(v["VolumeId"] for v in client.describe_volumes(Filters=ours)["Volumes"]),
        *(g["GroupId"] for g in client.describe_security_groups(Filters=ours)["SecurityGroups"]),
        *(s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"], Filters=ours)["Snapshots"]),
    ]
    client.create_tags(Resources=found, Tags=[{"Key": naming.TAG_CREATED_AT, "Value": when}])
    return found


def _left(client: Any, build: str) -> dict[str, list[str]]:
    """What of a build still exists (terminated instances and deleted volumes do not count)."""
    ours = [{"Name": f"tag:{naming.TAG_BUILD_ID}", "Values": [build]}]
    return {
        "instances": [
            i["InstanceId"]
            for r in client.describe_instances(Filters=ours)["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ],
        "volumes": [v["VolumeId"] for v in client.describe_volumes(Filters=ours)["Volumes"]],
        "security_groups": [
            g["GroupId"] for g in client.describe_security_groups(Filters=ours)["SecurityGroups"]
        ],
        "snapshots": [
            s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"], Filters=ours)["Snapshots"]
        ],
    }


@pytest.fixture
def previous_good(ec2: Any) -> dict[str, str]:
    """Last night's AMI of the recipe and its snapshot, as the nightly tags them."""
    client = ec2.boto3_client()
    build = naming.build_id("amibake_nightly", "scheduled__2026-11-24T02:00:00+00:00")
    created = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()

    def tags(role: Role) -> list[dict[str, str]]:
        return naming.resource_tags(
            build=build,
            dag_id="amibake_nightly",
            run_id="scheduled__2026-11-24T02:00:00+00:00",
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
    return {"ami": ami, "snapshot": snap}


def test_a_dead_builds_leftovers_are_swept_and_the_previous_ami_stays(
    ec2: Any, sshd: Any, subnet: dict, previous_good: dict[str, str], airflow_db: None, tmp_path: Path
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    client = ec2.boto3_client()
    dag_id = f"amibake_t_crash_{tmp_path.name[-12:]}"
    build = naming.build_id(dag_id, RUN_ID)
    with DAG(dag_id, schedule=None) as dag:
        launch = LaunchBuildBox(
            task_id="launch_build_box",
            recipe="debian12",
            base_ami=ec2.register_base_image("amibake-test-base"),
        )
    box = run_operator(launch, make_context(dag, RUN_ID)).result
    with dag:
        attach = AttachCanvas(task_id="attach_canvas", recipe="debian12", box=box, size_gib=2)
    canvas = run_operator(attach, make_context(dag, RUN_ID)).result
    # the worker died here: no retry, no teardown. Time passes.
    leftovers = _age(client, build, hours=7)
    assert {box["instance_id"], box["security_group_id"], canvas["volume_id"]} <= set(leftovers)
    before = {i["ImageId"]: i for i in client.describe_images(Owners=["self"])["Images"]}
    ec2.clear_requests()

    sweeper = DagBag(dag_folder=str(REPO / "dags" / "amibake_sweeper.py")).dags["amibake_sweeper"]
    dag_run = sweeper.test(run_after=datetime.now(UTC), run_conf={"max_age_hours": 6})
    assert dag_run.state == "success"

    assert _left(client, build) == {"instances": [], "volumes": [], "security_groups": [], "snapshots": []}
    touched = {
        v
        for r in ec2.requests
        if not r["action"].startswith(READS)
        for k, v in r["params"].items()
        if k.split(".")[0].endswith("Id")
    }
    assert box["instance_id"] in touched and canvas["volume_id"] in touched
    assert not touched & {previous_good["ami"], previous_good["snapshot"]}
    after = {i["ImageId"]: i for i in client.describe_images(Owners=["self"])["Images"]}
    assert after == before  # no AMI deregistered, none added, the previous good one unchanged
    assert previous_good["snapshot"] in {
        s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    }
