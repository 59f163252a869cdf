"""RegisterImage fails for good: no AMI appears, the previous good AMI stays as it was, and the
snapshot the failed night left is removed by the sweeper (and only it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from fault_helpers import age, images, left, nothing_left, run_sweeper, touched
from operator_harness import make_context, run_operator

from operators.ami import RegisterHVMAmi
from operators.rules import naming
from operators.rules.naming import Role

RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"


def test_a_failed_registration_changes_no_ami_and_its_snapshot_is_swept(
    ec2: Any, previous_good: dict[str, str], airflow_db: None, tmp_path: Path
) -> None:
    client = ec2.boto3_client()
    dag_id = f"amibake_t_regfail_{tmp_path.name[-12:]}"
    build = naming.build_id(dag_id, RUN_ID)
    tags = naming.resource_tags(
        build=build, dag_id=dag_id, run_id=RUN_ID, recipe="debian12", role=Role.SNAPSHOT
    )
    vol = client.create_volume(Size=2, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
    snapshot = client.create_snapshot(
        VolumeId=vol, TagSpecifications=[naming.tag_specification("snapshot", tags)]
    )["SnapshotId"]  # what FrozenSnapshot leaves for RegisterHVMAmi
    client.delete_volume(VolumeId=vol)
    before = images(client)
    ec2.clear_requests()
    ec2.add_fault("RegisterImage", "InvalidParameterValue", 400, times=None)

    with DAG(dag_id, schedule=None) as dag:
        register = RegisterHVMAmi(
            task_id="register_hvm_ami",
            recipe="debian12",
            snapshot={"snapshot_id": snapshot, "volume_id": vol},
            size_gib=2,
            deferrable=False,
        )
    with pytest.raises(Exception, match="InvalidParameterValue"):
        run_operator(register, make_context(dag, RUN_ID))
    assert len(ec2.calls("RegisterImage")) >= 1
    assert images(client) == before  # no second AMI, the previous good one unchanged
    assert left(client, build) == {**nothing_left(), "snapshots": [snapshot]}

    age(client, build, hours=7)  # time passes; the sweeper's next hourly run
    ec2.clear_requests()
    assert run_sweeper(max_age_hours=6).state == "success"
    assert left(client, build) == nothing_left()
    assert touched(ec2.requests) == {snapshot}
    assert images(client) == before
    assert left(client, previous_good["build"])["snapshots"] == [previous_good["snapshot"]]
