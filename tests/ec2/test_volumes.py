"""Volumes as AWS has them: unknown for a moment after CreateVolume, a ClientToken that creates once,
no AttachVolume across zones; and AttachCanvas (the product) against that."""

from __future__ import annotations

import time
from typing import Any

import pytest
from airflow.sdk import DAG
from ec2_helpers import answers, build_tags, error_of
from operator_harness import make_context, run_operator

from operators.canvas import AttachCanvas
from operators.rules import naming

RUN_ID = "manual__2026-11-25T02:00:00+00:00"


def _instance(moto: Any, zone: str) -> str:
    """A running build box in ``zone`` made straight in moto (no box: AttachCanvas does not log in),
    tagged as the product tags its boxes (the IAM policy lets it attach volumes to those only)."""
    image = moto.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    subnet = moto.describe_subnets(Filters=[{"Name": "availability-zone", "Values": [zone]}])["Subnets"][0]
    tags = [naming.tag_specification("instance", build_tags("b", naming.Role.BUILD_BOX))]
    return moto.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.small",
        SubnetId=subnet["SubnetId"],
        TagSpecifications=tags,
    )["Instances"][0]["InstanceId"]


def _box(instance_id: str, zone: str, build: str) -> dict[str, Any]:
    """LaunchBuildBox's XCom for that instance."""
    return {
        "build_id": build,
        "instance_id": instance_id,
        "security_group_id": "sg-0123456789abcdef0",
        "availability_zone": zone,
        "ssh_address": "public_ip",
        "address": "127.0.0.2",
        "port": 22,
        "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG7kS0xJqzfiQnn0hXqxU1jRaptOUJ1E4z1s9EfEVt1s",
    }


def _attach(dag_id: str, box: dict[str, Any]) -> tuple[DAG, AttachCanvas]:
    with DAG(dag_id, schedule=None) as dag:
        op = AttachCanvas(task_id="attach_canvas", recipe="debian12", box=box, size_gib=8)
    return dag, op


def test_a_new_volume_is_unknown_for_a_moment_and_then_stays_known(aws: Any, client: Any) -> None:
    aws.configure_rule("EventualConsistency", delay=1.0)
    volume_id = client.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    error = error_of(client.describe_volumes, VolumeIds=[volume_id])
    assert (error["Code"], error["Message"]) == (
        "InvalidVolume.NotFound",
        f"The volume '{volume_id}' does not exist.",
    )
    assert volume_id not in [v["VolumeId"] for v in client.describe_volumes()["Volumes"]]
    time.sleep(1.1)
    assert client.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["VolumeId"] == volume_id


def test_a_repeated_client_token_answers_the_original_volume(aws: Any, client: Any, admin: Any) -> None:
    first = client.create_volume(AvailabilityZone="us-east-1a", Size=8, ClientToken="tok-1")
    again = client.create_volume(AvailabilityZone="us-east-1a", Size=8, ClientToken="tok-1")
    assert again["VolumeId"] == first["VolumeId"]
    assert len(admin.describe_volumes()["Volumes"]) == 1
    mismatch = error_of(client.create_volume, AvailabilityZone="us-east-1a", Size=9, ClientToken="tok-1")
    assert mismatch["Code"] == "IdempotentParameterMismatch"


def test_attach_canvas_waits_out_eventual_consistency_and_creates_one_volume(
    ec2: Any, moto: Any, subnet: dict
) -> None:
    ec2.register_base_image("amibake-test-base")
    zone = subnet["AvailabilityZone"]
    instance_id = _instance(moto, zone)
    ec2.configure_rule("EventualConsistency", delay=1.5)
    dag, op = _attach("amibake_t_ec2_canvas", _box(instance_id, zone, "b"))
    result = run_operator(op, make_context(dag, RUN_ID)).result

    (create,) = ec2.calls("CreateVolume")
    assert create["AvailabilityZone"] == zone
    # the product asked while EC2 did not know the volume yet, and retried (no second create)
    assert ("InvalidVolume.NotFound" in {code for _, code in answers(ec2, "DescribeVolumes")}) is True
    assert answers(ec2, "AttachVolume") == [(200, None)]
    (attach,) = ec2.calls("AttachVolume")
    assert (attach["VolumeId"], attach["InstanceId"]) == (result["volume_id"], instance_id)
    build = naming.build_id(dag.dag_id, RUN_ID)
    ours = moto.describe_volumes(Filters=naming.build_filters(build, naming.Role.CANVAS))["Volumes"]
    assert [(v["VolumeId"], v["State"]) for v in ours] == [(result["volume_id"], "in-use")]


def test_attach_volume_across_zones_is_refused(aws: Any, admin: Any, client: Any) -> None:
    aws.register_base_image("amibake-test-base")
    instance_id = _instance(admin, "us-east-1a")
    volume_id = admin.create_volume(AvailabilityZone="us-east-1b", Size=8)["VolumeId"]
    error = error_of(client.attach_volume, VolumeId=volume_id, InstanceId=instance_id, Device="/dev/sdf")
    assert error["Code"] == "InvalidVolume.ZoneMismatch"
    assert error["Message"] == (
        f"The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'"
    )
    assert admin.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"] == "available"


def test_attach_canvas_in_the_wrong_zone_fails_and_cleans_up(ec2: Any, moto: Any) -> None:
    """The product given a box record with the wrong zone: EC2 refuses the attachment, and on its
    last try the operator deletes the volume it made."""
    ec2.register_base_image("amibake-test-base")
    instance_id = _instance(moto, "us-east-1a")
    dag, op = _attach("amibake_t_ec2_canvas_zone", _box(instance_id, "us-east-1c", "b"))
    with pytest.raises(Exception, match="ZoneMismatch"):
        run_operator(op, make_context(dag, RUN_ID))
    build = naming.build_id(dag.dag_id, RUN_ID)
    assert moto.describe_volumes(Filters=naming.build_filters(build, naming.Role.CANVAS))["Volumes"] == []
    (attach,) = ec2.calls("AttachVolume")
    assert [c["VolumeId"] for c in ec2.calls("DeleteVolume")] == [attach["VolumeId"]]
